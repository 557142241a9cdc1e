"""Random backend inputs and error measures, shared by tests, benchmarks and A/B runs."""

from __future__ import annotations

import numpy as np

from pi0_triton_policy.config import Pi0Config, get_variant


def random_inputs(rng: np.random.Generator, num_cameras: int = 3, prompt_len: int = 10, cfg: Pi0Config | None = None):
    """Backend inputs (unbatched) with the first `num_cameras` slots present and a `prompt_len`-token prompt."""
    cfg = cfg or get_variant("pi0")
    if not 1 <= num_cameras <= cfg.num_image_slots:
        raise ValueError(f"num_cameras must be 1..{cfg.num_image_slots}, got {num_cameras}")
    if not 1 <= prompt_len <= cfg.max_token_len:
        raise ValueError(f"prompt_len must be 1..{cfg.max_token_len}, got {prompt_len}")
    size = cfg.vision.image_size
    images = rng.uniform(-1, 1, size=(cfg.num_image_slots, size, size, 3)).astype(np.float32)
    image_mask = np.arange(cfg.num_image_slots) < num_cameras
    images[~image_mask] = -1.0  # an absent camera is a black image (0 pixels -> -1), as OpenPI fills it
    tokens = np.zeros(cfg.max_token_len, np.int32)
    tokens[:prompt_len] = rng.integers(1, cfg.vocab_size, size=prompt_len)
    token_mask = np.arange(cfg.max_token_len) < prompt_len
    state = rng.normal(size=cfg.action_dim).astype(np.float32)
    noise = rng.normal(size=(cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    return images, image_mask, tokens, token_mask, state, noise


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
