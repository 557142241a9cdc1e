"""Action-expert attention: the engine's Triton kernel (kernels/action_attention.py, its per-camera launch shapes) vs
the CUDA C++ cluster kernel (kernels/cluster_attention.py), on the same inputs: error against the float32 reference,
determinism, and us per call for 18 calls (one per layer's K/V cache) chained with PDL in a CUDA graph.

    python benchmarks/attention_probe.py [--views 1 2 3] [--kc 64 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from pi0_triton_policy.kernels import action_attention as AA
from pi0_triton_policy.kernels import cluster_attention as CA
from pi0_triton_policy.kernels._common import Workspace
from stack_probe import time_graph  # noqa: E402 (benchmarks/ is the script's directory)

NQ, HD, L, S = 8, 256, 18, 51
TRITON_SHAPES = {1: (16, 128, 8, 2, 4, 0), 2: (16, 64, 8, 3, 8, 0), 3: (16, 128, 8, 2, 4, 0)}  # triton_engine.Tuning


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--kc", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--rows", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    res = {"card": torch.cuda.get_device_name(), "rows": []}
    print(f"card {res['card']}  (us per attention call, {L} calls chained with PDL)")
    wsp = Workspace(dev, numel=1 << 22)
    for V in args.views:
        T = 256 * V + 48
        TK = T + S
        kc = torch.randn(L, TK, HD, device=dev).to(bf)
        vc = torch.randn(L, TK, HD, device=dev).to(bf)
        valid = torch.ones(T, dtype=torch.int32, device=dev)
        valid[T - 11:] = 0  # a 37-token prompt in 48 slots
        for r0 in (0, 1):  # first flow step (state row included) and later steps
            R = S - r0
            q = (torch.randn(R, NQ * HD, device=dev) * HD**-0.5).to(bf)
            ref = AA.action_attention_ref(q, kc[0], vc[0], valid, T, r0, NQ)
            att = TRITON_SHAPES[V]
            o_tr = torch.empty(R, NQ * HD, dtype=bf, device=dev)

            def triton_call(i=0, o=o_tr):
                AA.action_attention(q, kc[i], vc[i], valid, T, r0, NQ, out=o, split=att[4], block=att[:2],
                                    num_warps=att[2], num_stages=att[3], workspace=wsp, pdl=True, preload=True,
                                    peel=bool(att[5]))

            triton_call()
            row = {"views": V, "row_start": r0, "triton_err": rel(o_tr, ref)}
            if r0 == 1:
                row["triton_us"] = time_graph(lambda: [triton_call(i) for i in range(L)]) / L
            for k, rw in [(k, rw) for k in args.kc for rw in args.rows]:
                kcp, cs = CA.plan(TK, k)
                name = f"cl{k}r{rw}"
                o1 = torch.empty(R, NQ * HD, dtype=bf, device=dev)
                o2 = torch.empty(R, NQ * HD, dtype=bf, device=dev)
                CA.cluster_attention(q, kc[0], vc[0], valid, T, r0, NQ, o1, kc=k, rows=rw, pdl=False)
                CA.cluster_attention(q, kc[0], vc[0], valid, T, r0, NQ, o2, kc=k, rows=rw, pdl=True)
                torch.cuda.synchronize()
                row[f"{name}_err"] = rel(o1, ref)
                row[f"{name}_det"] = bool(torch.equal(o1, o2))
                row[f"{name}_plan"] = (kcp, cs)
                if r0 == 1:
                    row[f"{name}_us"] = time_graph(
                        lambda: [CA.cluster_attention(q, kc[i], vc[i], valid, T, r0, NQ, o1, kc=k, rows=rw)
                                 for i in range(L)]) / L
            res["rows"].append(row)
            print(json.dumps({a: (round(b, 5) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
