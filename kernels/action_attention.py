"""Action-expert attention: suffix queries over the cached prefix keys/values plus the suffix itself.

Keys are the layer's cache rows [0, T_pre) (prefix, `key_valid` masks prompt padding) followed by the
suffix rows [T_pre, T_pre + S) = (state token, action tokens). OpenPI's ar-mask for the suffix
(state: ar=1, first action: ar=1, others 0) means: the state token (suffix row 0) sees the prefix and
itself; every action token sees the prefix, the state and all actions. Queries are suffix rows
[row_start, row_start + R): row_start = 0 on the first flow step (the state token's keys/values are
computed there once, they never change), 1 afterwards.

All NQ heads share one K/V head, so heads are packed into the row dimension (NQ*R query rows) and
every key block is loaded once per row block. With ~50 queries there are few row blocks, so keys are
split into SPLIT chunks (flash-decoding); the last program of a row block to finish merges the
partial (o, max, sum) triples in fixed order (deterministic); the merge loop is unrolled so all
partials are loaded at once (the serial version spent most of the kernel's 14-18 us waiting on L2).
`split=0` gives one BLOCK_N key block per split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import (HAS_PDL, INTERPRET, arrive_last, bulk_prefetch_rows, default_workspace,
                                               gdc_launch_dependents, gdc_wait, globaltimer, pdl_kwargs)


@triton.jit
def _action_attention_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, ws_ptr, ml_ptr, cnt_ptr,
    R, T_PRE, TK, row_start, stride_qm, stride_kv, stride_om, CHUNK,
    NQ: tl.constexpr, HD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False, STAGES: tl.constexpr = 2, PREFETCH: tl.constexpr = False, PRELOAD: tl.constexpr = False,
    ts_ptr=None, TS: tl.constexpr = False, PEEL_KV: tl.constexpr = True,
):
    ts = ts_ptr
    if TS:  # profiling stamps (skinny_matmul.TIMESTAMPS): entry, after the PDL wait, after the key loop, end
        ts = ts_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * 4
        tl.store(ts, globaltimer(tl.program_id(0)))
    if PREFETCH:  # the first row block of each key chunk asks L2 for the chunk's K/V rows (contiguous) before waiting
        if tl.program_id(0) == 0:
            lo = tl.program_id(1) * CHUNK
            nbytes = (tl.minimum(CHUNK, TK - lo) * stride_kv * 2).to(tl.int32)
            start = lo.to(tl.int64) * stride_kv
            bulk_prefetch_rows(k_ptr + start, start * 0, nbytes, 1)
            bulk_prefetch_rows(v_ptr + start, start * 0, nbytes, 1)
    if PDL and PRELOAD:
        # the chunk's first key block: prefix rows are fixed during the action expert, so they are requested before
        # waiting on the qkv kernel; its suffix rows (written by that kernel) only after
        lo = tl.program_id(1) * CHUNK
        offs_n = lo + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HD)
        n_ok = offs_n < tl.minimum(lo + CHUNK, TK)
        pre, suf = n_ok & (offs_n < T_PRE), n_ok & (offs_n >= T_PRE)
        kv_off = offs_n.to(tl.int64)[:, None] * stride_kv + offs_d[None, :]
        k0 = tl.load(k_ptr + kv_off, mask=pre[:, None], other=0.0)
        v0 = tl.load(v_ptr + kv_off, mask=pre[:, None], other=0.0)
        gdc_wait()
        gdc_launch_dependents()
        if TS:
            tl.store(ts + 1, globaltimer(tl.program_id(0)))
        k0 += tl.load(k_ptr + kv_off, mask=suf[:, None], other=0.0)
        v0 += tl.load(v_ptr + kv_off, mask=suf[:, None], other=0.0)
        _attention_item(tl.program_id(0), tl.program_id(1), q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, ws_ptr, ml_ptr,
                        cnt_ptr, R, T_PRE, TK, row_start, stride_qm, stride_kv, stride_om, CHUNK, NQ, HD, SPLIT, BLOCK_M,
                        BLOCK_N, STAGES, "", True, k0, v0, ts, TS)
    else:
        if PDL:  # launched early (programmatic dependent launch): wait for the qkv kernel's q and K/V rows
            gdc_wait()
            gdc_launch_dependents()
        if TS:
            tl.store(ts + 1, globaltimer(tl.program_id(0)))
        _attention_item(tl.program_id(0), tl.program_id(1), q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, ws_ptr, ml_ptr,
                        cnt_ptr, R, T_PRE, TK, row_start, stride_qm, stride_kv, stride_om, CHUNK, NQ, HD, SPLIT, BLOCK_M,
                        BLOCK_N, STAGES, "", False, None, None, ts, TS, PEEL_KV)


@triton.jit
def _attn_block(q, k, v, offs_n, n_ok, valid_ptr, T_PRE, rg, m_i, l_i, acc):
    """Online-softmax update of (m, l, acc) with one key block (OpenPI's prefix-padding + suffix ar mask)."""
    key_ok = (tl.load(valid_ptr + offs_n, mask=n_ok & (offs_n < T_PRE), other=1) != 0) & n_ok
    vis = key_ok[None, :] & ((offs_n[None, :] <= T_PRE) | (rg[:, None] > 0))
    s = tl.dot(q, tl.trans(k))
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attention_item(
    pid_m, pid_s, q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, ws_ptr, ml_ptr, cnt_ptr,
    R, T_PRE, TK, row_start, stride_qm, stride_kv, stride_om, CHUNK,
    NQ: tl.constexpr, HD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr, CM: tl.constexpr, PRE: tl.constexpr = False, k_pre=None, v_pre=None, ts=None,
    TS: tl.constexpr = False, PEEL_KV: tl.constexpr = True,
):
    """One (packed row block, key chunk) of the attention: the body of `_action_attention_kernel`, also called by the
    persistent action-expert kernel (kernels/action_stack.py; CM = ".cg" there, see skinny_matmul._skinny_item).
    PRE: the chunk's first key block was loaded by the caller (k_pre, v_pre)."""
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (head, row)
    i_ok = offs_i < NQ * R
    head, r = offs_i // R, offs_i % R
    rg = r + row_start
    offs_d = tl.arange(0, HD)
    q_off = r.to(tl.int64)[:, None] * stride_qm + (head * HD)[:, None] + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=i_ok[:, None], other=0.0, cache_modifier=CM)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, TK)
    if PRE or PEEL_KV:  # first key block peeled (it may come preloaded); K and V of a block are requested together
        offs_n = lo + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if PRE:
            k, v = k_pre, v_pre
        else:
            kv_off = offs_n.to(tl.int64)[:, None] * stride_kv + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=n_ok[:, None], other=0.0, cache_modifier=CM)
            v = tl.load(v_ptr + kv_off, mask=n_ok[:, None], other=0.0, cache_modifier=CM)
        m_i, l_i, acc = _attn_block(q, k, v, offs_n, n_ok, valid_ptr, T_PRE, rg, m_i, l_i, acc)
        n_start = lo + BLOCK_N
    else:  # every key block through the pipelined loop (its prologue requests the first STAGES-1 blocks at once)
        n_start = lo
    for n0 in tl.range(n_start, hi, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kv_off = offs_n.to(tl.int64)[:, None] * stride_kv + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=n_ok[:, None], other=0.0, cache_modifier=CM)
        v = tl.load(v_ptr + kv_off, mask=n_ok[:, None], other=0.0, cache_modifier=CM)
        m_i, l_i, acc = _attn_block(q, k, v, offs_n, n_ok, valid_ptr, T_PRE, rg, m_i, l_i, acc)
    if TS:
        tl.store(ts + 2, globaltimer(tl.sum(l_i, 0).to(tl.int32)))
    o_off = r.to(tl.int64)[:, None] * stride_om + (head * HD)[:, None] + offs_d[None, :]
    if SPLIT == 1:
        tl.store(o_ptr + o_off, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=i_ok[:, None])
    else:
        rows = NQ * R
        w_off = (pid_s * rows + offs_i).to(tl.int64)[:, None] * HD + offs_d[None, :]
        tl.store(ws_ptr + w_off, acc, mask=i_ok[:, None])
        tl.store(ml_ptr + (pid_s * rows + offs_i) * 2, m_i, mask=i_ok)
        tl.store(ml_ptr + (pid_s * rows + offs_i) * 2 + 1, l_i, mask=i_ok)
        if arrive_last(cnt_ptr + pid_m, SPLIT):
            m_all = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
            for s_ in tl.static_range(SPLIT):  # unrolled: every partial's load in flight at once
                m_all = tl.maximum(m_all, tl.load(ml_ptr + (s_ * rows + offs_i) * 2, mask=i_ok, other=-1e30, cache_modifier=".cg"))
            l_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
            o_all = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
            for s_ in tl.static_range(SPLIT):
                ms = tl.load(ml_ptr + (s_ * rows + offs_i) * 2, mask=i_ok, other=-1e30, cache_modifier=".cg")
                ls = tl.load(ml_ptr + (s_ * rows + offs_i) * 2 + 1, mask=i_ok, other=0.0, cache_modifier=".cg")
                f = tl.exp(ms - m_all)
                l_all += ls * f
                part = tl.load(ws_ptr + (s_ * rows + offs_i).to(tl.int64)[:, None] * HD + offs_d[None, :],
                               mask=i_ok[:, None], other=0.0, cache_modifier=".cg")
                o_all += part * f[:, None]
            tl.store(o_ptr + o_off, (o_all / l_all[:, None]).to(o_ptr.dtype.element_ty), mask=i_ok[:, None])
    if TS:
        tl.debug_barrier()
        tl.store(ts + 3, globaltimer(pid_m))


