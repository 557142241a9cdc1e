"""Prefix attention: every prefix token (images + prompt) attends to every VALID prefix token.

q [T, NQ*HD] (RoPE'd, pre-scaled), one shared K/V head: k, v [T, HD] (the layer's KV cache rows),
key_valid [T] (1 = real token, 0 = prompt padding). Padding rows still get a finite output (they
attend to the valid keys) so nothing downstream can turn into NaN; their outputs are never read by a
valid token. Flash (online softmax, base 2) over key blocks, float32 logits. With `split` > 1 the key blocks are
shared out over that many programs per (row block, head) (split-KV: at 1 camera 5 row blocks x 8 heads are only 40
programs for 132 SMs), and the last to finish merges the fp32 partials in fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pi0_triton_policy.kernels._common import (HAS_PDL, arrive_last, default_workspace, gdc_launch_dependents, gdc_wait,
                                               online_softmax_step, pdl_kwargs)


@triton.jit
def _prefix_attention_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, ws_ptr, cnt_ptr, T, stride_qm, stride_kv, stride_om, BLOCKS_PER_SPLIT,
    HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel's writes
        gdc_wait()
        gdc_launch_dependents()
    pid_m, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD)
    m_ok = offs_m < T
    q = tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + head * HD + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
    k_lo = split * BLOCKS_PER_SPLIT * BLOCK_N
    k_hi = tl.minimum(k_lo + BLOCKS_PER_SPLIT * BLOCK_N, T)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_hi
        ok = (tl.load(valid_ptr + offs_n, mask=n_ok, other=0) != 0) & n_ok
        k = tl.load(k_ptr + offs_n[:, None] * stride_kv + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        p, alpha, m_i, l_i = online_softmax_step(tl.dot(q, tl.trans(k)), ok, m_i, l_i)
        v = tl.load(v_ptr + offs_n[:, None] * stride_kv + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    o_ptrs = o_ptr + offs_m.to(tl.int64)[:, None] * stride_om + head * HD + offs_d[None, :]
    if SPLIT == 1:
        tl.store(o_ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=m_ok[:, None])
    else:
        # split-KV: this key range's unnormalised partial (acc, running max, sum) to the workspace; the last of the
        # tile's SPLIT programs merges them in fixed order s = 0, 1, .. (bitwise deterministic)
        tile = pid_m * tl.num_programs(1) + head
        rows = tl.arange(0, BLOCK_M)
        part = ws_ptr + (tile * SPLIT).to(tl.int64) * BLOCK_M * (HD + 2)
        tl.store(part + split * BLOCK_M * (HD + 2) + rows[:, None] * HD + offs_d[None, :], acc)
        stats = part + split * BLOCK_M * (HD + 2) + BLOCK_M * HD
        tl.store(stats + rows, m_i)
        tl.store(stats + BLOCK_M + rows, l_i)
        if arrive_last(cnt_ptr + tile, SPLIT):
            m_all = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
            for s_ in range(SPLIT):
                m_all = tl.maximum(m_all, tl.load(part + s_ * BLOCK_M * (HD + 2) + BLOCK_M * HD + rows, cache_modifier=".cg"))
            tot = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
            den = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for s_ in range(SPLIT):
                base = part + s_ * BLOCK_M * (HD + 2)
                w = tl.exp2(tl.load(base + BLOCK_M * HD + rows, cache_modifier=".cg") - m_all)
                den += w * tl.load(base + BLOCK_M * HD + BLOCK_M + rows, cache_modifier=".cg")
                tot += w[:, None] * tl.load(base + rows[:, None] * HD + offs_d[None, :], cache_modifier=".cg")
            tl.store(o_ptrs, (tot / den[:, None]).to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _prefix_attention_tma_kernel(q_desc, k_desc, v_desc, o_desc, valid_ptr, T,
                                 HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                                 PDL: tl.constexpr = False):
    """The same math with every tile moved by the TMA engine (tensor descriptors): q / o [T, NQ*HD] in [BM, HD]
    boxes, k / v [T, HD] in [BN, HD] boxes (rows past T zero-filled on load, clipped on store)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_m, head = tl.program_id(0), tl.program_id(1)
    q = q_desc.load([pid_m * BLOCK_M, head * HD])
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
    for n0 in tl.range(0, T, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        ok = (tl.load(valid_ptr + offs_n, mask=n_ok, other=0) != 0) & n_ok
        k = k_desc.load([n0, 0])
        p, alpha, m_i, l_i = online_softmax_step(tl.dot(q, tl.trans(k)), ok, m_i, l_i)
        v = v_desc.load([n0, 0])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    o_desc.store([pid_m * BLOCK_M, head * HD], (acc / l_i[:, None]).to(o_desc.dtype))


def prefix_attention(q, k, v, key_valid, num_heads: int, out=None, block=(64, 64), num_warps: int = 8, num_stages: int = 2,
                     pdl: bool = False, split: int = 1, workspace=None, tma: bool = False):
    """q [T, NQ*HD], k/v [T, HD] (rows may be strided), key_valid [T] int -> out [T, NQ*HD].
    split > 1: the keys in `split` ranges of whole key blocks, one program each, merged by the last to finish
    (fp32 partials in `workspace`, default: the device's shared one). tma: the tiles through tensor descriptors
    (no split; rows 16-byte aligned)."""
    pdl = bool(pdl) and HAS_PDL and q.is_cuda
    T, W = q.shape
    HD = W // num_heads
    assert k.shape[0] >= T and k.shape[1] == HD and k.stride() == v.stride() and key_valid.shape[0] >= T
    if out is None:
        out = torch.empty(T, W, dtype=q.dtype, device=q.device)
    BM, BN = block
    if tma:
        assert split == 1, "the TMA kernel has no split-KV"
        descs = [TensorDescriptor.from_tensor(q, [BM, HD]), TensorDescriptor.from_tensor(k[:T], [BN, HD]),
                 TensorDescriptor.from_tensor(v[:T], [BN, HD]), TensorDescriptor.from_tensor(out, [BM, HD])]
        _prefix_attention_tma_kernel[(triton.cdiv(T, BM), num_heads)](*descs, key_valid, T, HD=HD, BLOCK_M=BM,
                                                                      BLOCK_N=BN, STAGES=num_stages, num_warps=num_warps,
                                                                      PDL=pdl, **pdl_kwargs(pdl))
        return out
    blocks = triton.cdiv(T, BN)
    per = triton.cdiv(blocks, max(1, min(split, blocks)))
    split = triton.cdiv(blocks, per)  # no empty ranges
    grid = (triton.cdiv(T, BM), num_heads, split)
    if split > 1:
        ws, cnt = (workspace or default_workspace(q.device)).need(grid[0] * num_heads * split * BM * (HD + 2),
                                                                  grid[0] * num_heads)
    else:
        ws = cnt = out
    _prefix_attention_kernel[grid](q, k, v, key_valid, out, ws, cnt, T, q.stride(0), k.stride(0), out.stride(0), per,
                                   HD=HD, BLOCK_M=BM, BLOCK_N=BN, SPLIT=split, num_warps=num_warps, num_stages=num_stages,
                                   PDL=pdl, **pdl_kwargs(pdl))
    return out


def workspace_numel(T: int, num_heads: int, head_dim: int, block=(64, 64), split: int = 1) -> int:
    """fp32 workspace `prefix_attention(..., split=split)` needs at T tokens (0 without a split)."""
    BM, BN = block
    blocks = triton.cdiv(T, BN)
    per = triton.cdiv(blocks, max(1, min(split, blocks)))
    split = triton.cdiv(blocks, per)
    return 0 if split == 1 else triton.cdiv(T, BM) * num_heads * split * BM * (head_dim + 2)


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
