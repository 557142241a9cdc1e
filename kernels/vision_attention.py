"""SigLIP self-attention: each image's P tokens attend to each other, all heads, no mask.

qkv [V*P, 3*NH*HD] is the fused projection (q already scaled by HD^-0.5 at load); out [V*P, NH*HD].
Online-softmax (flash) over key blocks, float32 logits and statistics, probabilities cast to the value
dtype before the PV product (as the reference). HD = 72 for So400m: padded to BLOCK_D = 128 with masks, or
(split_d) computed as 64 + 16 columns (8 of them masked), 80 instead of 128 MMA columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pi0_triton_policy.kernels._common import HAS_PDL, gdc_launch_dependents, gdc_wait, online_softmax_step, pdl_kwargs


@triton.jit
def _store_rows(o_ptr, row0, offs_m, m_ok, stride_o, head, HD: tl.constexpr, acc, l_i, BLOCK_D: tl.constexpr,
                BLOCK_D2: tl.constexpr, acc2):
    """The normalised output of one (row block, head): the head's HD columns of rows row0 + offs_m (acc holds the
    first BLOCK_D of them, acc2 the BLOCK_D2 after, when the head dim is split); padding columns are not stored."""
    o_rows = o_ptr + (row0 + offs_m).to(tl.int64)[:, None] * stride_o + head * HD
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(o_rows + offs_d[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_d < HD)[None, :])
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        tl.store(o_rows + offs_d2[None, :], (acc2 / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_d2 < HD)[None, :])


@triton.jit
def _vision_attention_kernel(
    qkv_ptr, o_ptr, P, stride_qkv, stride_o,
    NH: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D2: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """BLOCK_D2 == 0: the head dim padded to BLOCK_D. BLOCK_D2 > 0: the head dim as two column blocks, [0, BLOCK_D)
    unmasked and [BLOCK_D, BLOCK_D + BLOCK_D2) masked to HD (72 = 64 + 16 with 8 valid: 80 MMA columns instead of 128)."""
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel's writes
        gdc_wait()
        gdc_launch_dependents()
    pid_m, head, view = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    W: tl.constexpr = NH * HD
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    base = qkv_ptr + (view * P).to(tl.int64) * stride_qkv + head * HD
    q = tl.load(base + offs_m[:, None] * stride_qkv + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_ok = offs_d2 < HD
        q2 = tl.load(base + offs_m[:, None] * stride_qkv + offs_d2[None, :], mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
        acc2 = tl.zeros((BLOCK_M, BLOCK_D2), dtype=tl.float32)
    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        kv_rows = base + offs_n[:, None] * stride_qkv
        k = tl.load(kv_rows + W + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k))
        if BLOCK_D2 > 0:
            k2 = tl.load(kv_rows + W + offs_d2[None, :], mask=n_ok[:, None] & d2_ok[None, :], other=0.0)
            s += tl.dot(q2, tl.trans(k2))
        p, alpha, m_i, l_i = online_softmax_step(s, n_ok, m_i, l_i)
        v = tl.load(kv_rows + 2 * W + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        if BLOCK_D2 > 0:
            v2 = tl.load(kv_rows + 2 * W + offs_d2[None, :], mask=n_ok[:, None] & d2_ok[None, :], other=0.0)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2)
    if BLOCK_D2 > 0:
        _store_rows(o_ptr, view * P, offs_m, m_ok, stride_o, head, HD, acc, l_i, BLOCK_D, BLOCK_D2, acc2)
    else:
        _store_rows(o_ptr, view * P, offs_m, m_ok, stride_o, head, HD, acc, l_i, BLOCK_D, BLOCK_D2, acc)


@triton.jit
def _vision_attention_tma_kernel(
    qkv_desc, qkv2_desc, o_ptr, P, stride_o,
    NH: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D2: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr = False,
):
    """The same math with q / k / v tiles moved by the TMA engine: boxes [rows, BLOCK_D] (and [rows, BLOCK_D2]) of the
    fused qkv at the head's first column. A box wider than the head reads the next head's columns (or zeros past the
    last): q's are zeroed once in registers, so they add nothing to the logits, and o's are never stored. Key rows of
    the next view (P not a multiple of BLOCK_N) are masked like padding."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_m, head, view = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    W: tl.constexpr = NH * HD
    row0 = view * P
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    q = qkv_desc.load([row0 + pid_m * BLOCK_M, head * HD])
    if BLOCK_D > HD:
        q = tl.where(d_ok[None, :], q, 0.0)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_ok = offs_d2 < HD
        q2 = tl.where(d2_ok[None, :], qkv2_desc.load([row0 + pid_m * BLOCK_M, head * HD + BLOCK_D]), 0.0)
        acc2 = tl.zeros((BLOCK_M, BLOCK_D2), dtype=tl.float32)
    for n0 in tl.range(0, P, BLOCK_N, num_stages=STAGES):
        n_ok = n0 + tl.arange(0, BLOCK_N) < P
        k = qkv_desc.load([row0 + n0, W + head * HD])
        s = tl.dot(q, tl.trans(k))
        if BLOCK_D2 > 0:
            s += tl.dot(q2, tl.trans(qkv2_desc.load([row0 + n0, W + head * HD + BLOCK_D])))
        p, alpha, m_i, l_i = online_softmax_step(s, n_ok, m_i, l_i)
        v = qkv_desc.load([row0 + n0, 2 * W + head * HD])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        if BLOCK_D2 > 0:
            v2 = qkv2_desc.load([row0 + n0, 2 * W + head * HD + BLOCK_D])
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2)
    if BLOCK_D2 > 0:
        _store_rows(o_ptr, row0, offs_m, m_ok, stride_o, head, HD, acc, l_i, BLOCK_D, BLOCK_D2, acc2)
    else:
        _store_rows(o_ptr, row0, offs_m, m_ok, stride_o, head, HD, acc, l_i, BLOCK_D, BLOCK_D2, acc)


