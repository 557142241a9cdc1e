"""The engine's persistent action-expert kernel (kernels/mega_chain.py, the engine's build) under Nsight Compute, to
ask where its warps stall, per SASS instruction: does the instruction cache starve it ("no instruction" stalls in
straight-line code), as NOTES.md session 12's bloat probe suggested?

    ncu -k regex:mega_chain_kernel --launch-skip 11 --launch-count 1 --section WarpStateStats \
        --section SourceCounters -o mega python3 benchmarks/ncu_mega.py [--views 1]
    ncu -i mega.ncu-rep --page source --csv --print-source sass > mega_source.csv
    python3 benchmarks/ncu_mega.py --summarize mega_source.csv

Without graphs every call launches the kernel 10 times (flow step 0's STATE build, then steps 1..9), so
--launch-skip 11 profiles the second call's step 1. Random full-size bf16 weights."""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict


def run(views: int, calls: int):
    import torch

    sys.path.insert(0, "scripts")
    from benchmark import inputs, to_torch

    from pi0_triton_policy.config import get_variant
    from pi0_triton_policy.triton_engine import TritonPi0
    from pi0_triton_policy.weights import random_params

    cfg = get_variant("pi0")
    eng = TritonPi0(cfg, random_params(cfg, seed=0, device="cuda", dtype=torch.bfloat16), device="cuda",
                    use_graphs=False)
    a = to_torch(inputs(cfg, views, 48, seed=views), "cuda")
    a[0] = a[0].float()
    for _ in range(calls):
        eng.sample_actions_torch(*a)
    torch.cuda.synchronize()
    print("done", flush=True)


def _num(s: str) -> float:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0


def summarize(path: str, top: int = 25):
    """Sampled warp states per SASS instruction (the source page's 'Warp Stall Sampling' columns): totals by reason,
    the share of 'no instruction' stalls, and the instructions where they fall most."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f)]
    head_i = next(i for i, r in enumerate(rows) if any("Source" == c or "Address" == c for c in r))
    head, body = rows[head_i], rows[head_i + 1:]
    col = {c: i for i, c in enumerate(head)}
    print("columns:", ", ".join(head))
    reason_cols = [c for c in head if re.search(r"stall|Sampl", c, re.I)]
    totals = defaultdict(float)
    per_pc = []
    src_col = "Source" if "Source" in col else head[1]
    addr_col = "Address" if "Address" in col else head[0]
    for r in body:
        if len(r) < len(head):
            continue
        vals = {c: _num(r[col[c]]) for c in reason_cols}
        for c, v in vals.items():
            totals[c] += v
        per_pc.append((r[col[addr_col]], r[col[src_col]], vals))
    print(f"{len(per_pc)} instructions")
    for c in sorted(totals, key=lambda c: -totals[c]):
        print(f"  {c:60s} {totals[c]:12.0f}")
    ni = [c for c in reason_cols if re.search(r"no.?instruction", c, re.I)]
    allc = [c for c in reason_cols if re.search(r"Warp Stall Sampling \(All", c)]
    if ni and allc:
        n, a = totals[ni[0]], totals[allc[0]]
        print(f"'{ni[0]}' = {n:.0f} of {a:.0f} samples ({100 * n / max(a, 1):.1f} %)")
        print(f"top {top} instructions by '{ni[0]}':")
        for addr, src, vals in sorted(per_pc, key=lambda t: -t[2][ni[0]])[:top]:
            print(f"  {addr:>8s} {vals[ni[0]]:8.0f} / {vals[allc[0]]:8.0f}  {src[:90]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--summarize", metavar="CSV", help="summarise an exported source page instead of running")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        run(args.views, args.calls)


if __name__ == "__main__":
    main()
