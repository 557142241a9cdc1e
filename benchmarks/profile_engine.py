"""Where the triton engine's time goes, per phase (vision, prefix, action expert) and per kernel, on the GPU.

One eager `run()` of the engine (random full-size weights, 48-token prompt) under torch.profiler; kernels are put in
phases by launch order (vision: up to the token-embedding kernel, prefix: up to the action expert's first Triton kernel,
action: the rest). Kernel durations are what the GPU spent in each kernel; eager launch gaps are not counted, so
the phase sums are a bit under the graph replay's wall time (which also has the inter-kernel gaps).

    python benchmarks/profile_engine.py [--views 1 3] [--json out.json] [--top 12] [--graph]

--graph: one replay of the captured CUDA graph instead (PDL and launch gaps as the benchmark sees them): also the
timeline's idle time (wall minus the union of kernel intervals) per phase, step 0's span, and per flow-step boundary
the time from one persistent kernel's end to the next one's start with the kernels in between.
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


def union_us(iv: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us, as the profiler's time ranges)."""
    tot, cur_s, cur_e = 0, None, None
    for a, b in sorted(iv):
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                tot += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    return tot + (cur_e - cur_s if cur_e is not None else 0)


def graph_timeline(kern, phases) -> dict:
    """kern: the kernels of one graph replay (start-ordered), phases: their phases -> the timeline summary."""
    t0 = kern[0].time_range.start
    out = {"wall_us": max(e.time_range.end for e in kern) - t0, "phases": {}}
    for ph in ("vision", "prefix", "action"):
        ks = [e for e, p in zip(kern, phases) if p == ph]
        if not ks:
            continue
        a, b = ks[0].time_range.start, max(e.time_range.end for e in ks)
        busy = union_us([(e.time_range.start, e.time_range.end) for e in ks])
        out["phases"][ph] = {"span_us": b - a, "busy_us": busy, "idle_us": b - a - busy}
    megas = [i for i, e in enumerate(kern) if "mega_chain" in e.name]
    if megas:
        first_action = next(i for i, p in enumerate(phases) if p == "action")
        out["step0_us"] = kern[megas[0]].time_range.start - kern[first_action].time_range.start
        out["mega_us"] = [kern[i].time_range.elapsed_us() for i in megas]
        out["boundaries"] = []
        for i, j in zip(megas, megas[1:]):
            between = [(kern[k].name[:40], round(kern[k].time_range.elapsed_us(), 2)) for k in range(i + 1, j)]
            out["boundaries"].append({"gap_us": kern[j].time_range.start - kern[i].time_range.end,
                                      "kernels": between})
        last = megas[-1]
        out["after_last_mega_us"] = max(e.time_range.end for e in kern) - kern[last].time_range.end
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--json", default=None)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--graph", action="store_true", help="profile one replay of the captured graph (see the docstring)")
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
    eng = TritonPi0(cfg, params, device="cuda", use_graphs=args.graph)
    res = {"card": torch.cuda.get_device_name(), "views": {}}
    for V in args.views:
        a = to_torch(inputs(cfg, V, 48, seed=V), "cuda")
        a[0] = a[0].float()
        for _ in range(2):  # compile + warm
            eng.sample_actions_torch(*a)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            if args.graph:  # the benchmark's `replay` number: the captured graph alone
                eng.graph_for(V).graph.replay()
            else:
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
        wall = (max(e.time_range.end for e in kern) - kern[0].time_range.start) / 1000  # us -> ms
        print(f"\n{res['card']}  views={V}: {len(kern)} kernels, {sum(per_phase.values()) / 1000:.2f} ms of kernel time "
              f"({'graph replay' if args.graph else 'eager'} span {wall:.2f} ms)")
        tl = graph_timeline(kern, phases) if args.graph else None
        if tl:
            for ph, v in tl["phases"].items():
                print(f"  {ph:7s} span {v['span_us']:8.1f} us  busy {v['busy_us']:8.1f}  idle {v['idle_us']:7.1f}")
            if "mega_us" in tl:
                gaps = [b["gap_us"] for b in tl["boundaries"]]
                print(f"  step 0 (first action kernel -> first persistent kernel) {tl['step0_us']:.1f} us; persistent "
                      f"kernels {min(tl['mega_us']):.1f}..{max(tl['mega_us']):.1f} us; between them {min(gaps):.1f}.."
                      f"{max(gaps):.1f} us (median {sorted(gaps)[len(gaps) // 2]:.1f}); after the last {tl['after_last_mega_us']:.1f} us")
                print(f"  one boundary: {tl['boundaries'][len(gaps) // 2]['kernels']}")
        for ph in ("vision", "prefix", "action"):
            print(f"  {ph:7s} {per_phase[ph] / 1000:7.3f} ms")
        rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
        print(f"  top {args.top} kernels (phase, name, total us, calls, us per call):")
        for (ph, n), (us, c) in rows[:args.top]:
            print(f"    {ph:7s} {n:60s} {us:9.1f} {c:5d} {us / c:7.2f}")
        res["views"][V] = {"phase_ms": {k: v / 1000 for k, v in per_phase.items()}, "timeline": tl,
                           "kernels": [{"phase": ph, "name": n, "us": us, "calls": c} for (ph, n), (us, c) in rows]}
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
