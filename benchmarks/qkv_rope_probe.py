"""The prefix's QKV matmul + RoPE: the engine's cuBLAS matmul followed by the Triton RoPE pass (rope_qkv), against
kernels/gemm_rope_qkv.py (persistent TMA matmul with the rotation in its epilogue) at M = 304 / 560 / 816 rows (1 / 2 /
3 cameras), D = 2048, 8 q heads + k + v of 256, random bf16 weights. q, k and v against the float32 reference (the
error reported is the largest of the three); each timed as 20 calls in a CUDA graph.

    python benchmarks/qkv_rope_probe.py [--json out.json] [--configs '[[BM, BN, BK, warps, stages, group_m], ...]']
"""

from __future__ import annotations

import torch

from pi0_triton_policy.kernels import gemm_rope_qkv as GR, rmsnorm_qkv_rope as RQR, rope_qkv as RK
from sdpa_probe import configs_start, fastest, finish, measure  # noqa: E402 (benchmarks/ is the script's directory)

CONFIGS = [(64, 128, 64, 4, 4, 8), (64, 128, 64, 4, 5, 8), (128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8),
           (64, 256, 64, 4, 4, 8), (128, 256, 64, 8, 3, 8), (64, 128, 128, 4, 3, 8), (32, 128, 64, 4, 4, 8)]


def main():
    args, configs, res, g = configs_start(CONFIGS)
    bf, dev = torch.bfloat16, "cuda"
    D, NQ, HD = 2048, 8, 256
    w = (torch.randn(D, (NQ + 2) * HD, device=dev, generator=g) * D**-0.5).to(bf)
    w_il = GR.interleave_rope_pairs(w, NQ, HD)
    cos, sin = RQR.rope_tables(1024, HD, device=dev)
    for V in (1, 2, 3):
        M = 256 * V + 48
        x = torch.randn(M, D, device=dev, generator=g).to(bf)
        pos = torch.arange(M, device=dev, dtype=torch.int32)
        qr, kr, vr = RK.rope_qkv_ref(x.float() @ w.float(), pos, NQ, HD)
        ref = torch.cat([qr, kr, vr], 1)
        qkv = torch.empty(M, (NQ + 2) * HD, dtype=bf, device=dev)
        out = torch.empty(M, (NQ + 2) * HD, dtype=bf, device=dev)  # q | k | v side by side (strided k / v views)
        q, k, v = out[:, :NQ * HD], out[:, NQ * HD:(NQ + 1) * HD], out[:, (NQ + 1) * HD:]

        def cublas_rope():
            torch.mm(x, w, out=qkv)
            RK.rope_qkv(qkv, pos, cos, sin, q, k, v, NQ, HD)

        runs = {"cublas+rope": cublas_rope}
        for c in configs:
            runs[str(c)] = (lambda c=c: GR.gemm_rope_qkv(x, w_il, pos, cos, sin, q, k, v, NQ, HD, block=c[:3], num_warps=c[3],
                                                         num_stages=c[4], group_m=c[5]))
        res["rows"] += measure("qkv_rope", V, runs, out, ref, calls=1)
    print("\nviews  best (us per call)")
    for V in (1, 2, 3):
        base = next(r for r in fastest(res, "qkv_rope", V, top=None) if r["impl"] == "cublas+rope")
        print(f"{V}      cublas+rope {base['us_per_call']:.1f} | " +
              "  ".join(f"{r['impl']} {r['us_per_call']:.1f}" for r in fastest(res, "qkv_rope", V)))
    finish(res, args.json)


if __name__ == "__main__":
    main()
