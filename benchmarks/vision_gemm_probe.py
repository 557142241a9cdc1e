"""SigLIP's four matmuls per layer at 1 / 2 / 3 cameras (M = 256 / 512 / 768 rows): the engine's cuBLAS calls against
kernels/gemm_splitk.py (persistent TMA matmul, split-K with a fixed-order sum, bias / GELU / residual epilogues).

Each op is timed as 27 calls in a CUDA graph, one per layer with that layer's own random weights (so, as in the
engine, the weights come from DRAM, not from L2). The o and fc2 projections are timed together with the norm that
follows them in the engine: cuBLAS mm + add_norm(x += y + b, LayerNorm) against the residual epilogue + a norm-only
add_norm. Errors are max-abs relative to the float32 reference of one call.

    python benchmarks/vision_gemm_probe.py [--json out.json] [--views 1 2 3] [--ops qkv o fc1 fc2]
        [--configs '[[BM, BN, BK, warps, stages, split], ...]'] [--splits 2 3 4] [--no-triton] [--transposed]
        [--wgmma [BN ...]] [--wgmma-split BN:S ...] [--split-dtype f32 bf16]
"""

from __future__ import annotations

import argparse

import torch

from pi0_triton_policy.kernels import add_norm as AN, gemm_splitk as GSK, wgmma_linear as WL
from sdpa_probe import configs_arg, finish, rel, start  # noqa: E402 (benchmarks/ is the script's directory)
from stack_probe import time_graph  # noqa: E402

D, F, LAYERS = 1152, 4304, 27
OPS = {"qkv": (D, 3 * D, "none"), "o": (D, D, "residual"), "fc1": (D, F, "gelu"), "fc2": (F, D, "residual")}
# the Gemma prefix's o / down projections (256 * views + 48 rows; 17 layers in the engine, timed as 27 like the rest;
# LayerNorm instead of RMSNorm after them: the same kernel)
PREFIX_OPS = {"pre_o": (2048, 2048, "residual"), "pre_down": (16384, 2048, "residual")}
SHAPES = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 4), (64, 256, 64, 4, 3),
          (128, 256, 64, 8, 3)]
SPLITS = [1, 2, 3, 4, 6, 8]