def action_attention(q, k, v, key_valid, t_prefix: int, row_start: int, num_heads: int, out=None,
                     split: int = 4, block=(64, 64), num_warps: int = 4, num_stages: int = 2, workspace=None, pdl: bool = False,
                     prefetch: bool = False, preload: bool = False, peel: bool = True):
    """q [R, NQ*HD] (query rows = suffix rows row_start..row_start+R), k/v cache [T_pre + S, HD],
    key_valid [>= T_pre] int -> out [R, NQ*HD]."""
    R, W = q.shape
    HD = W // num_heads
    TK = k.shape[0]
    assert k.shape[1] == HD and k.stride() == v.stride() and key_valid.shape[0] >= t_prefix
    assert row_start + R <= TK - t_prefix
    if out is None:
        out = torch.empty(R, W, dtype=q.dtype, device=q.device)
    BM, BN = block
    pdl = bool(pdl) and HAS_PDL and q.is_cuda
    if split <= 0:  # one key block per split
        split = triton.cdiv(TK, BN)
    chunk = triton.cdiv(triton.cdiv(TK, split), BN) * BN
    split = triton.cdiv(TK, chunk)  # no empty splits
    rows = num_heads * R
    grid = (triton.cdiv(rows, BM), split)
    ws, cnt = (workspace or default_workspace(q.device)).need(split * rows * (HD + 2) if split > 1 else 1, grid[0])
    ml = ws[split * rows * HD:]
    from pi0_triton_policy.kernels import skinny_matmul as SK  # profiling stamps share the skinny kernels' buffer

    ts = {}
    if SK.TIMESTAMPS is not None and q.is_cuda:
        first = sum(n for _, _, n in SK.TS_LOG) * 4
        SK.TS_LOG.append(("attn", first, grid[0] * grid[1]))
        ts = dict(ts_ptr=SK.TIMESTAMPS[first:], TS=True)
    _action_attention_kernel[grid](q, k, v, key_valid, out, ws, ml, cnt, R, t_prefix, TK, row_start,
                                   q.stride(0), k.stride(0), out.stride(0), chunk,
                                   NQ=num_heads, HD=HD, SPLIT=split, BLOCK_M=BM, BLOCK_N=BN, PDL=pdl, STAGES=num_stages,
                                   PREFETCH=bool(prefetch) and q.is_cuda and not INTERPRET and k.element_size() == 2,
                                   PRELOAD=bool(preload) and bool(peel), PEEL_KV=bool(peel),
                                   num_warps=num_warps, num_stages=num_stages, **ts, **pdl_kwargs(pdl))
    return out


def suffix_mask(key_valid, t_prefix: int, n_suffix: int, row_start: int, R: int) -> torch.Tensor:
    """[R, T_pre + n_suffix] bool: OpenPI's prefix-padding + suffix ar mask, for suffix rows row_start.."""
    pre = key_valid[:t_prefix].bool()[None, :].expand(R, t_prefix)
    rows = torch.arange(row_start, row_start + R, device=key_valid.device)[:, None]
    cols = torch.arange(n_suffix, device=key_valid.device)[None, :]
    suf = (cols == 0) | (rows > 0)
    return torch.cat([pre, suf], 1)


def action_attention_ref(q, k, v, key_valid, t_prefix: int, row_start: int, num_heads: int):
    from pi0_triton_policy.kernels.prefix_attention import masked_attention_ref

    R = q.shape[0]
    mask = suffix_mask(key_valid, t_prefix, k.shape[0] - t_prefix, row_start, R)
    return masked_attention_ref(q, k, v, mask, num_heads)
