"""Matmul + bias + residual add, in place on the float32 residual stream, with deterministic split-K.

res[M, N] += a[M, K] @ w[K, N] (+ bias[N])
Used for every attention-output and MLP-down projection (SigLIP, Gemma prefix, action expert).
At M ~ 50 (the action expert) the matmul is memory-bound and N = 1024 gives too few tiles to keep
132 SMs streaming weights, so K is split: each split writes an fp32 partial, and the last program of a
tile to arrive sums them in fixed order (see `_common.arrive_last`) and applies bias + residual.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import arrive_last, default_workspace


@triton.jit
def _linear_residual_kernel(
    a_ptr, w_ptr, bias_ptr, res_ptr, ws_ptr, cnt_ptr,  # a [M,K], w [K,N], bias [N], res [M,N] fp32, ws [S,M,N] fp32
    M, N, K, K_PER_SPLIT, stride_am, stride_rm,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w)
    mask = m_ok[:, None] & n_ok[None, :]
    r_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :].to(tl.float32)
        acc += tl.load(r_ptrs, mask=mask, other=0.0)
        tl.store(r_ptrs, acc, mask=mask)
    else:
        mn = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + mn, acc, mask=mask)
        if arrive_last(cnt_ptr + pid_m * tl.num_programs(1) + pid_n, SPLIT_K):
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                tot += tl.load(ws_ptr + s * M * N + mn, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :].to(tl.float32)
            tot += tl.load(r_ptrs, mask=mask, other=0.0)
            tl.store(r_ptrs, tot, mask=mask)


def linear_residual(a: torch.Tensor, w: torch.Tensor, res: torch.Tensor, bias: torch.Tensor | None = None,
                    split_k: int = 1, block=(64, 64, 64), num_warps: int = 4, num_stages: int = 3, workspace=None) -> torch.Tensor:
    """res += a @ w (+ bias), in place. a [M, K] (rows may be strided), w [K, N] contiguous, res [M, N] fp32."""
    M, K = a.shape
    K2, N = w.shape
    assert K == K2 and res.shape == (M, N) and res.dtype == torch.float32, (a.shape, w.shape, res.shape)
    assert a.stride(1) == 1 and res.stride(1) == 1 and w.is_contiguous()
    BM, BN, BK = block
    split_k = max(1, min(split_k, triton.cdiv(K, BK)))  # no empty splits (small test models)
    k_per = triton.cdiv(triton.cdiv(K, split_k), BK) * BK
    split_k = triton.cdiv(K, k_per)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), split_k)
    ws, cnt = (workspace or default_workspace(a.device)).need(split_k * M * N if split_k > 1 else 1, grid[0] * grid[1])
    _linear_residual_kernel[grid](a, w, bias if bias is not None else res, res, ws, cnt, M, N, K, k_per,
                                  a.stride(0), res.stride(0), HAS_BIAS=bias is not None, SPLIT_K=split_k,
                                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=num_warps, num_stages=num_stages)
    return res


def linear_residual_ref(a, w, res, bias=None):
    out = res.float() + (a.float() @ w.float())
    return out + bias.float() if bias is not None else out
