"""OpenPI checkpoint -> canonical weights (weights/<name>/model.safetensors + manifest.json).

Reads an OpenPI checkpoint directory as openpi downloads it:
    <ckpt>/params/          Orbax PyTreeCheckpointer (OCDBT), tree {"params": {...}}
    <ckpt>/assets/<asset_id>/norm_stats.json
Training checkpoints (every leaf ends in `value`) and LoRA trees (`lora_a`/`lora_b` beside `w`, or
`gating_einsum_lora_a`/... beside `gating_einsum`) are normalized: `value` is dropped, LoRA is merged as
w + (alpha / rank) * a @ b over the last two axes (OpenPI's variants all use alpha == rank).
OpenPI's own PyTorch export (model.safetensors + config.json) is read too. No pickle is ever loaded.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil

import numpy as np
import torch

from pi0_triton_policy import weights as W
from pi0_triton_policy.config import Pi0Config

log = logging.getLogger(__name__)

TOKENIZER_FILE = "paligemma_tokenizer.model"


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor")


# ---------------------------------------------------------------------------------------------
# Finding and reading
# ---------------------------------------------------------------------------------------------


def find_params_dir(checkpoint_dir: str | os.PathLike) -> pathlib.Path:
    """The Orbax params directory of an OpenPI checkpoint (`<ckpt>/params`, or `<ckpt>` itself)."""
    ckpt = pathlib.Path(checkpoint_dir).expanduser()
    if not ckpt.exists():
        raise W.CheckpointError(f"checkpoint directory {str(ckpt)!r} does not exist")
    if not ckpt.is_dir():
        raise W.CheckpointError(f"{str(ckpt)!r} is a file; expected an OpenPI checkpoint directory holding params/")
    for cand in (ckpt / "params", ckpt):
        if (cand / "_METADATA").is_file() or (cand / "manifest.ocdbt").is_file() or (cand / "_CHECKPOINT_METADATA").is_file():
            return cand
    raise W.CheckpointError(
        f"no Orbax checkpoint in {str(ckpt)!r}: expected {str(ckpt / 'params')!r} holding _METADATA / manifest.ocdbt "
        "(an OpenPI checkpoint as downloaded to ~/.cache/openpi/openpi-assets/checkpoints/<name>), "
        "or model.safetensors + config.json (OpenPI's PyTorch export)"
    )


def restore_orbax_tree(params_dir: pathlib.Path) -> dict:
    """The raw nested numpy tree stored in an OpenPI params directory (inner `params` level removed)."""
    import jax
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            # orbax <= 0.11.1x returns the tree metadata; later releases wrap it in StepMetadata.
            meta = ckptr.metadata(str(params_dir))
            meta = getattr(meta, "item_metadata", None) or meta
            item = getattr(meta, "tree", meta)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            tree = ckptr.restore(str(params_dir), ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    except W.CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for truncated or garbled files
        raise W.CheckpointError(
            f"could not read the Orbax checkpoint at {str(params_dir)!r}: {type(e).__name__}: {str(e)[:400]} "
            "(the files are corrupt or incomplete; re-download the checkpoint)"
        ) from e
    if not isinstance(tree, dict):
        raise W.CheckpointError(f"the Orbax checkpoint at {str(params_dir)!r} does not hold a parameter dict")
    return tree.get("params", tree)


def normalize_openpi_tree(flat: dict[str, np.ndarray], lora_scaling: float = 1.0) -> tuple[dict[str, np.ndarray], dict]:
    """Flat OpenPI names -> canonical flat names: drop training `value` leaves, merge LoRA.

    Returns (params, info) with info["lora_merged"] naming the merged tensors.
    """
    info: dict = {"training_state": False, "lora_merged": []}
    if flat and all(k.endswith("/value") for k in flat):
        flat = {k[: -len("/value")]: v for k, v in flat.items()}
        info["training_state"] = True
    out = {k: v for k, v in flat.items() if "lora_" not in k.rsplit("/", 1)[-1]}
    lora = {k: v for k, v in flat.items() if k not in out}
    for name in sorted(k for k in lora if k.endswith("lora_a")):
        # Einsum LoRA: <mod>/lora_a beside <mod>/w; FeedForward LoRA: <param>_lora_a beside <param>.
        if name.endswith("/lora_a"):
            base, b_name = name[: -len("/lora_a")] + "/w", name[: -len("/lora_a")] + "/lora_b"
        else:
            base, b_name = name[: -len("_lora_a")], name[: -len("_lora_a")] + "_lora_b"
        if b_name not in lora:
            raise W.CheckpointError(f"LoRA tensor {name!r} has no partner {b_name!r}")
        if base not in out:
            raise W.CheckpointError(f"LoRA tensor {name!r} has no base weight {base!r} to merge into")
        a, b = lora.pop(name).astype(np.float32), lora.pop(b_name).astype(np.float32)
        w = out[base]
        delta = a @ b  # stacked matmul over the last two axes: (..., in, r) @ (..., r, out)
        if delta.shape != w.shape:
            raise W.CheckpointError(
                f"LoRA {name!r} {a.shape} @ {b_name!r} {b.shape} gives {delta.shape}, expected the base's {w.shape}"
            )
        out[base] = (w.astype(np.float32) + lora_scaling * delta).astype(w.dtype)
        info["lora_merged"].append(base)
    if lora:
        raise W.CheckpointError(f"unpaired LoRA tensor {sorted(lora)[0]!r}")
    return out, info


def read_openpi_checkpoint(
    checkpoint_dir: str | os.PathLike, lora_scaling: float = 1.0, progress: bool = False
) -> tuple[Pi0Config, dict[str, torch.Tensor], dict]:
    """(config, canonical torch params, info) from an OpenPI checkpoint or OpenPI's PyTorch export."""
    ckpt = pathlib.Path(checkpoint_dir).expanduser()
    if (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file():
        from pi0_triton_policy import openpi_torch_export

        params = openpi_torch_export.read_openpi_pytorch_export(ckpt)
        info = {"source_format": "openpi-pytorch-export", "training_state": False, "lora_merged": []}
    else:
        params_dir = find_params_dir(ckpt)
        if progress:
            log.info("reading Orbax checkpoint %s ...", params_dir)
        flat = W.flatten_tree(restore_orbax_tree(params_dir))
        flat, info = normalize_openpi_tree(flat, lora_scaling)
        info["source_format"] = "openpi-orbax"
        params = {k: W.numpy_to_torch(v) for k, v in _progress(flat.items(), len(flat), "tensors", progress)}
    cfg = W.infer_variant({k: tuple(v.shape) for k, v in params.items()})
    return cfg, params, info


def find_norm_stats(checkpoint_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Every `assets/<asset_id>/norm_stats.json` under a checkpoint (asset ids may contain a slash)."""
    assets = pathlib.Path(checkpoint_dir).expanduser() / "assets"
    return sorted(assets.rglob("norm_stats.json")) if assets.is_dir() else []


def find_tokenizer(checkpoint_dir: str | os.PathLike) -> pathlib.Path | None:
    """A PaliGemma tokenizer in the checkpoint or OpenPI's cache, if one is there."""
    ckpt = pathlib.Path(checkpoint_dir).expanduser()
    home = pathlib.Path(os.environ.get("OPENPI_DATA_HOME", "~/.cache/openpi")).expanduser()
    for cand in (ckpt / TOKENIZER_FILE, ckpt / "assets" / TOKENIZER_FILE, home / "big_vision" / TOKENIZER_FILE):
        if cand.is_file():
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def convert_checkpoint(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "keep",
    lora_scaling: float = 1.0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Convert and write; returns the manifest."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    out = pathlib.Path(output_dir).expanduser()
    if (out / W.WEIGHTS_FILE).exists() and not overwrite:
        raise FileExistsError(f"{str(out / W.WEIGHTS_FILE)!r} already exists; pass --overwrite to replace it")
    cfg, params, info = read_openpi_checkpoint(checkpoint_dir, lora_scaling=lora_scaling, progress=progress)
    if DTYPES[dtype] is not None:
        params = {k: v.to(DTYPES[dtype]) for k, v in params.items()}
    norm_files = find_norm_stats(checkpoint_dir)
    copied = []
    for f in norm_files:
        rel = f.relative_to(pathlib.Path(checkpoint_dir).expanduser())
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out / rel)
        copied.append(str(rel))
    tok = find_tokenizer(checkpoint_dir)
    if tok is not None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tok, out / TOKENIZER_FILE)
    if progress:
        log.info("writing %s (%d tensors, variant %s) ...", out / W.WEIGHTS_FILE, len(params), cfg.name)
    extra = {
        "source_format": info["source_format"],
        "training_state": info["training_state"],
        "lora_merged": info["lora_merged"],
        "norm_stats": copied,
        "tokenizer": TOKENIZER_FILE if tok is not None else None,
    }
    return W.save_weights(out, params, cfg, source=str(pathlib.Path(checkpoint_dir).expanduser().resolve()), extra=extra)


def save_openpi_checkpoint(params: dict[str, torch.Tensor], checkpoint_dir: str | os.PathLike, norm_stats: dict | None = None,
                           asset_id: str = "trossen", training_state: bool = False) -> pathlib.Path:
    """Write canonical params as a real OpenPI-layout Orbax checkpoint (tests and examples build these)."""
    import orbax.checkpoint as ocp

    ckpt = pathlib.Path(checkpoint_dir)
    tree = W.to_numpy_tree(params)
    if training_state:
        tree = _wrap_leaves(tree)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(str((ckpt / "params").resolve()), {"params": tree})
    if norm_stats is not None:
        d = ckpt / "assets" / asset_id
        d.mkdir(parents=True, exist_ok=True)
        (d / "norm_stats.json").write_text(json.dumps({"norm_stats": norm_stats}, indent=2))
    return ckpt


def _wrap_leaves(tree: dict) -> dict:
    return {k: _wrap_leaves(v) if isinstance(v, dict) else {"value": v} for k, v in tree.items()}
