"""Prefix attention: every prefix token (images + prompt) attends to every VALID prefix token.

q [T, NQ*HD] (RoPE'd, pre-scaled), one shared K/V head: k, v [T, HD] (the layer's KV cache rows),
key_valid [T] (1 = real token, 0 = prompt padding). Padding rows still get a finite output (they
attend to the valid keys) so nothing downstream can turn into NaN; their outputs are never read by a
valid token. Flash (online softmax) over key blocks, float32 logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import HAS_PDL, gdc_launch_dependents, gdc_wait, pdl_kwargs


@triton.jit
def _prefix_attention_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, T, stride_qm, stride_kv, stride_om,
    HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel's writes
        gdc_wait()
        gdc_launch_dependents()
    pid_m, head = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD)
    m_ok = offs_m < T
    q = tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + head * HD + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
    for n0 in range(0, T, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        ok = (tl.load(valid_ptr + offs_n, mask=n_ok, other=0) != 0) & n_ok
        k = tl.load(k_ptr + offs_n[:, None] * stride_kv + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_kv + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + offs_m.to(tl.int64)[:, None] * stride_om + head * HD + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None])


def prefix_attention(q, k, v, key_valid, num_heads: int, out=None, block=(64, 64), num_warps: int = 8, num_stages: int = 2,
                     pdl: bool = False):
    """q [T, NQ*HD], k/v [T, HD] (rows may be strided), key_valid [T] int -> out [T, NQ*HD]."""
    pdl = bool(pdl) and HAS_PDL and q.is_cuda
    T, W = q.shape
    HD = W // num_heads
    assert k.shape[0] >= T and k.shape[1] == HD and k.stride() == v.stride() and key_valid.shape[0] >= T
    if out is None:
        out = torch.empty(T, W, dtype=q.dtype, device=q.device)
    BM, BN = block
    grid = (triton.cdiv(T, BM), num_heads)
    _prefix_attention_kernel[grid](q, k, v, key_valid, out, T, q.stride(0), k.stride(0), out.stride(0),
                                   HD=HD, BLOCK_M=BM, BLOCK_N=BN, num_warps=num_warps, num_stages=num_stages,
                                   PDL=pdl, **pdl_kwargs(pdl))
    return out


def masked_attention_ref(q, k, v, mask, num_heads: int):
    """q [T, NQ*HD], k/v [S, HD] (one kv head), mask [T, S] bool -> [T, NQ*HD] float32 (rows with no key: 0)."""
    T = q.shape[0]
    qh = q.float().reshape(T, num_heads, -1)
    logits = torch.einsum("tnh,sh->nts", qh, k.float())
    logits = logits.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    return torch.einsum("nts,sh->tnh", probs, v.float()).reshape(T, -1)


def prefix_attention_ref(q, k, v, key_valid, num_heads: int):
    T = q.shape[0]
    mask = key_valid[:T].bool()[None, :].expand(T, T)
    return masked_attention_ref(q, k[:T], v[:T], mask, num_heads)
