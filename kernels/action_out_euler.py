"""Final RMSNorm of the action expert + action_out_proj + the Euler step, one kernel.

v = n(x) @ W_out + b_out,  n(x) = x * rsqrt(mean(x^2) + eps) * (1 + final_norm)   ((1+s) folded into W_out)
x_t <- x_t + dt * v       (in place, float32)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _action_out_euler_kernel(
    x_ptr, w_ptr, b_ptr, xt_ptr,  # x [R, D] fp32, w [D, A] fp32, b [A], xt [R, A] fp32
    R, D, stride_xm, dt, eps,
    A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, A)
    m_ok = offs_m < R
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, A), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        ss += tl.sum(x * x, 1)
        w = tl.load(w_ptr + offs_k[:, None] * A + offs_a[None, :], mask=k_ok[:, None], other=0.0)
        acc += tl.dot(x, w)
    v = acc / tl.sqrt(ss / D + eps)[:, None] + tl.load(b_ptr + offs_a)[None, :]
    ptrs = xt_ptr + offs_m[:, None] * A + offs_a[None, :]
    xt = tl.load(ptrs, mask=m_ok[:, None], other=0.0)
    tl.store(ptrs, xt + dt * v, mask=m_ok[:, None])


def action_out_euler(x, w, b, xt, dt: float, eps: float = 1e-6, block=(64, 64), num_warps: int = 4):
    """x [R, D] fp32 (suffix action rows), w [D, A] fp32 folded, b [A], xt [R, A] fp32 updated in place."""
    R, D = x.shape
    A = w.shape[1]
    assert w.shape == (D, A) and xt.shape == (R, A) and xt.is_contiguous() and x.stride(1) == 1
    BM, BK = block
    _action_out_euler_kernel[(triton.cdiv(R, BM),)](x, w, b, xt, R, D, x.stride(0), dt, eps, A=A, BLOCK_M=BM, BLOCK_K=BK,
                                                     num_warps=num_warps)
    return xt


def action_out_euler_ref(x, final_scale, w, b, xt, dt: float, eps: float = 1e-6):
    xf = x.float()
    h = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * (1.0 + final_scale.float())
    return xt.float() + dt * (h @ w.float() + b.float())
