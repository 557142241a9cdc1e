"""The canonical weight set: OpenPI's flattened parameter names and layouts, stored as safetensors.

One file serves every backend. Names are OpenPI's parameter-tree paths joined with "/"
(`PaliGemma/llm/layers/attn/q_einsum/w`), tensors keep OpenPI's layouts (layers stacked on axis 0,
einsum kernels as [in, out]-style JAX layouts), LoRA already merged. Backends re-lay them out at load.
Nothing here unpickles: loading goes through safetensors only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Mapping

import numpy as np
import torch

from pi0_triton_policy.config import GEMMA_VARIANTS, PI0_VARIANTS, SIGLIP_VARIANTS, Pi0Config

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or weights directory that cannot be used; the message says what and why."""


def expected_shapes(cfg: Pi0Config) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name with its shape for a Pi0 variant."""
    v, p, a = cfg.vision, cfg.prefix, cfg.action
    L = v.depth
    img = "PaliGemma/img"
    blk = f"{img}/Transformer/encoderblock"
    attn = f"{blk}/MultiHeadDotProductAttention_0"
    shapes: dict[str, tuple[int, ...]] = {
        f"{img}/embedding/kernel": (v.patch_size, v.patch_size, 3, v.width),
        f"{img}/embedding/bias": (v.width,),
        f"{img}/pos_embedding": (1, v.num_patches, v.width),
        f"{blk}/LayerNorm_0/scale": (L, v.width),
        f"{blk}/LayerNorm_0/bias": (L, v.width),
        f"{blk}/LayerNorm_1/scale": (L, v.width),
        f"{blk}/LayerNorm_1/bias": (L, v.width),
        f"{blk}/MlpBlock_0/Dense_0/kernel": (L, v.width, v.mlp_dim),
        f"{blk}/MlpBlock_0/Dense_0/bias": (L, v.mlp_dim),
        f"{blk}/MlpBlock_0/Dense_1/kernel": (L, v.mlp_dim, v.width),
        f"{blk}/MlpBlock_0/Dense_1/bias": (L, v.width),
        f"{img}/Transformer/encoder_norm/scale": (v.width,),
        f"{img}/Transformer/encoder_norm/bias": (v.width,),
        f"{img}/head/kernel": (v.width, p.width),
        f"{img}/head/bias": (p.width,),
        "PaliGemma/llm/embedder/input_embedding": (cfg.vocab_size, p.width),
    }
    for qkv in ("query", "key", "value"):
        shapes[f"{attn}/{qkv}/kernel"] = (L, v.width, v.num_heads, v.head_dim)
        shapes[f"{attn}/{qkv}/bias"] = (L, v.num_heads, v.head_dim)
    shapes[f"{attn}/out/kernel"] = (L, v.num_heads, v.head_dim, v.width)
    shapes[f"{attn}/out/bias"] = (L, v.width)

    for suffix, g in (("", p), ("_1", a)):
        lay = "PaliGemma/llm/layers"
        shapes[f"{lay}/attn/q_einsum{suffix}/w"] = (g.depth, g.num_heads, g.width, g.head_dim)
        shapes[f"{lay}/attn/kv_einsum{suffix}/w"] = (g.depth, 2, g.num_kv_heads, g.width, g.head_dim)
        shapes[f"{lay}/attn/attn_vec_einsum{suffix}/w"] = (g.depth, g.num_heads, g.head_dim, g.width)
        shapes[f"{lay}/mlp{suffix}/gating_einsum"] = (g.depth, 2, g.width, g.mlp_dim)
        shapes[f"{lay}/mlp{suffix}/linear"] = (g.depth, g.mlp_dim, g.width)
        shapes[f"{lay}/pre_attention_norm{suffix}/scale"] = (g.depth, g.width)
        shapes[f"{lay}/pre_ffw_norm{suffix}/scale"] = (g.depth, g.width)
        shapes[f"PaliGemma/llm/final_norm{suffix}/scale"] = (g.width,)

    w, d = a.width, cfg.action_dim
    for name, (fan_in, fan_out) in {
        "state_proj": (d, w),
        "action_in_proj": (d, w),
        "action_out_proj": (w, d),
        "action_time_mlp_in": (2 * w, w),
        "action_time_mlp_out": (w, w),
    }.items():
        shapes[f"{name}/kernel"] = (fan_in, fan_out)
        shapes[f"{name}/bias"] = (fan_out,)
    return shapes


# ---------------------------------------------------------------------------------------------
# Variant inference
# ---------------------------------------------------------------------------------------------

# The tensor that pins down each part's dims, and how to read them off its shape.
_GEMMA_PROBES = {
    "": "PaliGemma/llm/layers/mlp/gating_einsum",  # (depth, 2, width, mlp)
    "_1": "PaliGemma/llm/layers/mlp_1/gating_einsum",
}
_SIGLIP_PROBE = "PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"  # (depth, width, mlp)


def infer_variant(shapes: dict[str, tuple[int, ...]]) -> Pi0Config:
    """Which Pi0 variant a set of tensor shapes belongs to; a clear error naming the tensor otherwise."""
    for probe in (*_GEMMA_PROBES.values(), _SIGLIP_PROBE):
        if probe not in shapes:
            raise CheckpointError(f"missing tensor {probe!r}: cannot tell the model variant without it")

    def gemma_for(probe: str):
        depth, _, width, mlp = shapes[probe]
        for g in GEMMA_VARIANTS.values():
            if (g.depth, g.width, g.mlp_dim) == (depth, width, mlp):
                return g
        known = ", ".join(f"{g.name} (depth {g.depth}, width {g.width}, mlp {g.mlp_dim})" for g in GEMMA_VARIANTS.values())
        raise CheckpointError(
            f"tensor {probe!r} has shape {tuple(shapes[probe])} (depth {depth}, width {width}, mlp {mlp}), "
            f"which matches no Gemma variant; expected one of: {known}"
        )

    prefix, action = gemma_for(_GEMMA_PROBES[""]), gemma_for(_GEMMA_PROBES["_1"])
    depth, width, mlp = shapes[_SIGLIP_PROBE]
    vision = next((v for v in SIGLIP_VARIANTS.values() if (v.depth, v.width, v.mlp_dim) == (depth, width, mlp)), None)
    if vision is None:
        known = ", ".join(f"{v.name} {(v.depth, v.width, v.mlp_dim)}" for v in SIGLIP_VARIANTS.values())
        raise CheckpointError(
            f"tensor {_SIGLIP_PROBE!r} has shape {tuple(shapes[_SIGLIP_PROBE])}, which matches no SigLIP variant; "
            f"expected (depth, width, mlp) one of: {known}"
        )
    for cfg in PI0_VARIANTS.values():
        if (cfg.vision, cfg.prefix, cfg.action) == (vision, prefix, action):
            break
    else:
        cfg = Pi0Config(f"pi0[{vision.name},{prefix.name},{action.name}]", vision, prefix, action)
    check_shapes(cfg, shapes)
    return cfg


def check_shapes(cfg: Pi0Config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present with its expected shape; extra tensors are an error too."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} for variant {cfg.name}; expected shape {want[missing[0]]}")
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(shapes[name])}, expected {shape} for variant {cfg.name}"
            )
    extra = sorted(set(shapes) - set(want))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} (of {len(extra)} unknown) for variant {cfg.name}")


# ---------------------------------------------------------------------------------------------
# Random weights (tests, benchmarks, the embedded default)
# ---------------------------------------------------------------------------------------------


def random_params(
    cfg: Pi0Config, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights with a healthy scale (fan-in init, small norm offsets) so activations stay O(1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = {}
    for name, shape in expected_shapes(cfg).items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf in ("bias", "scale") or name.endswith("pos_embedding"):
            std = 0.02 if leaf != "scale" or "img" in name else 0.1
            t = torch.randn(shape, generator=gen, device=device) * std
            if leaf == "scale" and "img" in name:
                t += 1.0  # LayerNorm scales are multiplicative, Gemma's RMSNorm adds 1 itself
        elif name.endswith("input_embedding"):
            t = torch.randn(shape, generator=gen, device=device)
            t *= 1.0 / math.sqrt(shape[-1])  # Gemma multiplies by sqrt(width) on lookup
        else:
            fan_in = _fan_in(name, shape)
            t = torch.randn(shape, generator=gen, device=device) * (1.0 / math.sqrt(fan_in))
        params[name] = t.to(dtype)
    return params


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    if name.endswith("embedding/kernel"):
        return shape[0] * shape[1] * shape[2]
    if name.endswith("attn_vec_einsum/w") or name.endswith("attn_vec_einsum_1/w") or name.endswith("/out/kernel"):
        return shape[-3] * shape[-2]
    if "q_einsum" in name or "kv_einsum" in name or "gating_einsum" in name:
        return shape[-2]
    if name.endswith(("query/kernel", "key/kernel", "value/kernel")):
        return shape[-3]
    return shape[-2]


# ---------------------------------------------------------------------------------------------
# Saving and loading a weights directory
# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_weights(out_dir: str | os.PathLike, params: dict[str, torch.Tensor], cfg: Pi0Config, source: str, extra=None) -> dict:
    from safetensors.torch import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in params.items()})
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in params.values()})
    save_file({k: v.contiguous() for k, v in params.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pi0-triton-policy"})
    manifest = {
        "format_version": FORMAT_VERSION,
        "variant": cfg.name,
        "vision": cfg.vision.name,
        "prefix_expert": cfg.prefix.name,
        "action_expert": cfg.action.name,
        "dims": {
            "vision": _dims(cfg.vision),
            "prefix_expert": _dims(cfg.prefix),
            "action_expert": _dims(cfg.action),
        },
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_params": int(sum(v.numel() for v in params.values())),
        "source": str(source),
        "sha256": sha256_file(out / WEIGHTS_FILE),
        **(extra or {}),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _dims(c) -> dict:
    return {k: v for k, v in dataclasses.asdict(c).items() if k != "name"}


def load_weights(
    weights_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = False
) -> tuple[Pi0Config, dict[str, torch.Tensor], dict]:
    """(config, params, manifest) from a converted weights directory. `verify` re-checks the sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = pathlib.Path(weights_dir)
    if not d.is_dir():
        raise CheckpointError(f"weights directory {str(d)!r} does not exist; convert a checkpoint with scripts/convert_checkpoint.py")
    f = d / WEIGHTS_FILE
    if not f.is_file():
        raise CheckpointError(f"{str(f)!r} not found: expected a converted weights directory holding {WEIGHTS_FILE} and {MANIFEST_FILE}")
    manifest = {}
    if (d / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{str(d / MANIFEST_FILE)!r} is not valid JSON: {e}") from e
        if verify and manifest.get("sha256") and sha256_file(f) != manifest["sha256"]:
            raise CheckpointError(f"{str(f)!r} does not match the sha256 in its manifest: the file is corrupt or was replaced")
    try:
        params = load_file(str(f), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{str(f)!r} is not a readable safetensors file ({e}); re-run the conversion") from e
    cfg = infer_variant({k: tuple(v.shape) for k, v in params.items()})
    if dtype is not None:
        params = {k: v.to(dtype) for k, v in params.items()}
    return cfg, params, manifest


def to_numpy_tree(params: dict[str, torch.Tensor]) -> dict:
    """Flat "a/b/c" names -> OpenPI's nested dict of numpy arrays (float32), for the JAX backend."""
    tree: dict = {}
    for name, t in params.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = t.detach().to(torch.float32).cpu().numpy()
    return tree


def flatten_tree(tree: Mapping, prefix: str = "") -> dict:
    """Nested dicts -> flat {"a/b/c": leaf}, as flax.traverse_util.flatten_dict(sep="/") (empty dicts dropped).
    Used for OpenPI's parameter trees and for policy records."""
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flatten_tree(v, key))
        else:
            flat[key] = v
    return flat


def numpy_to_torch(a) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":  # ml_dtypes bfloat16 from JAX/Orbax
        return torch.from_numpy(a.view(np.uint16).astype(np.int32) << 16).view(torch.float32).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))
