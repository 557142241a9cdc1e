"""OpenPI checkpoint -> our weights, and torch (converted) vs jax (original tree) on the same inputs.

Checkpoints are real Orbax checkpoints written with orbax-checkpoint in OpenPI's layout; the conversion
runs through the script as a user runs it.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from pi0_triton_policy import weights as W
from pi0_triton_policy.config import get_variant
from pi0_triton_policy.convert import find_params_dir, restore_orbax_tree, save_openpi_checkpoint
from pi0_triton_policy.jax_model import JaxPi0
from pi0_triton_policy.testing import random_inputs, rel_err
from pi0_triton_policy.torch_model import TorchPi0

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_checkpoint.py"
NORM_STATS = {
    "state": {"mean": [0.1] * 14, "std": [2.0] * 14, "q01": [-1.0] * 14, "q99": [1.0] * 14},
    "actions": {"mean": [0.0] * 14, "std": [1.0] * 14, "q01": [-1.0] * 14, "q99": [1.0] * 14},
}


def run_convert(ckpt, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint-dir", str(ckpt), "--output-dir", str(out), *extra],
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """OpenPI's `dummy` Gemma experts + a tiny SigLIP, saved as an OpenPI Orbax checkpoint and converted."""
    cfg = get_variant("pi0_tiny")
    params = W.random_params(cfg, seed=0)
    root = tmp_path_factory.mktemp("tiny")
    save_openpi_checkpoint(params, root / "ckpt", norm_stats=NORM_STATS, asset_id="lerobot/aloha_sim_transfer_cube_human")
    proc = run_convert(root / "ckpt", root / "weights")
    assert proc.returncode == 0, proc.stderr
    return cfg, params, root


def test_conversion_writes_weights_manifest_and_norm_stats(tiny_checkpoint):
    cfg, params, root = tiny_checkpoint
    out = root / "weights"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["variant"] == "pi0_tiny"
    assert manifest["prefix_expert"] == manifest["action_expert"] == "dummy"
    assert manifest["dtype"] == "float32"
    assert manifest["sha256"] == W.sha256_file(out / "model.safetensors")
    assert manifest["num_params"] == sum(p.numel() for p in params.values())
    stats = out / "assets/lerobot/aloha_sim_transfer_cube_human/norm_stats.json"
    assert json.loads(stats.read_text())["norm_stats"]["state"]["std"][0] == 2.0
    loaded_cfg, loaded, _ = W.load_weights(out, verify=True)
    assert loaded_cfg == cfg
    for k, v in params.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("num_cameras,prompt_len", [(1, 1), (2, 20), (3, 48), (1, 37), (3, 5)])
def test_torch_on_converted_matches_jax_on_original_tree(tiny_checkpoint, num_cameras, prompt_len):
    cfg, _, root = tiny_checkpoint
    torch_backend = TorchPi0.from_weights_dir(root / "weights")
    jax_backend = JaxPi0(cfg, restore_orbax_tree(find_params_dir(root / "ckpt")))  # no conversion
    args = random_inputs(np.random.default_rng(100 + num_cameras * 50 + prompt_len), num_cameras, prompt_len, cfg)
    a, b = torch_backend.sample_actions(*args), jax_backend.sample_actions(*args)
    err = rel_err(a, b)
    print(f"cameras={num_cameras} prompt={prompt_len}: torch vs jax rel err {err:.2e}, max abs {np.abs(a - b).max():.2e}")
    assert a.shape == (50, 32) and np.isfinite(a).all()
    assert err <= 1e-4


