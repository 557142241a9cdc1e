"""The backend boundary: every way of loading gives the same model; options are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pi0_triton_policy import weights as W
from pi0_triton_policy.backends import load_backend, make_backend
from pi0_triton_policy.config import get_variant
from pi0_triton_policy.convert import convert_checkpoint, save_openpi_checkpoint
from pi0_triton_policy.testing import random_inputs, rel_err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = get_variant("pi0_tiny")
    params = W.random_params(cfg, seed=3)
    root = tmp_path_factory.mktemp("backends")
    save_openpi_checkpoint(params, root / "ckpt")
    convert_checkpoint(root / "ckpt", root / "weights", progress=False)
    return cfg, params, root


def test_random_converted_and_checkpoint_loads_agree(checkpoint):
    cfg, params, root = checkpoint
    args = random_inputs(np.random.default_rng(0), 2, 12, cfg)
    ref = make_backend("torch", cfg, params, device="cpu").sample_actions(*args)
    from_random, info = load_backend("torch", variant="pi0_tiny", seed=3, device="cpu")
    assert info["kind"] == "random"
    from_weights, info = load_backend("torch", weights_dir=root / "weights", device="cpu")
    assert info["kind"] == "converted"
    from_ckpt, info = load_backend("jax", checkpoint_dir=root / "ckpt", device="cpu")
    assert info["kind"] == "openpi-checkpoint"
    np.testing.assert_array_equal(from_random.sample_actions(*args), ref)
    np.testing.assert_array_equal(from_weights.sample_actions(*args), ref)
    assert rel_err(from_ckpt.sample_actions(*args), ref) < 1e-4


def test_action_horizon_override_torch_matches_jax():
    """OpenPI's pi0_droid runs 10 action tokens: same weights, a different (shorter) suffix."""
    a, _ = load_backend("torch", variant="pi0_tiny", device="cpu", action_horizon=10)
    b, _ = load_backend("jax", variant="pi0_tiny", device="cpu", action_horizon=10)
    args = random_inputs(np.random.default_rng(1), 3, 20, a.cfg)
    x, y = a.sample_actions(*args), b.sample_actions(*args)
    assert x.shape == (10, 32)
    assert rel_err(x, y) < 1e-4
    full, _ = load_backend("torch", variant="pi0_tiny", device="cpu")
    long_noise = np.concatenate([args[5], np.zeros((40, 32), np.float32)])
    z = full.sample_actions(*args[:5], long_noise)[:10]
    assert rel_err(x, z) > 1e-3  # slicing a 50-action run is not the 10-action model


def test_bad_backend_options(checkpoint):
    _, _, root = checkpoint
    cfg = get_variant("pi0_tiny")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        make_backend("tpu", cfg, W.random_params(cfg), device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_backend("triton", cfg, {}, device="cpu")
    with pytest.raises(ValueError, match="not both"):
        load_backend("torch", weights_dir=root / "weights", checkpoint_dir=root / "ckpt", device="cpu")
    with pytest.raises(KeyError, match="Did you mean 'pi0_tiny'"):
        load_backend("torch", variant="pi0_tyni", device="cpu")
    with pytest.raises(W.CheckpointError, match="does not exist"):
        load_backend("torch", weights_dir=root / "missing", device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_torch_backend_on_cuda_matches_cpu(dtype, tol):
    cfg = get_variant("pi0_tiny")
    params = W.random_params(cfg, seed=5)
    args = random_inputs(np.random.default_rng(2), 3, 48, cfg)
    ref = make_backend("torch", cfg, params, device="cpu").sample_actions(*args)
    out = make_backend("torch", cfg, params, device="cuda", dtype=dtype).sample_actions(*args)
    err = rel_err(out, ref)
    print(f"torch cuda {dtype} vs cpu float32: rel err {err:.2e}")
    assert err < tol


@pytest.mark.gpu
def test_triton_backend_with_droid_horizon_matches_torch():
    """serve_policy builds pi0_droid with 10 action tokens; the triton engine must follow the config."""
    import dataclasses

    cfg = dataclasses.replace(get_variant("pi0"), action_horizon=10)
    params = W.random_params(cfg, seed=6, device="cuda")
    args = random_inputs(np.random.default_rng(3), 2, 17, cfg)
    ref = make_backend("torch", cfg, params, device="cuda").sample_actions(*args)
    out = make_backend("triton", cfg, params, device="cuda").sample_actions(*args)
    err = rel_err(out, ref)
    print(f"triton horizon 10 vs float32 torch: rel err {err:.2e}")
    assert out.shape == (10, 32) and err <= 1e-2
