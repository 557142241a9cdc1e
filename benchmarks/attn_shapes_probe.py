"""Launch shapes of the prefix and vision attention kernels and of the patch embedding at the engine's sizes (1, 2, 3
cameras), and the vision kernel's split head dim (72 = 64 + 16 instead of padding to 128). Each config once against
the float32 reference, then timed as 17 (prefix) / 27 (vision) chained calls in a CUDA graph, the way the engine runs
them (the patch embedding: 1 call per graph node, 20 nodes).

    python benchmarks/attn_shapes_probe.py [--json out.json] [--prefix '[[BM, BN, warps, stages, split, tma], ...]']
        [--vision '[[BM, BN, warps, stages, split_d, tma], ...]'] [--patch '[[BM, BN, BK, warps], ...]']
"""

from __future__ import annotations

import argparse

import torch

from pi0_triton_policy.kernels import patch_embed as PE, prefix_attention as PA, vision_attention as VA
from sdpa_probe import (  # noqa: E402 (benchmarks/ is the script's directory)
    configs_arg, fastest, finish, measure, prefix_inputs, start, vision_inputs)

# (BM, BN, warps, stages[, split[, tma]]): split > 1 = split-KV, the key blocks shared out over that many programs per
# (row block, head) and merged by the last (1 cam: 5 row blocks x 8 heads = 40 programs without it; measured slower
# everywhere, session13/attn_split); tma 1 = the tiles through tensor descriptors
PREFIX = [(64, 64, 4, 2, 1, 0), (64, 64, 4, 2, 1, 1), (64, 64, 4, 3, 1, 1), (128, 64, 8, 2, 1, 1), (64, 32, 4, 3, 1, 1),
          (64, 32, 4, 4, 1, 1), (32, 64, 4, 2, 1, 1), (64, 64, 8, 2, 1, 1), (128, 64, 8, 2, 1, 0), (64, 64, 4, 2, 2, 0)]
# (BM, BN, warps, stages, split_d[, tma])
VISION = [(64, 64, 4, 3, False, 0), (64, 64, 4, 3, False, 1), (64, 64, 4, 2, False, 1), (64, 64, 4, 4, False, 1),
          (64, 64, 4, 3, True, 1), (64, 64, 4, 4, True, 1), (64, 64, 4, 2, True, 1), (128, 128, 8, 2, True, 1),
          (64, 64, 8, 3, True, 1), (32, 32, 4, 3, True, 1), (32, 32, 4, 4, False, 1), (128, 128, 8, 2, False, 1)]
PATCH = [(64, 64, 32, 4), (32, 64, 32, 4), (32, 32, 32, 4), (64, 32, 32, 4), (16, 64, 32, 4), (32, 64, 64, 4), (32, 128, 32, 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--prefix", default=None)
    ap.add_argument("--vision", default=None)
    ap.add_argument("--patch", default=None)
    ap.add_argument("--only", nargs="*", default=["prefix", "vision", "patch"], help="phases to time")
    args = ap.parse_args()
    cfgs = {name: configs_arg(getattr(args, name), default)
            for name, default in (("prefix", PREFIX), ("vision", VISION), ("patch", PATCH))}
    dev = "cuda"
    res, g = start(dev)
    for V in (1, 2, 3):
        q, k, v, valid, ref, out, nh = prefix_inputs(V, g)
        runs = {str(c): (lambda c=c: PA.prefix_attention(q, k, v, valid, nh, out=out, block=c[:2], num_warps=c[2],
                                                         num_stages=c[3], split=c[4] if len(c) > 4 else 1,
                                                         tma=bool(c[5]) if len(c) > 5 else False))
                for c in cfgs['prefix']}
        if "prefix" in args.only:
            res["rows"] += measure("prefix", V, runs, out, ref, calls=17)
        qkv, vref, vout, nhv = vision_inputs(V, g)
        runs = {str(c): (lambda c=c: VA.vision_attention(qkv, V, nhv, out=vout, block=c[:2], num_warps=c[2],
                                                         num_stages=c[3], split_d=c[4],
                                                         tma=bool(c[5]) if len(c) > 5 else False))
                for c in cfgs['vision']}
        if "vision" in args.only:
            res["rows"] += measure("vision", V, runs, vout, vref, calls=27)
        img = torch.rand(V, 224, 224, 3, device=dev, generator=g) * 2 - 1
        pw = torch.randn(14 * 14 * 3, 1152, device=dev, generator=g) * 0.04
        padd = torch.randn(256, 1152, device=dev, generator=g)
        pref = PE.patch_embed_ref(img, pw, padd)
        pout = torch.empty(V * 256, 1152, device=dev)
        runs = {str(c): (lambda c=c: PE.patch_embed(img, pw, padd, out=pout, block=c[:3], num_warps=c[3]))
                for c in cfgs["patch"]}
        if "patch" in args.only:
            res["rows"] += measure("patch", V, runs, pout, pref, calls=1)
    print("\nphase   views  best configs (us per call)")
    for phase in args.only:
        for V in (1, 2, 3):
            print(f"{phase:7s} {V}      " + "  ".join(f"{r['impl']} {r['us_per_call']:.2f}" for r in fastest(res, phase, V)))
    finish(res, args.json)


if __name__ == "__main__":
    main()
