"""Final RMSNorm of the action expert + action_out_proj + the Euler step, one kernel.

v = n(x) @ W_out + b_out,  n(x) = x * rsqrt(mean(x^2) + eps) * (1 + final_norm)   ((1+s) folded into W_out)
x_t <- x_t + dt * v       (in place, float32)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import HAS_PDL, arrive_last, default_workspace, gdc_wait, pdl_kwargs


@triton.jit
def _action_out_euler_kernel(
    x_ptr, w_ptr, b_ptr, xt_ptr, ws_ptr, cnt_ptr,  # x [R, D] fp32, w [D, A] fp32, b [A], xt [R, A] fp32
    R, D, K_PER_SPLIT, stride_xm, dt, eps, zero_a_ptr, NZA, zero_b_ptr, NZB,
    A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = False,
    ZERO: tl.constexpr = False, ZBLK: tl.constexpr = 64,
):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, A)
    m_ok = offs_m < R
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(D, k_lo + K_PER_SPLIT)
    # the first weight block is an input of the whole inference: requested before waiting on the previous kernel
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + offs_k[:, None] * A + offs_a[None, :], mask=(offs_k < k_hi)[:, None], other=0.0)
    if PDL:
        gdc_wait()
    if ZERO:  # two int32 buffers the next kernels expect zeroed (the persistent kernel's counters, its norm sums)
        nprog = tl.num_programs(0) * tl.num_programs(1)
        z = (pid_k * tl.num_programs(0) + pid_m) * ZBLK + tl.arange(0, ZBLK)
        for z0 in range(0, tl.maximum(NZA, NZB), nprog * ZBLK):
            tl.store(zero_a_ptr + z0 + z, tl.zeros((ZBLK,), dtype=tl.int32), mask=z0 + z < NZA)
            tl.store(zero_b_ptr + z0 + z, tl.zeros((ZBLK,), dtype=tl.int32), mask=z0 + z < NZB)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, A), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        if k0 > k_lo:
            w = tl.load(w_ptr + offs_k[:, None] * A + offs_a[None, :], mask=k_ok[:, None], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        ss += tl.sum(x * x, 1)
        acc += tl.dot(x, w)
    if SPLIT > 1:  # partial (acc, ss) of this K range; the last program of the row block sums them in fixed order
        rows = tl.num_programs(0) * BLOCK_M
        base = ws_ptr + (pid_k * rows + offs_m)[:, None] * (A + 1)
        tl.store(base + offs_a[None, :], acc)
        tl.store(ws_ptr + (pid_k * rows + offs_m) * (A + 1) + A, ss)
        if arrive_last(cnt_ptr + pid_m, SPLIT):
            acc = tl.zeros((BLOCK_M, A), dtype=tl.float32)
            ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for s_ in tl.static_range(SPLIT):
                part = ws_ptr + (s_ * rows + offs_m)[:, None] * (A + 1)
                acc += tl.load(part + offs_a[None, :], cache_modifier=".cg")
                ss += tl.load(ws_ptr + (s_ * rows + offs_m) * (A + 1) + A, cache_modifier=".cg")
            _euler_update(acc, ss, offs_m, m_ok, offs_a, b_ptr, xt_ptr, D, dt, eps, A)
    else:
        _euler_update(acc, ss, offs_m, m_ok, offs_a, b_ptr, xt_ptr, D, dt, eps, A)


@triton.jit
def _euler_update(acc, ss, offs_m, m_ok, offs_a, b_ptr, xt_ptr, D, dt, eps, A: tl.constexpr):
    v = acc / tl.sqrt(ss / D + eps)[:, None] + tl.load(b_ptr + offs_a)[None, :]
    ptrs = xt_ptr + offs_m[:, None] * A + offs_a[None, :]
    xt = tl.load(ptrs, mask=m_ok[:, None], other=0.0)
    tl.store(ptrs, xt + dt * v, mask=m_ok[:, None])


def action_out_euler(x, w, b, xt, dt: float, eps: float = 1e-6, block=(64, 64), num_warps: int = 4, split: int = 1,
                     workspace=None, pdl: bool = False, zero=()):
    """x [R, D] fp32 (suffix action rows), w [D, A] fp32 folded, b [A], xt [R, A] fp32 updated in place.
    split: K ranges reduced deterministically by the last program of each row block (one program alone
    walks all of D: ~16 us; 16 ranges: a few us). zero: up to two contiguous 4-byte tensors also set to 0 (the
    next flow step's persistent-kernel counters and norm-sum slots: no separate memset or staging launch)."""
    R, D = x.shape
    A = w.shape[1]
    assert w.shape == (D, A) and xt.shape == (R, A) and xt.is_contiguous() and x.stride(1) == 1
    BM, BK = block
    split = max(1, min(split, triton.cdiv(D, BK)))
    k_per = triton.cdiv(triton.cdiv(D, split), BK) * BK
    split = triton.cdiv(D, k_per)
    grid = (triton.cdiv(R, BM), split)
    ws, cnt = (workspace or default_workspace(x.device)).need(split * grid[0] * BM * (A + 1) if split > 1 else 1, grid[0])
    pdl = bool(pdl) and HAS_PDL and x.is_cuda
    assert len(zero) <= 2 and all(z.is_contiguous() and z.element_size() == 4 for z in zero)
    za, zb = (tuple(z.view(torch.int32).reshape(-1) for z in zero) + (cnt, cnt))[:2]
    nza, nzb = (tuple(z.numel() for z in zero) + (0, 0))[:2]
    _action_out_euler_kernel[grid](x, w, b, xt, ws, cnt, R, D, k_per, x.stride(0), dt, eps, za, nza, zb, nzb, A=A,
                                   BLOCK_M=BM, BLOCK_K=BK, SPLIT=split, PDL=pdl, ZERO=bool(zero), num_warps=num_warps,
                                   **pdl_kwargs(pdl))
    return xt


def action_out_euler_ref(x, final_scale, w, b, xt, dt: float, eps: float = 1e-6):
    xf = x.float()
    h = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * (1.0 + final_scale.float())
    return xt.float() + dt * (h @ w.float() + b.float())