def _lora_tree(params: dict, rng: np.random.Generator, rank: int = 4) -> dict:
    """OpenPI's LoRA layout: Einsum lora_a/lora_b beside `w`, FeedForward `<param>_lora_a/_lora_b` beside it."""
    flat = {k: v.numpy() for k, v in params.items()}
    lay = "PaliGemma/llm/layers"
    lora = {}
    for e in ("", "_1"):
        for mod in (f"attn/q_einsum{e}", f"attn/kv_einsum{e}", f"attn/attn_vec_einsum{e}"):
            w = flat[f"{lay}/{mod}/w"]
            lora[f"{lay}/{mod}/lora_a"] = rng.normal(size=(*w.shape[:-1], rank)).astype(np.float32) * 0.1
            lora[f"{lay}/{mod}/lora_b"] = rng.normal(size=(*w.shape[:-2], rank, w.shape[-1])).astype(np.float32) * 0.1
        for name in (f"mlp{e}/gating_einsum", f"mlp{e}/linear"):
            w = flat[f"{lay}/{name}"]
            lora[f"{lay}/{name}_lora_a"] = rng.normal(size=(*w.shape[:-1], rank)).astype(np.float32) * 0.1
            lora[f"{lay}/{name}_lora_b"] = rng.normal(size=(*w.shape[:-2], rank, w.shape[-1])).astype(np.float32) * 0.1
    return {**flat, **lora}


