"""Patch embedding (kernels/patch_embed.py) at the engine's shapes: tl.dot precision x block shape, us per call
(triton.testing.do_bench, median) and the error against the float32 reference, per camera count.

    python benchmarks/patch_embed_probe.py [--views 1 2 3]
"""

from __future__ import annotations

import argparse

import torch
import triton

from pi0_triton_policy.kernels import patch_embed as PE

CONFIGS = [("ieee", (64, 64, 32), 4), ("tf32x3", (64, 64, 32), 4), ("tf32x3", (32, 64, 32), 4),
           ("tf32x3", (64, 128, 32), 4), ("tf32x3", (128, 64, 32), 8), ("tf32x3", (64, 64, 64), 4),
           ("tf32", (64, 64, 32), 4), ("ieee", (32, 64, 32), 4), ("tf32x3", (32, 64, 64), 4),
           ("tf32x3", (16, 64, 64), 4), ("tf32x3", (32, 32, 64), 4), ("tf32x3", (32, 128, 32), 4),
           ("tf32x3", (16, 64, 32), 4), ("tf32x3", (32, 64, 128), 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    imgs = torch.rand(3, 224, 224, 3, device="cuda", generator=g) * 2 - 1
    w = torch.randn(588, 1152, device="cuda", generator=g) * 0.04
    add = torch.randn(256, 1152, device="cuda", generator=g)
    print(f"card {torch.cuda.get_device_name()}")
    for v in args.views:
        slots = torch.arange(v, dtype=torch.int32, device="cuda")
        ref = PE.patch_embed_ref(imgs[:v].double(), w.double(), add.double()).float()
        for prec, block, warps in CONFIGS:
            fn = lambda: PE.patch_embed(imgs, w, add, block=block, num_warps=warps, slots=slots, precision=prec)  # noqa: E731
            out = fn()
            err = float((out - ref).norm() / ref.norm())
            us = triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3
            print(f"views={v} {prec:7s} block={block} warps={warps}: {us:7.2f} us  rel err {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