def head_dim_blocks(hd: int, split: bool) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): one padded block, or (when `split` and hd is not a power of two) the largest power of two
    below hd plus a masked power-of-two block (>= 16, the MMA's K minimum) for the rest."""
    if not split or hd & (hd - 1) == 0 or hd < 32:
        return triton.next_power_of_2(hd), 0
    d1 = 1 << (hd.bit_length() - 1)
    return d1, max(16, triton.next_power_of_2(hd - d1))


def vision_attention(qkv: torch.Tensor, num_views: int, num_heads: int, out: torch.Tensor | None = None,
                     block=(64, 64), num_warps: int = 4, num_stages: int = 2, pdl: bool = False,
                     split_d: bool = False, tma: bool = False) -> torch.Tensor:
    """qkv [V*P, 3*NH*HD] -> out [V*P, NH*HD] (same dtype). `split_d`: see head_dim_blocks. `tma`: the q / k / v
    tiles through tensor descriptors (BM == BN; rows and head offsets 16-byte aligned)."""
    pdl = bool(pdl) and HAS_PDL and qkv.is_cuda
    M, W3 = qkv.shape
    W = W3 // 3
    HD = W // num_heads
    P = M // num_views
    assert qkv.stride(1) == 1 and W3 == 3 * W and W == num_heads * HD and M == P * num_views
    if out is None:
        out = torch.empty(M, W, dtype=qkv.dtype, device=qkv.device)
    BM, BN = block
    BD, BD2 = head_dim_blocks(HD, split_d)
    grid = (triton.cdiv(P, BM), num_heads, num_views)
    if tma:
        assert BM == BN, "one descriptor box for q, k and v rows"
        d1 = TensorDescriptor.from_tensor(qkv, [BM, BD])
        d2 = TensorDescriptor.from_tensor(qkv, [BM, BD2]) if BD2 else d1
        _vision_attention_tma_kernel[grid](d1, d2, out, P, out.stride(0), NH=num_heads, HD=HD, BLOCK_D=BD, BLOCK_D2=BD2,
                                           BLOCK_M=BM, BLOCK_N=BN, STAGES=num_stages, num_warps=num_warps, PDL=pdl,
                                           **pdl_kwargs(pdl))
        return out
    _vision_attention_kernel[grid](qkv, out, P, qkv.stride(0), out.stride(0), NH=num_heads, HD=HD,
                                   BLOCK_D=BD, BLOCK_D2=BD2, BLOCK_M=BM, BLOCK_N=BN,
                                   num_warps=num_warps, num_stages=num_stages, PDL=pdl, **pdl_kwargs(pdl))
    return out


def vision_attention_ref(qkv: torch.Tensor, num_views: int, num_heads: int) -> torch.Tensor:
    M, W3 = qkv.shape
    W = W3 // 3
    q, k, v = qkv.float().reshape(num_views, M // num_views, 3, num_heads, W // num_heads).unbind(2)
    logits = torch.einsum("vtnh,vsnh->vnts", q, k)
    probs = torch.softmax(logits, -1)
    return torch.einsum("vnts,vsnh->vtnh", probs, v).reshape(M, W)