def test_lora_tree_is_merged(tiny_checkpoint, tmp_path):
    cfg, params, _ = tiny_checkpoint
    rng = np.random.default_rng(7)
    flat = _lora_tree(params, rng)
    import orbax.checkpoint as ocp

    tree = W.to_numpy_tree({k: torch.from_numpy(v) for k, v in flat.items()})
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(str(tmp_path / "ckpt" / "params"), {"params": tree})
    proc = run_convert(tmp_path / "ckpt", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    _, merged, manifest = W.load_weights(tmp_path / "out")
    assert len(manifest["lora_merged"]) == 10

    # Independent check through OpenPI's LoRA einsum: x.w + (x.a).b must equal x.merged.
    lay = "PaliGemma/llm/layers"
    x = rng.normal(size=(5, cfg.prefix.width)).astype(np.float32)
    base = f"{lay}/attn/q_einsum"
    ref = np.einsum("td,ndh->tnh", x, flat[f"{base}/w"][1]) + np.einsum(
        "tnr,nrh->tnh", np.einsum("td,ndr->tnr", x, flat[f"{base}/lora_a"][1]), flat[f"{base}/lora_b"][1]
    )
    out = np.einsum("td,ndh->tnh", x, merged[f"{base}/w"][1].numpy())
    assert rel_err(out, ref) < 1e-5
    h = rng.normal(size=(5, cfg.action.mlp_dim)).astype(np.float32)
    name = f"{lay}/mlp_1/linear"
    ref = h @ flat[name][2] + (h @ flat[f"{name}_lora_a"][2]) @ flat[f"{name}_lora_b"][2]
    assert rel_err(h @ merged[name][2].numpy(), ref) < 1e-5

    # and the model built from the merged weights still agrees with jax on the merged tree
    args = random_inputs(np.random.default_rng(8), 2, 12, cfg)
    a = TorchPi0(cfg, merged).sample_actions(*args)
    b = JaxPi0(cfg, W.to_numpy_tree(merged)).sample_actions(*args)
    assert rel_err(a, b) <= 1e-4


def test_training_state_tree_converts(tiny_checkpoint, tmp_path):
    cfg, params, _ = tiny_checkpoint
    save_openpi_checkpoint(params, tmp_path / "ckpt", training_state=True)
    tree = restore_orbax_tree(find_params_dir(tmp_path / "ckpt"))
    assert "value" in tree["state_proj"]["kernel"]  # really a training-state layout
    proc = run_convert(tmp_path / "ckpt", tmp_path / "out", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    _, loaded, manifest = W.load_weights(tmp_path / "out")
    assert manifest["training_state"] is True and manifest["dtype"] == "bfloat16"
    for k, v in params.items():
        assert torch.equal(loaded[k], v.to(torch.bfloat16)), k


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: clear errors
# ---------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    proc = run_convert(tmp_path / "nope", tmp_path / "out")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "nope" in proc.stderr


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_convert(tmp_path / "empty", tmp_path / "out")
    assert proc.returncode == 2 and "no Orbax checkpoint" in proc.stderr


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    _, params, _ = tiny_checkpoint
    params = dict(params)
    del params["PaliGemma/llm/layers/attn/kv_einsum_1/w"]
    save_openpi_checkpoint(params, tmp_path / "ckpt")
    proc = run_convert(tmp_path / "ckpt", tmp_path / "out")
    assert proc.returncode == 2
    assert "missing tensor 'PaliGemma/llm/layers/attn/kv_einsum_1/w'" in proc.stderr


def test_shape_matching_no_variant_is_named(tiny_checkpoint, tmp_path):
    _, params, _ = tiny_checkpoint
    params = dict(params)
    params["PaliGemma/llm/layers/mlp_1/gating_einsum"] = torch.zeros(4, 2, 64, 96)
    save_openpi_checkpoint(params, tmp_path / "ckpt")
    proc = run_convert(tmp_path / "ckpt", tmp_path / "out")
    assert proc.returncode == 2
    assert "'PaliGemma/llm/layers/mlp_1/gating_einsum' has shape (4, 2, 64, 96)" in proc.stderr
    assert "matches no Gemma variant" in proc.stderr and "dummy (depth 4, width 64, mlp 128)" in proc.stderr


def test_inconsistent_tensor_shape_is_named_with_expected(tiny_checkpoint, tmp_path):
    _, params, _ = tiny_checkpoint
    params = dict(params)
    params["action_out_proj/kernel"] = torch.zeros(64, 14)
    save_openpi_checkpoint(params, tmp_path / "ckpt")
    proc = run_convert(tmp_path / "ckpt", tmp_path / "out")
    assert proc.returncode == 2
    assert "'action_out_proj/kernel' has shape (64, 14), expected (64, 32)" in proc.stderr


def test_corrupt_orbax_files(tiny_checkpoint, tmp_path):
    _, params, _ = tiny_checkpoint
    save_openpi_checkpoint(params, tmp_path / "ckpt")
    data_files = [p for p in (tmp_path / "ckpt" / "params").rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])  # truncated download
    proc = run_convert(tmp_path / "ckpt", tmp_path / "out")
    assert proc.returncode == 2
    assert "could not read the Orbax checkpoint" in proc.stderr


def test_corrupt_safetensors_and_checksum(tiny_checkpoint, tmp_path):
    _, _, root = tiny_checkpoint
    import shutil

    shutil.copytree(root / "weights", tmp_path / "w")
    f = tmp_path / "w" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    f.write_bytes(bytes(raw))
    with pytest.raises(W.CheckpointError, match="sha256"):
        W.load_weights(tmp_path / "w", verify=True)
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(W.CheckpointError, match="not a readable safetensors file"):
        W.load_weights(tmp_path / "w")


def test_existing_output_needs_overwrite(tiny_checkpoint):
    _, _, root = tiny_checkpoint
    proc = run_convert(root / "ckpt", root / "weights")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


@pytest.mark.slow
def test_openpi_dummy_variant_with_full_siglip(tmp_path):
    """OpenPI's own `dummy` variant (full So400m SigLIP): converts, is recognised, torch == jax."""
    cfg = get_variant("pi0_dummy")
    params = W.random_params(cfg, seed=1)
    save_openpi_checkpoint(params, tmp_path / "ckpt")
    proc = run_convert(tmp_path / "ckpt", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["variant"] == "pi0_dummy"
    args = random_inputs(np.random.default_rng(2), 1, 16, cfg)
    a = TorchPi0.from_weights_dir(tmp_path / "out").sample_actions(*args)
    b = JaxPi0(cfg, restore_orbax_tree(find_params_dir(tmp_path / "ckpt"))).sample_actions(*args)
    err = rel_err(a, b)
    print(f"pi0_dummy torch vs jax rel err {err:.2e}")
    assert err <= 1e-4
