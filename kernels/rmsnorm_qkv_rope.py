"""Gemma RMSNorm + fused Q/K/V projection + RoPE, writing q and the K/V cache rows directly.

For rows of the float32 residual stream x [M, D]:
    h = x * rsqrt(mean(x^2) + eps)                       (float32 statistics)
    [q | k | v] = h @ W                                  W [D, (NQ + 2) * H], folded at load:
                                                         W = diag(1 + scale) [Wq * H^-0.5 | Wk | Wv]
    q, k = rope(q, pos), rope(k, pos)                    split-half layout, tables cos/sin [max_pos, H/2]
Because the norm is a per-row scale it commutes with the matmul: the kernel accumulates sum(x^2) while
streaming x through the K loop and scales the accumulators at the end (no extra pass over x).
Each program owns BLOCK_H columns of the first half of one head and the matching columns of the second
half, so the rotation happens in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_qkv_rope_kernel(
    x_ptr, w_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
    M, D, stride_xm, stride_qm, stride_km, eps,
    NQ: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    HALF: tl.constexpr = HD // 2
    TILES: tl.constexpr = HALF // BLOCK_H
    NW: tl.constexpr = (NQ + 2) * HD
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    head, j = pid_n // TILES, pid_n % TILES
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = j * BLOCK_H + tl.arange(0, BLOCK_H)  # within the half
    col1 = head * HD + offs_d
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
        a = x.to(w_ptr.dtype.element_ty)
        w_rows = w_ptr + offs_k.to(tl.int64)[:, None] * NW
        w1 = tl.load(w_rows + col1[None, :], mask=k_ok[:, None], other=0.0)
        w2 = tl.load(w_rows + (col1 + HALF)[None, :], mask=k_ok[:, None], other=0.0)
        acc1 += tl.dot(a, w1)
        acc2 += tl.dot(a, w2)
    rstd = 1.0 / tl.sqrt(ss / D + eps)
    acc1 *= rstd[:, None]
    acc2 *= rstd[:, None]
    mask = m_ok[:, None]
    if head <= NQ:  # q heads and k are rotated, v is not
        pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=0)
        t_off = pos.to(tl.int64)[:, None] * HALF + offs_d[None, :]
        c = tl.load(cos_ptr + t_off, mask=mask, other=1.0)
        s = tl.load(sin_ptr + t_off, mask=mask, other=0.0)
        o1 = acc1 * c - acc2 * s
        o2 = acc2 * c + acc1 * s
    else:
        o1 = acc1
        o2 = acc2
    if head < NQ:
        dst = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + head * HD + offs_d[None, :]
    elif head == NQ:
        dst = k_ptr + offs_m.to(tl.int64)[:, None] * stride_km + offs_d[None, :]
    else:
        dst = v_ptr + offs_m.to(tl.int64)[:, None] * stride_km + offs_d[None, :]
    tl.store(dst, o1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(dst.dtype.element_ty), mask=mask)


def rope_tables(max_pos: int, head_dim: int, max_wavelength: float = 10_000.0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_pos, head_dim/2] float32, the reference's float32 radians."""
    half = head_dim // 2
    timescale = max_wavelength ** ((2.0 / head_dim) * torch.arange(half, dtype=torch.float32, device=device))
    radians = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] / timescale
    return torch.cos(radians).contiguous(), torch.sin(radians).contiguous()


def fold_qkv(scale: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, dtype) -> torch.Tensor:
    """OpenPI layouts wq [NQ, D, H], wk/wv [D, H] (one kv head) -> W [D, (NQ+2)*H] with (1+scale) and H^-0.5 folded."""
    NQ, D, H = wq.shape
    q = wq.float().permute(1, 0, 2).reshape(D, NQ * H) * H**-0.5
    w = torch.cat([q, wk.float(), wv.float()], 1) * (1.0 + scale.float())[:, None]
    return w.to(dtype).contiguous()


def rmsnorm_qkv_rope(x, w, pos, cos, sin, q, k, v, num_heads: int, head_dim: int, eps: float = 1e-6,
                     block=(64, 64, 64), num_warps: int = 4, num_stages: int = 3):
    """x [M, D] fp32, w [D, (NQ+2)*H], pos [M] int32 -> q [M, NQ*H] (strided rows ok), k/v [M, H] rows."""
    M, D = x.shape
    assert w.shape == (D, (num_heads + 2) * head_dim) and w.is_contiguous(), w.shape
    assert pos.shape[0] >= M and q.shape[0] >= M and k.shape[0] >= M and v.shape[0] >= M
    assert x.stride(1) == 1 and q.stride(1) == 1 and k.stride() == v.stride() and k.stride(1) == 1
    BM, BH, BK = block
    BH = min(BH, head_dim // 2)
    grid = (triton.cdiv(M, BM), (num_heads + 2) * (head_dim // 2 // BH))
    _rmsnorm_qkv_rope_kernel[grid](x, w, pos, cos, sin, q, k, v, M, D, x.stride(0), q.stride(0), k.stride(0), eps,
                                   NQ=num_heads, HD=head_dim, BLOCK_M=BM, BLOCK_H=BH, BLOCK_K=BK,
                                   num_warps=num_warps, num_stages=num_stages)
    return q, k, v


def rope_ref(x: torch.Tensor, pos: torch.Tensor, max_wavelength: float = 10_000.0) -> torch.Tensor:
    """x [T, N, H] float, pos [T] -> rotated, split-half layout."""
    half = x.shape[-1] // 2
    timescale = max_wavelength ** ((2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32, device=x.device))
    rad = pos.float()[:, None, None] / timescale
    x1, x2 = x.float().split(half, -1)
    return torch.cat([x1 * torch.cos(rad) - x2 * torch.sin(rad), x2 * torch.cos(rad) + x1 * torch.sin(rad)], -1)


def rmsnorm_qkv_rope_ref(x, scale, wq, wk, wv, pos, eps: float = 1e-6, dtype=torch.float32):
    """Unfolded: q [T, NQ*H] (scaled by H^-0.5), k [T, H], v [T, H], float32."""
    xf = x.float()
    h = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * (1.0 + scale.float())).to(dtype)
    NQ, D, H = wq.shape
    q = torch.einsum("td,ndh->tnh", h, wq.to(dtype)).float()
    k = (h @ wk.to(dtype)).float()
    v = (h @ wv.to(dtype)).float()
    q = rope_ref(q, pos) * H**-0.5
    k = rope_ref(k[:, None], pos)[:, 0]
    return q.reshape(-1, NQ * H), k, v