def candidates(M, K, N, sms):
    """Shapes x splits whose unit count fills the SMs without a long second wave (split 1 always kept)."""
    out = []
    for bm, bn, bk, nw, ns in SHAPES:
        tiles = -(-M // bm) * -(-N // bn)
        for s in SPLITS:
            units = tiles * s
            if s == 1 or (units <= 2 * sms and -(-K // bk) >= 2 * s):
                out.append((bm, bn, bk, nw, ns, s))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--ops", nargs="+", default=list(OPS), help=f"of {list(OPS) + list(PREFIX_OPS)}")
    ap.add_argument("--configs", default=None)
    ap.add_argument("--splits", type=int, nargs="*", default=[2, 3, 4],
                    help="o / fc2: cuBLAS split over K as one batched call (add_norm.mm_split_k) + add_norm of the parts")
    ap.add_argument("--no-triton", action="store_true", help="cuBLAS rows only (no gemm_splitk configs)")
    ap.add_argument("--transposed", action="store_true",
                    help="also cuBLAS on weights stored [N, K] (used as w.t(): the 'TN' layout, other kernels)")
    ap.add_argument("--wgmma", type=int, nargs="*", default=None,
                    help="kernels/wgmma_linear.py (weights stored [N, K]) with its one-wave tile width, and with "
                         "each width given here")
    ap.add_argument("--wgmma-split", nargs="*", default=[],
                    help="o / fc2: wgmma_linear split over K, 'BN:S' (BN 0: its one-wave width for S parts), the S "
                         "partial products summed by the add_norm that follows (+ the bias there)")
    ap.add_argument("--split-dtype", nargs="+", default=["f32"], choices=["f32", "bf16"],
                    help="the partial products' dtype for --wgmma-split")
    args = ap.parse_args()
    bf, dev = torch.bfloat16, "cuda"
    res, g = start(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    ws = GSK.default_workspace(dev)
    for op in args.ops:
        K, N, act = {**OPS, **PREFIX_OPS}[op]
        w = [(torch.randn(K, N, device=dev, generator=g) * K**-0.5).to(bf) for _ in range(LAYERS)]
        b = [(torch.randn(N, device=dev, generator=g) * 0.1).to(bf) for _ in range(LAYERS)]
        for V in args.views:
            M = 256 * V + (48 if op in PREFIX_OPS else 0)
            a = torch.randn(M, K, device=dev, generator=g).to(bf)
            x0 = torch.randn(M, N, device=dev, generator=g)
            x, xn, y = x0.clone(), torch.empty(M, N, dtype=bf, device=dev), torch.empty(M, N, dtype=bf, device=dev)
            ref = GSK.gemm_splitk_ref(a, w[0], b[0], act, x0)
            if act == "residual":
                ref = torch.nn.functional.layer_norm(ref, (N,), eps=1e-6)

            def check(fn):
                x.copy_(x0)
                xn.fill_(float("nan"))
                y.fill_(float("nan"))
                fn(0)
                torch.cuda.synchronize()
                return rel(xn if act == "residual" else y, ref)

            def cublas(i=0, w=w):  # w: the layers' weights ([K, N] storage, or [N, K] for --transposed)
                if act == "none":
                    torch.addmm(b[i], a, w[i], out=y)
                elif act == "gelu":
                    torch._addmm_activation(b[i], a, w[i], use_gelu=True, out=y)
                else:
                    torch.mm(a, w[i], out=y)
                    AN.add_norm(x, xn, y, b[i], norm="layer")

            def ours(i, c):  # i: the layer (time_graph's warm-up call passes none)
                GSK.gemm_splitk(a, w[i], out=y, bias=b[i], act=act, res=x if act == "residual" else None,
                                block=c[:3], num_warps=c[3], num_stages=c[4], split=c[5], workspace=ws)
                if act == "residual":
                    AN.add_norm(x, xn, norm="layer")

            configs = [] if args.no_triton else configs_arg(args.configs, None) or candidates(M, K, N, sms)
            runs = {"cublas": cublas, **{str(c): (lambda i=0, c=c: ours(i, c)) for c in configs}}
            if args.transposed:
                wt = [m.t().contiguous().t() for m in w]  # same values, [N, K] storage
                runs["cublas_T"] = lambda i=0: cublas(i, wt)
            if args.wgmma is not None:
                wnk = [m.t().contiguous() for m in w]  # [N, K] storage
                bf32 = [v.float() for v in b]

                def wgmma(i=0, bn=None):  # residual ops: the bias in the matmul's epilogue, then add_norm as cuBLAS's
                    WL.wgmma_linear(a, wnk[i], bf32[i], out=y, gelu=act == "gelu", bn=bn)
                    if act == "residual":
                        AN.add_norm(x, xn, y, norm="layer")
                for bn in [None] + args.wgmma:
                    runs[f"wgmma{bn or WL.one_wave_width(M, N, sms)}"] = (lambda i=0, bn=bn: wgmma(i, bn))
            if act == "residual" and args.wgmma_split:
                wnk = [m.t().contiguous() for m in w]
                for spec in args.wgmma_split:
                    bn, S = (int(v) for v in spec.split(":"))
                    bn = bn or WL.one_wave_width(M, N, sms, S)
                    for dt in args.split_dtype:
                        parts = torch.empty(S, M, N, dtype=torch.float32 if dt == "f32" else bf, device=dev)

                        def wgmma_split(i=0, bn=bn, S=S, parts=parts):
                            WL.wgmma_linear(a, wnk[i], None, out=parts, bn=bn, split=S)
                            AN.add_norm(x, xn, parts, b[i], norm="layer")
                        runs[f"wgmma{bn}_split{S}_{dt}"] = wgmma_split
            if act == "residual":
                for S in args.splits:
                    parts = torch.empty(S, M, N, dtype=bf, device=dev)

                    def cublas_split(i=0, S=S, parts=parts):
                        AN.mm_split_k(a, w[i], parts)
                        AN.add_norm(x, xn, parts, b[i], norm="layer")
                    runs[f"cublas_split{S}"] = cublas_split
            for name, fn in runs.items():
                try:
                    err = check(fn)
                    us = time_graph(fn, n_inner=LAYERS, indexed=True)
                    row = {"op": op, "views": V, "impl": name, "us_per_call": round(us, 2), "rel_err": err,
                           "tflops": round(2 * M * K * N / us / 1e6, 1)}
                except Exception as e:  # a shape that does not fit in shared memory
                    row = {"op": op, "views": V, "impl": name, "error": repr(e)[:200]}
                res["rows"].append(row)
                print(row, flush=True)
    print("\nop   views  cublas us  | best gemm_splitk (us, TFLOP/s, err)")
    for op in args.ops:
        for V in args.views:
            rows = [r for r in res["rows"] if r["op"] == op and r["views"] == V and "us_per_call" in r]
            cb = next((r for r in rows if r["impl"] == "cublas"), None)
            best = sorted((r for r in rows if r["impl"] != "cublas"), key=lambda r: r["us_per_call"])[:4]
            print(f"{op:4} {V}      {cb['us_per_call'] if cb else '-':>8}  | " +
                  "  ".join(f"{r['impl']} {r['us_per_call']} ({r['tflops']}, {r['rel_err']:.1e})" for r in best))
    finish(res, args.json)


if __name__ == "__main__":
    main()
