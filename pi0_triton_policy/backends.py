"""The backend boundary: three implementations of one call, chosen by name.

Every backend has `backend_name`, `cfg` (a Pi0Config) and

    sample_actions(images, image_mask, tokens, token_mask, state, noise, num_steps=10) -> actions

with numpy in and numpy out, an optional leading batch dimension, and
  images      [3, 224, 224, 3] float32 in [-1, 1], slots (base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb)
  image_mask  [3] bool            (a False slot is invisible to every token and is not computed by `triton`)
  tokens      [48] int32, token_mask [48] bool
  state       [32] float32 (normalized, zero-padded)
  noise       [50, 32] float32 (the flow's x at t=1)
  -> actions  [50, 32] float32 (normalized; the policy layer unnormalizes and slices)
Everything robot-specific lives above this boundary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Protocol

import numpy as np
import torch

from pi0_triton_policy.config import Pi0Config

log = logging.getLogger(__name__)

BACKENDS = ("triton", "torch", "jax")


class Backend(Protocol):
    backend_name: str
    cfg: Pi0Config

    def sample_actions(self, images, image_mask, tokens, token_mask, state, noise, num_steps: int = 10) -> np.ndarray: ...


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_backend(
    name: str,
    cfg: Pi0Config,
    params: dict[str, torch.Tensor],
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> Backend:
    """Build backend `name` from canonical weights (OpenPI flat names, see weights.py)."""
    device = device or default_device()
    if name == "torch":
        from pi0_triton_policy.torch_model import TorchPi0

        return TorchPi0(cfg, params, device=device, dtype=dtype or torch.float32)
    if name == "jax":
        from pi0_triton_policy.jax_model import JaxPi0
        from pi0_triton_policy.weights import to_numpy_tree

        return JaxPi0(cfg, to_numpy_tree(params), dtype=dtype or torch.float32)
    if name == "triton":
        if not str(device).startswith("cuda"):
            raise ValueError(f"the triton backend needs a CUDA device, got device={device!r}; use --backend torch on a CPU")
        from pi0_triton_policy.triton_engine import TritonPi0

        return TritonPi0(cfg, params, device=device)
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def load_backend(
    name: str,
    weights_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    variant: str = "pi0",
    device: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    action_horizon: int | None = None,
) -> tuple[Backend, dict]:
    """A backend from converted weights, an original OpenPI checkpoint, or (neither given) random weights.

    Returns (backend, info) where info says where the weights came from (for logs and metadata).
    The `jax` backend given an OpenPI checkpoint reads its parameter tree directly, with no conversion.
    `action_horizon` overrides the model's number of action tokens (OpenPI's pi0_droid uses 10): it changes
    no weight, but action tokens attend to each other, so it must match the preset the weights were trained for.
    """
    from pi0_triton_policy import weights as W

    device = device or default_device()
    if weights_dir is not None and checkpoint_dir is not None:
        raise ValueError("give either weights_dir (converted) or checkpoint_dir (OpenPI original), not both")
    if checkpoint_dir is not None:
        from pi0_triton_policy.convert import read_openpi_checkpoint

        cfg, params, info = read_openpi_checkpoint(checkpoint_dir)
        info = {"weights": str(checkpoint_dir), "kind": "openpi-checkpoint", **info}
    elif weights_dir is not None:
        cfg, params, manifest = W.load_weights(weights_dir)
        info = {"weights": str(weights_dir), "kind": "converted", "manifest": manifest}
    else:
        from pi0_triton_policy.config import get_variant

        cfg = get_variant(variant)
        gen_device = device if str(device).startswith("cuda") else "cpu"
        params = W.random_params(cfg, seed=seed, device=gen_device)
        info = {"weights": f"RANDOM ({variant}, seed {seed})", "kind": "random"}
    if action_horizon is not None and action_horizon != cfg.action_horizon:
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be >= 1, got {action_horizon}")
        cfg = dataclasses.replace(cfg, action_horizon=action_horizon)
    return make_backend(name, cfg, params, device=device, dtype=dtype), info
