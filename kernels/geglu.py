"""GeGLU gating after a cuBLAS gate+up matmul: h = gelu_tanh(gu[:, :F]) * gu[:, F:] (float32 math), or with
`interleaved` (the matmul ran on gemm_geglu's interleaved weight layout): h[:, j] = gelu_tanh(gu[:, 2j]) * gu[:, 2j + 1]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import HAS_PDL, gdc_launch_dependents, gdc_wait, gelu_tanh, gelu_tanh_ref, pdl_kwargs


@triton.jit
def _geglu_kernel(gu_ptr, h_ptr, F, stride_gu, stride_h, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                  INTERLEAVED: tl.constexpr = False):
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel's writes
        gdc_wait()
        gdc_launch_dependents()
    row, pid = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F
    if INTERLEAVED:  # one contiguous [BLOCK, 2] load, split into the pairs
        pair = tl.load(gu_ptr + row * stride_gu + 2 * offs[:, None] + tl.arange(0, 2)[None, :], mask=ok[:, None], other=0.0)
        g, u = pair.to(tl.float32).split()
    else:
        g = tl.load(gu_ptr + row * stride_gu + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + F + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * stride_h + offs, (gelu_tanh(g) * u).to(h_ptr.dtype.element_ty), mask=ok)


def geglu(gu: torch.Tensor, out: torch.Tensor | None = None, block: int = 2048, pdl: bool = False,
          interleaved: bool = False) -> torch.Tensor:
    """gu [M, 2F] -> h [M, F]."""
    pdl = bool(pdl) and HAS_PDL and gu.is_cuda
    M, F2 = gu.shape
    F = F2 // 2
    if out is None:
        out = torch.empty(M, F, dtype=gu.dtype, device=gu.device)
    assert out.shape == (M, F) and gu.stride(1) == 1 and out.stride(1) == 1
    _geglu_kernel[(M, triton.cdiv(F, block))](gu, out, F, gu.stride(0), out.stride(0), BLOCK=block, num_warps=4,
                                                   PDL=pdl, INTERLEAVED=interleaved, **pdl_kwargs(pdl))
    return out


def geglu_ref(gu, interleaved: bool = False):
    if interleaved:
        return gelu_tanh_ref(gu[:, 0::2].float()) * gu[:, 1::2].float()
    F = gu.shape[1] // 2
    return gelu_tanh_ref(gu[:, :F].float()) * gu[:, F:].float()
