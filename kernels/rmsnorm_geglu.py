"""Gemma RMSNorm + gate/up projections + tanh-GELU gating, one kernel.

h = gelu_tanh(n(x) @ Wg) * (n(x) @ Wu),   n(x) = x * rsqrt(mean(x^2) + eps) * (1 + scale)
The (1 + scale) is folded into Wg, Wu at load ([2, D, F], OpenPI's gating_einsum layout); the row
rsqrt is applied to both accumulators at the end (sum(x^2) is gathered in the same K loop).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import gelu_tanh, gelu_tanh_ref


@triton.jit
def _rmsnorm_geglu_kernel(
    x_ptr, w_ptr, h_ptr,  # x [M, D] fp32, w [2, D, F], h [M, F]
    M, D, F, stride_xm, stride_hm, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering so programs running together share x rows and w columns in L2
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(F, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % gsize
    pid_n = (pid % (GROUP_M * num_n)) // gsize

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < F
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up_off = D.to(tl.int64) * F
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
        a = x.to(w_ptr.dtype.element_ty)
        w_off = offs_k.to(tl.int64)[:, None] * F + offs_n[None, :]
        wmask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_ptr + w_off, mask=wmask, other=0.0)
        wu = tl.load(w_ptr + up_off + w_off, mask=wmask, other=0.0)
        acc_g += tl.dot(a, wg)
        acc_u += tl.dot(a, wu)
    rstd = 1.0 / tl.sqrt(ss / D + eps)
    g = acc_g * rstd[:, None]
    u = acc_u * rstd[:, None]
    h = gelu_tanh(g) * u
    tl.store(h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def fold_gating(scale: torch.Tensor, gating: torch.Tensor, dtype) -> torch.Tensor:
    """gating [2, D, F] -> diag(1 + scale) applied to both, in `dtype`."""
    return (gating.float() * (1.0 + scale.float())[None, :, None]).to(dtype).contiguous()


def rmsnorm_geglu(x, w, out=None, eps: float = 1e-6, block=(64, 64, 64), group_m: int = 8, num_warps: int = 4, num_stages: int = 3):
    """x [M, D] fp32, w [2, D, F] (folded) -> h [M, F] in w's dtype."""
    M, D = x.shape
    two, D2, F = w.shape
    assert two == 2 and D2 == D and w.is_contiguous() and x.stride(1) == 1, (x.shape, w.shape)
    if out is None:
        out = torch.empty(M, F, dtype=w.dtype, device=x.device)
    assert out.shape == (M, F) and out.stride(1) == 1
    BM, BN, BK = block
    grid = (triton.cdiv(M, BM) * triton.cdiv(F, BN),)
    _rmsnorm_geglu_kernel[grid](x, w, out, M, D, F, x.stride(0), out.stride(0), eps,
                                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages)
    return out


def rmsnorm_geglu_ref(x, scale, gating, eps: float = 1e-6, dtype=torch.float32):
    xf = x.float()
    h = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * (1.0 + scale.float())).to(dtype)
    g = gating.to(dtype)
    return (gelu_tanh_ref((h @ g[0]).float()) * (h @ g[1]).float())
