"""Convert an OpenPI Pi0 checkpoint into this project's weight files.

    python scripts/convert_checkpoint.py --checkpoint-dir ~/.cache/openpi/openpi-assets/checkpoints/pi0_aloha_sim \
        --output-dir weights/pi0_aloha_sim

Reads Orbax `params/` (full, LoRA or training-state trees) or OpenPI's PyTorch export, infers the variant
from tensor shapes, writes `model.safetensors` + `manifest.json`, copies `assets/*/norm_stats.json` and
the tokenizer when found. Never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Literal

import tyro

from pi0_triton_policy.convert import convert_checkpoint
from pi0_triton_policy.weights import CheckpointError


@dataclasses.dataclass
class Args:
    checkpoint_dir: str
    """OpenPI checkpoint directory (holding params/ and assets/), or an OpenPI PyTorch export directory."""
    output_dir: str
    """Where to write model.safetensors, manifest.json and the copied assets (e.g. weights/pi0_aloha_sim)."""
    dtype: Literal["keep", "float32", "bfloat16"] = "keep"
    """Storage dtype of the converted tensors; `keep` keeps the checkpoint's."""
    lora_scaling: float = 1.0
    """alpha / rank of a LoRA tree (OpenPI's LoRA variants all use 1.0)."""
    overwrite: bool = False
    """Replace an existing model.safetensors in output_dir."""


def main(args: Args) -> int:
    # orbax/jax log every step at INFO; show only ours.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pi0_triton_policy").setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        manifest = convert_checkpoint(
            args.checkpoint_dir, args.output_dir, dtype=args.dtype, lora_scaling=args.lora_scaling, overwrite=args.overwrite
        )
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("variant", "dtype", "num_params", "sha256", "norm_stats", "lora_merged")}
    summary["lora_merged"] = len(summary["lora_merged"])
    print(json.dumps(summary, indent=2))
    print(f"converted in {time.perf_counter() - t0:.1f} s -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
