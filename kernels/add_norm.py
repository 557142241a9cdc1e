"""Residual add + the next layer's norm, one row per program: the glue between cuBLAS matmuls.

x <- x + y (+ bias)                   (float32 residual stream, in place; y optional, e.g. a bf16 matmul output)
xn = bf16(norm(x))                    NORM 0: RMS  x * rsqrt(mean(x^2) + eps)     (Gemma; (1+scale) folded into W)
                                      NORM 1: LN   (x - mean) * rsqrt(var + eps)  (SigLIP; gamma/beta folded into W, b)
Where cuBLAS beats the fused-prologue Triton matmuls (the compute-bound prefix and vision phases), the
norm is applied once here rather than in every N-tile of the following matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import HAS_PDL, gdc_launch_dependents, gdc_wait, pdl_kwargs


@triton.jit
def _add_norm_kernel(x_ptr, y_ptr, b_ptr, xn_ptr, D, stride_x, stride_y, stride_n, eps, stride_ys,
                     NORM: tl.constexpr, HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                     PDL: tl.constexpr = False, NY: tl.constexpr = 1):
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel's writes
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_Y:
        for j in tl.static_range(NY):  # y as NY partial sums (a split-K matmul's), added in fixed order
            x += tl.load(y_ptr + j * stride_ys + row * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * stride_x + offs, x, mask=ok)
    if NORM == 1:
        mean = tl.sum(x, 0) / D
        d = tl.where(ok, x - mean, 0.0)
        xn = d / tl.sqrt(tl.sum(d * d, 0) / D + eps)
    else:
        xn = x / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    tl.store(xn_ptr + row * stride_n + offs, xn.to(xn_ptr.dtype.element_ty), mask=ok)


def add_norm(x, xn, y=None, bias=None, norm: str = "rms", eps: float = 1e-6, num_warps: int = 4, pdl: bool = False):
    """x [M, D] fp32 (updated in place when y is given), y [M, D] or [S, M, D] (S partial sums, e.g. of a matmul
    split over K, added in order) or None, bias [D] or None -> xn [M, D].
    pdl: launched with programmatic dependent launch (it waits for the previous kernel's writes first)."""
    pdl = bool(pdl) and HAS_PDL and x.is_cuda
    M, D = x.shape
    assert xn.shape == (M, D) and x.stride(1) == 1 and xn.stride(1) == 1
    ny, ys = 1, 0
    if y is not None:
        if y.dim() == 3:
            ny, ys, y = y.shape[0], y.stride(0), y[0]
        assert y.shape == (M, D) and y.stride(1) == 1
    _add_norm_kernel[(M,)](x, y if y is not None else x, bias if bias is not None else x, xn, D, x.stride(0),
                           y.stride(0) if y is not None else 0, xn.stride(0), eps, ys, NORM={"rms": 0, "layer": 1}[norm],
                           HAS_Y=y is not None, HAS_BIAS=bias is not None, BLOCK_D=triton.next_power_of_2(D), num_warps=num_warps,
                           PDL=pdl, NY=ny, **pdl_kwargs(pdl))
    return x, xn


def mm_split_k(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [S, M, N] = the S partial products a[:, kS:(k+1)S] @ w[kS:(k+1)S] (K split in S equal parts) as ONE strided
    batched cuBLAS call (no copies: the parts of a are column ranges, lda = K), for add_norm's [S, M, D] input. At M =
    256 (one camera) cuBLAS runs SigLIP's o / fc2 on 72 tiles for 132 SMs; the split doubles them."""
    S, M, N = out.shape
    K = a.shape[1]
    assert K % S == 0 and w.shape == (K, N) and a.stride(1) == 1 and w.is_contiguous()
    return torch.bmm(a.view(M, S, K // S).transpose(0, 1), w.view(S, K // S, N), out=out)


def add_norm_ref(x, y=None, bias=None, norm: str = "rms", eps: float = 1e-6):
    x = x.float() + (y.float() if y is not None else 0) + (bias.float() if bias is not None else 0)
    if norm == "rms":
        return x, x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x, torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
