"""Model dimensions: frozen dataclasses and the named variants OpenPI uses.

A Pi0 model is a SigLIP vision tower, a Gemma "prefix" expert (PaliGemma's language model) and a
smaller Gemma "action" expert that shares attention with the prefix. The variant names match
OpenPI's (`gemma_2b`, `gemma_300m`, `dummy`, SigLIP `So400m/14`); `siglip_tiny` and `pi0_tiny`
exist only so that CPU tests run in seconds.
"""

from __future__ import annotations

import dataclasses
import difflib


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    name: str
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    rope_max_wavelength: float = 10_000.0


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    name: str
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6
    num_patches: int = dataclasses.field(init=False)
    head_dim: int = dataclasses.field(init=False)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"SigLIP width {self.width} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "num_patches", (self.image_size // self.patch_size) ** 2)
        object.__setattr__(self, "head_dim", self.width // self.num_heads)


GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    c.name: c
    for c in (
        GemmaConfig("gemma_2b", width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
        GemmaConfig("gemma_300m", width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
        GemmaConfig("dummy", width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    )
}

SIGLIP_VARIANTS: dict[str, SiglipConfig] = {
    c.name: c
    for c in (
        SiglipConfig("So400m/14", width=1152, depth=27, mlp_dim=4304, num_heads=16),
        # Not an OpenPI variant: keeps 256 patches of 14x14 on 224x224 (so every shape downstream is
        # real) but is ~2000x cheaper than So400m, for CPU tests.
        SiglipConfig("siglip_tiny", width=32, depth=2, mlp_dim=64, num_heads=2),
    )
}


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    """A whole Pi0 model. `name` is the variant; the rest are derived or fixed by OpenPI's pi0 config."""

    name: str
    vision: SiglipConfig
    prefix: GemmaConfig  # PaliGemma's language model
    action: GemmaConfig  # the action expert
    vocab_size: int = 257_152
    action_dim: int = 32  # state and actions are zero-padded to this
    action_horizon: int = 50
    max_token_len: int = 48
    num_image_slots: int = 3  # base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb

    def __post_init__(self):
        p, a = self.prefix, self.action
        if (p.num_heads, p.num_kv_heads, p.head_dim) != (a.num_heads, a.num_kv_heads, a.head_dim):
            raise ValueError(
                "the two experts share attention, so their heads must agree: "
                f"prefix {p.num_heads}x{p.num_kv_heads}x{p.head_dim} vs action {a.num_heads}x{a.num_kv_heads}x{a.head_dim}"
            )
        if p.depth != a.depth:
            raise ValueError(f"prefix depth {p.depth} != action expert depth {a.depth}")

    @property
    def image_tokens(self) -> int:
        return self.vision.num_patches

    def prefix_len(self, num_views: int) -> int:
        return num_views * self.image_tokens + self.max_token_len

    @property
    def suffix_len(self) -> int:
        return 1 + self.action_horizon  # state token + action tokens


IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")

PI0_VARIANTS: dict[str, Pi0Config] = {
    c.name: c
    for c in (
        Pi0Config("pi0", SIGLIP_VARIANTS["So400m/14"], GEMMA_VARIANTS["gemma_2b"], GEMMA_VARIANTS["gemma_300m"]),
        # OpenPI's test variant: dummy experts, full SigLIP.
        Pi0Config("pi0_dummy", SIGLIP_VARIANTS["So400m/14"], GEMMA_VARIANTS["dummy"], GEMMA_VARIANTS["dummy"]),
        # CPU-test variant: dummy experts and a tiny SigLIP.
        Pi0Config("pi0_tiny", SIGLIP_VARIANTS["siglip_tiny"], GEMMA_VARIANTS["dummy"], GEMMA_VARIANTS["dummy"]),
    )
}


def _lookup(table: dict, name: str, what: str):
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown {what} {name!r}.{hint} Known: {', '.join(sorted(table))}")


def get_variant(name: str) -> Pi0Config:
    """The named Pi0 variant ('pi0', 'pi0_dummy', 'pi0_tiny'); an unknown name suggests close ones."""
    return _lookup(PI0_VARIANTS, name, "Pi0 variant")


def get_gemma(name: str) -> GemmaConfig:
    return _lookup(GEMMA_VARIANTS, name, "Gemma variant")


def get_siglip(name: str) -> SiglipConfig:
    return _lookup(SIGLIP_VARIANTS, name, "SigLIP variant")
