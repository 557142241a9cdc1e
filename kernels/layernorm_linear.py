"""LayerNorm fused into the following matmul (SigLIP QKV, MLP-in with tanh-GELU, encoder_norm + head).

out = act(LN(x) @ W + b) with the LayerNorm's scale/bias FOLDED at load time:
    W' = diag(gamma) @ W,   b' = beta @ W + b        (see `fold_layernorm`)
so the kernel normalizes rows ((x - mean) * rstd, float32 statistics, two passes, no cancellation)
in registers, casts to W's dtype, and multiplies. x is the float32 residual stream.
ACT: 0 = none, 1 = tanh-GELU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import gelu_tanh, gelu_tanh_ref


@triton.jit
def _layernorm_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,  # x [M, K] fp32, w [K, N], b [N] fp32, out [M, N]
    M, N, K, stride_xm, stride_om, eps,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # row statistics: mean, then centred variance
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        s1 += tl.sum(x, 1)
    mean = s1 / K
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = m_ok[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_rows + offs_k[None, :], mask=kmask, other=0.0)
        d = tl.where(kmask, x - mean[:, None], 0.0)
        s2 += tl.sum(d * d, 1)
    rstd = 1.0 / tl.sqrt(s2 / K + eps)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = m_ok[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_rows + offs_k[None, :], mask=kmask, other=0.0)
        a = tl.where(kmask, (x - mean[:, None]) * rstd[:, None], 0.0).to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, w)
    acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if ACT == 1:
        acc = gelu_tanh(acc)
    omask = m_ok[:, None] & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


def fold_layernorm(gamma: torch.Tensor, beta: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') for `layernorm_linear`, computed in float32: W' = diag(gamma) W, b' = beta W + b."""
    wf = w.float()
    w2 = (gamma.float()[:, None] * wf).to(dtype).contiguous()
    b2 = beta.float() @ wf + (b.float() if b is not None else 0.0)
    return w2, b2.contiguous()


def layernorm_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, act: str = "none",
                     eps: float = 1e-6, out_dtype=None, block=(64, 128, 64), num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [M, K] fp32 (rows may be strided), w [K, N] (folded), b [N] fp32 -> act(LN(x) @ W + b) [M, N]."""
    M, K = x.shape
    K2, N = w.shape
    assert K == K2 and b.shape == (N,) and x.stride(1) == 1 and w.is_contiguous(), (x.shape, w.shape, b.shape)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype or w.dtype, device=x.device)
    assert out.shape == (M, N) and out.stride(1) == 1
    BM, BN, BK = block
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _layernorm_linear_kernel[grid](x, w, b, out, M, N, K, x.stride(0), out.stride(0), eps,
                                   ACT={"none": 0, "gelu": 1}[act], BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                   num_warps=num_warps, num_stages=num_stages)
    return out


def layernorm_linear_ref(x, gamma, beta, w, b, act: str = "none", eps: float = 1e-6, dtype=torch.float32):
    """The unfolded math: LN in float32, matmul in `dtype`."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), gamma.float(), beta.float(), eps).to(dtype)
    out = (y @ w.to(dtype)).float() + b.float()
    return gelu_tanh_ref(out) if act == "gelu" else out
