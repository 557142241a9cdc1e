"""The prefix's fused QKV matmul with RoPE in its epilogue: x [M, D] @ W -> q (rotated) [M, NQ*HD] and the layer's
K (rotated) / V cache rows, instead of a cuBLAS matmul writing qkv and a separate RoPE pass reading it back.

Layout (made once at load by `interleave_rope_pairs`): w [(NQ+2)*HD, D], D contiguous. Within each head (q heads, k,
and v, which is rotated by angle 0) the columns are reordered so that column 2j is dimension j and 2j + 1 is its RoPE
partner j + HD/2. A tile of BN columns (BN divides HD) then holds BN/2 rotation pairs whose two members sit in the same thread of
the MMA accumulator, and the rotation happens on the float32 accumulator. Same math as rope_qkv after a matmul (the
row norm in x, (1 + scale) and HD^-0.5 in the weights: rmsnorm_qkv_rope.fold_qkv), without the bf16 rounding between.
Persistent TMA matmul as kernels/gemm_geglu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pi0_triton_policy.kernels.gemm_geglu import _num_sms, _tile_coords, _tile_matmul_nt


@triton.jit
def _gemm_rope_qkv_kernel(a_desc, b_desc, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, M, N, K, stride_q, stride_kv,
                          NQ: tl.constexpr, HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          GROUP_M: tl.constexpr, STAGES: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    HALF: tl.constexpr = HD // 2
    PAIRS: tl.constexpr = BN // 2
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = _tile_matmul_nt(a_desc, b_desc, pid_m, pid_n, K, BM, BN, BK, STAGES)
        rows = pid_m * BM + tl.arange(0, BM)
        row_ok = (rows < M)[:, None]
        head = (pid_n * BN) // HD
        # pairs (d, d + HD/2), d from (the tile's first column within its head) / 2; v is interleaved the same way and
        # "rotated" by angle 0, so every tile takes one path (Triton 3.6's ttgir passes failed on a data-dependent
        # branch around the split accumulator)
        x1, x2 = acc.reshape(BM, PAIRS, 2).split()
        d = ((pid_n * BN) % HD) // 2 + tl.arange(0, PAIRS)
        rot = head <= NQ
        pos = tl.load(pos_ptr + rows, mask=rows < M, other=0).to(tl.int64)
        c = tl.where(rot, tl.load(cos_ptr + pos[:, None] * HALF + d[None, :]), 1.0)
        s = tl.where(rot, tl.load(sin_ptr + pos[:, None] * HALF + d[None, :]), 0.0)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if head < NQ:
            base = q_ptr + head * HD
            stride = stride_q
        elif head == NQ:
            base = k_ptr
            stride = stride_kv
        else:
            base = v_ptr
            stride = stride_kv
        dst = base + rows.to(tl.int64)[:, None] * stride + d[None, :]
        tl.store(dst, o1.to(dst.dtype.element_ty), mask=row_ok)
        tl.store(dst + HALF, o2.to(dst.dtype.element_ty), mask=row_ok)


def interleave_rope_pairs(w: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """fold_qkv's [D, (NQ+2)*HD] -> [(NQ+2)*HD, D]: in every head (q heads, k and v) column 2j = dimension j,
    2j + 1 = j + HD/2."""
    D, N = w.shape
    assert N == (num_heads + 2) * head_dim
    half = head_dim // 2
    pair = torch.stack((torch.arange(half), torch.arange(half) + half), 1).reshape(-1)  # 0, h, 1, h + 1, ...
    perm = torch.cat([h * head_dim + pair for h in range(num_heads + 2)]).to(w.device)
    return w.t()[perm].contiguous()


def gemm_rope_qkv(x, w_il, pos, cos, sin, q, k, v, num_heads: int, head_dim: int, block=(64, 128, 64), num_warps: int = 4,
                  num_stages: int = 4, group_m: int = 8):
    """x [M, D] @ w_il (interleave_rope_pairs) -> q [M, NQ*HD] and k / v rows [M, HD] (rows may be strided), q and k
    rotated at positions pos [M] with the float32 tables cos / sin [max_pos, HD/2]."""
    M, K = x.shape
    N, K2 = w_il.shape
    BM, BN, BK = block
    BN = min(BN, head_dim)  # a tile never straddles two heads
    assert K == K2 and N == (num_heads + 2) * head_dim and head_dim % BN == 0 and x.stride(1) == 1 and w_il.is_contiguous()
    assert q.shape[0] >= M and k.shape[0] >= M and k.stride() == v.stride() and q.stride(1) == 1 and k.stride(1) == 1
    a_desc = TensorDescriptor.from_tensor(x, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(w_il, [BN, BK])
    nprog = min(triton.cdiv(M, BM) * triton.cdiv(N, BN), _num_sms(x.device))
    _gemm_rope_qkv_kernel[(nprog,)](a_desc, b_desc, pos, cos, sin, q, k, v, M, N, K, q.stride(0), k.stride(0),
                                    NQ=num_heads, HD=head_dim, BM=BM, BN=BN, BK=BK, GROUP_M=group_m, STAGES=num_stages,
                                    NUM_PROGRAMS=nprog, num_warps=num_warps)
    return q, k, v
