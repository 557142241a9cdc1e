"""RoPE after a cuBLAS QKV matmul: split the fused [q heads | k | v] rows, rotate q and k (split-half
layout, float32 tables), write q and the layer's K/V cache rows. The row norm scale is already in the
matmul input (add_norm), (1 + scale) and head_dim^-0.5 in the weights (rmsnorm_qkv_rope.fold_qkv)."""

from __future__ import annotations

import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import HAS_PDL, gdc_launch_dependents, gdc_wait, pdl_kwargs


@triton.jit
def _rope_qkv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, stride_qkv, stride_q, stride_kv,
                     NQ: tl.constexpr, HD: tl.constexpr, PDL: tl.constexpr = False, INTERLEAVED: tl.constexpr = False):
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel's writes
        gdc_wait()
        gdc_launch_dependents()
    row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    d = tl.arange(0, HALF)
    src = qkv_ptr + row * stride_qkv + head * HD
    if INTERLEAVED:  # gemm_rope_qkv's column order (every head, v too): pair j at columns 2j, 2j + 1
        x1, x2 = tl.load(src + 2 * d[:, None] + tl.arange(0, 2)[None, :]).to(tl.float32).split()
    else:
        x1 = tl.load(src + d).to(tl.float32)
        x2 = tl.load(src + HALF + d).to(tl.float32)
    if head <= NQ:
        pos = tl.load(pos_ptr + row).to(tl.int64)
        c = tl.load(cos_ptr + pos * HALF + d)
        s = tl.load(sin_ptr + pos * HALF + d)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
    else:
        o1 = x1
        o2 = x2
    if head < NQ:
        dst = q_ptr + row * stride_q + head * HD
    elif head == NQ:
        dst = k_ptr + row * stride_kv
    else:
        dst = v_ptr + row * stride_kv
    tl.store(dst + d, o1.to(dst.dtype.element_ty))
    tl.store(dst + HALF + d, o2.to(dst.dtype.element_ty))


def rope_qkv(qkv, pos, cos, sin, q, k, v, num_heads: int, head_dim: int, pdl: bool = False, interleaved: bool = False):
    """qkv [M, (NQ+2)*H] -> q [M, NQ*H], k/v rows [M, H] (rotated q, k). `interleaved`: the q / k columns of qkv are in
    gemm_rope_qkv.interleave_rope_pairs' order (the matmul ran on that layout)."""
    pdl = bool(pdl) and HAS_PDL and qkv.is_cuda
    M = qkv.shape[0]
    assert qkv.shape[1] == (num_heads + 2) * head_dim and qkv.stride(1) == 1 and k.stride() == v.stride()
    _rope_qkv_kernel[(M, num_heads + 2)](qkv, pos, cos, sin, q, k, v, qkv.stride(0), q.stride(0), k.stride(0),
                                         NQ=num_heads, HD=head_dim, num_warps=1, PDL=pdl, INTERLEAVED=interleaved,
                                         **pdl_kwargs(pdl))
    return q, k, v


def rope_qkv_ref(qkv, pos, num_heads: int, head_dim: int):
    from pi0_triton_policy.kernels.rmsnorm_qkv_rope import rope_ref

    M = qkv.shape[0]
    x = qkv.float().reshape(M, num_heads + 2, head_dim)
    q = rope_ref(x[:, :num_heads], pos).reshape(M, -1)
    k = rope_ref(x[:, num_heads : num_heads + 1], pos)[:, 0]
    return q, k, x[:, -1]
