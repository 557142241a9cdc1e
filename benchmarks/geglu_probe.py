"""The prefix MLP's gate/up matmul + GeGLU: the engine's cuBLAS matmul followed by the Triton GeGLU pass, against
kernels/gemm_geglu.py (Triton TMA matmul with the gating in its epilogue) at M = 304 / 560 / 816 rows (1 / 2 / 3
cameras), K = 2048, 2F = 32768, random bf16 weights. Errors against the float32 reference; each timed as 20 calls
in a CUDA graph (the weight does not fit in L2, so every call streams it from DRAM, as in the engine).

    python benchmarks/geglu_probe.py [--json out.json] [--configs '[[BM, BN, BK, warps, stages, group_m, persistent, flatten, warp_specialize], ...]']

Rows "wgmma<stages>[p]": kernels/wgmma_geglu.py (CUDA wgmma, tokens as N) with $GEGLU_PROBE_WGMMA_STAGES (default
3,4), persistent (p: one program per SM) or one program per tile.
$GEGLU_PROBE_PRECISE_EXP=1: the GeGLU epilogue with tl.exp (Triton's precise float32 expf) as before session 13,
for an A/B against the default exp2; $GEGLU_PROBE_NO_T=1: no gemm_geglu_t rows.

Rows named "t(...)" are `gemm_geglu_t` (the MMAs transposed: weight rows x tokens, 256 * views + 64 rows of MMA
instead of 128-row tiles' 256 * views + 128) with T_CONFIGS (BF, BT, BK, BTT, warps, stages, persistent).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels import gemm_geglu as GEG, geglu as GG, wgmma_geglu as WG
from sdpa_probe import configs_start, fastest, finish, measure  # noqa: E402 (benchmarks/ is the script's directory)

CONFIGS = [(128, 256, 64, 8, 3, 8, 1, 1, 0), (128, 256, 64, 8, 3, 4, 1, 1, 0), (128, 256, 64, 8, 3, 16, 1, 1, 0),
           (128, 256, 64, 8, 4, 8, 1, 1, 0), (128, 256, 64, 8, 3, 8, 1, 0, 1), (128, 256, 64, 8, 2, 8, 1, 0, 1),
           (64, 256, 64, 4, 4, 8, 1, 1, 0), (64, 256, 64, 4, 3, 8, 1, 1, 0), (128, 256, 64, 8, 3, 8, 1, 0, 0),
           (256, 128, 64, 8, 3, 8, 1, 1, 0), (128, 256, 64, 8, 3, 8, 0, 1, 0)]

WGMMA_STAGES = [int(s) for s in os.environ.get("GEGLU_PROBE_WGMMA_STAGES", "3,4").split(",")]
T_CONFIGS = [(64, 256, 64, 64, 8, 3, 1), (64, 256, 64, 64, 8, 3, 0), (64, 256, 32, 64, 8, 5, 1),
             (64, 256, 32, 64, 8, 6, 1), (64, 256, 32, 64, 8, 6, 0), (64, 256, 32, 64, 8, 7, 1)]


@triton.jit
def gelu_tanh_precise_exp(x):
    """_common.gelu_tanh as it was before session 13 (tl.exp: Triton's precise float32 expf), for the A/B below."""
    y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))


def main():
    if os.environ.get("GEGLU_PROBE_PRECISE_EXP") == "1":  # before anything compiles: the kernels resolve it then
        GEG.gelu_tanh = gelu_tanh_precise_exp
    args, configs, res, g = configs_start(CONFIGS)
    bf, dev = torch.bfloat16, "cuda"
    K, F = 2048, 16384
    w_gu = (torch.randn(K, 2 * F, device=dev, generator=g) * K**-0.5).to(bf)
    w_il = GEG.interleave_gate_up(w_gu)
    for V in (1, 2, 3):
        M = 256 * V + 48
        x = torch.randn(M, K, device=dev, generator=g).to(bf)
        ref = GG.geglu_ref(x.float() @ w_gu.float())
        gu = torch.empty(M, 2 * F, dtype=bf, device=dev)
        h = torch.empty(M, F, dtype=bf, device=dev)

        def cublas_geglu():
            torch.mm(x, w_gu, out=gu)
            GG.geglu(gu, out=h)

        runs = {"cublas+geglu": cublas_geglu}
        for c in configs:
            runs[str(c)] = (lambda c=c: GEG.gemm_geglu(x, w_il, out=h, block=c[:3], num_warps=c[3], num_stages=c[4],
                                                       group_m=c[5], persistent=bool(c[6]), flatten=bool(c[7]),
                                                       warp_specialize=bool(c[8])))
        for c in ([] if os.environ.get("GEGLU_PROBE_NO_T") == "1" else T_CONFIGS):
            runs[f"t{c}"] = (lambda c=c: GEG.gemm_geglu_t(x, w_il, out=h, block=c[:4], num_warps=c[4], num_stages=c[5],
                                                           persistent=bool(c[6])))
        if WG.available(dev):  # kernels/wgmma_geglu.py: the tokens as wgmma's N (no padded rows), per ring depth
            for st in WGMMA_STAGES:
                for pe in (1, 0):
                    runs[f"wgmma{st}{'p' if pe else ''}"] = (lambda st=st, pe=pe: WG.wgmma_geglu(x, w_il, out=h, stages=st,
                                                                                               persistent=bool(pe)))
        rows = measure("gate_up_geglu", V, runs, h, ref, calls=1)
        flop = 2 * M * K * 2 * F
        for r in rows:
            if "us_per_call" in r:
                r["tflops"] = round(flop / r["us_per_call"] / 1e6, 1)
        res["rows"] += rows
        mm_rows = measure("gate_up_mm_only", V, {"cublas": lambda: torch.mm(x, w_gu, out=gu)}, gu,
                          (x.float() @ w_gu.float()), calls=1)
        res["rows"] += mm_rows
    print("\nviews  best (us per call, TFLOP/s)")
    for V in (1, 2, 3):
        base = fastest(res, "gate_up_geglu", V, top=None)
        base = next(r for r in base if r["impl"] == "cublas+geglu")
        mm = next(r for r in res["rows"] if r["views"] == V and r["phase"] == "gate_up_mm_only")
        print(f"{V}      cublas+geglu {base['us_per_call']:.1f} (mm alone {mm.get('us_per_call')}) | " +
              "  ".join(f"{r['impl']} {r['us_per_call']:.1f} ({r['tflops']})" for r in fastest(res, "gate_up_geglu", V)))
    finish(res, args.json)


if __name__ == "__main__":
    main()
