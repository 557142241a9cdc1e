"""Where the triton engine's time goes, per phase (vision, prefix, action expert) and per kernel, on the GPU.

One eager `run()` of the engine (random full-size weights, 48-token prompt) under torch.profiler; kernels are put in
phases by launch order (vision: up to the token-embedding kernel, prefix: up to the action expert's first Triton kernel,
action: the rest). Kernel durations are what the GPU spent in each kernel; eager launch gaps are not counted, so
the phase sums are a bit under the graph replay's wall time (which also has the inter-kernel gaps).

    python benchmarks/profile_engine.py [--views 1 3] [--json out.json] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch


def phase_of(names: list[str]) -> list[str]:
    out, phase = [], "vision"
    for n in names:
        if phase == "vision" and "_embed_tokens_kernel" in n:
            phase = "prefix"
        elif phase == "prefix" and "_embed_tokens_kernel" not in n and any(a in n for a in ("_prep_rows_kernel", "_swish_in_kernel",
                                                                                            "_action_time_mlp_kernel")):
            phase = "action"
        out.append(phase)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--json", default=None)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    from benchmark import inputs, to_torch  # the benchmark's inputs (same seeds)

    from pi0_triton_policy.config import get_variant
    from pi0_triton_policy.triton_engine import TritonPi0
    from pi0_triton_policy.weights import random_params

    cfg = get_variant("pi0")
    params = random_params(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    eng = TritonPi0(cfg, params, device="cuda", use_graphs=False)
    res = {"card": torch.cuda.get_device_name(), "views": {}}
    for V in args.views:
        a = to_torch(inputs(cfg, V, 48, seed=V), "cuda")
        a[0] = a[0].float()
        for _ in range(2):  # compile + warm
            eng.sample_actions_torch(*a)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.sample_actions_torch(*a)
            torch.cuda.synchronize()
        kern = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name
                       and "Memset" not in e.name), key=lambda e: e.time_range.start)
        names = [e.name for e in kern]
        phases = phase_of(names)
        per_phase = collections.defaultdict(float)
        per_kernel = collections.defaultdict(lambda: [0.0, 0])
        for e, ph in zip(kern, phases):
            us = e.time_range.elapsed_us()
            per_phase[ph] += us
            k = per_kernel[(ph, e.name[:60])]
            k[0] += us
            k[1] += 1
        wall = (kern[-1].time_range.end - kern[0].time_range.start) / 1000
        print(f"\n{res['card']}  views={V}: {len(kern)} kernels, {sum(per_phase.values()) / 1000:.2f} ms of kernel time "
              f"(eager span {wall:.2f} ms)")
        for ph in ("vision", "prefix", "action"):
            print(f"  {ph:7s} {per_phase[ph] / 1000:7.3f} ms")
        rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
        print(f"  top {args.top} kernels (phase, name, total us, calls, us per call):")
        for (ph, n), (us, c) in rows[:args.top]:
            print(f"    {ph:7s} {n:60s} {us:9.1f} {c:5d} {us / c:7.2f}")
        res["views"][V] = {"phase_ms": {k: v / 1000 for k, v in per_phase.items()},
                           "kernels": [{"phase": ph, "name": n, "us": us, "calls": c} for (ph, n), (us, c) in rows]}
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
