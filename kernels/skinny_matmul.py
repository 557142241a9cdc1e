"""Weight-streaming matmul for skinny activations (M <= 64 rows: the action expert), with fused epilogues.

out = epilogue(a[M, K] @ W[K, N])   with W stored transposed, `wt` [N, K] (K contiguous), so each weight
row is one long contiguous read. One program owns BN output columns (two halves of BH = BN/2: "pairs",
see below) and one K range (split-K); the grid (N/BN, SPLIT) is sized to keep all SMs streaming. With
SPLIT > 1 each program writes an fp32 partial and the last program of a column tile to arrive sums
them in fixed order (`_common.arrive_last`), so results are bitwise deterministic.

The A operand is a plain (unnormalised) copy of the residual stream in the weight dtype, `a`; the
Gemma RMSNorm's row scale is applied in the epilogue (the matmul is linear in each row):
    rstd[row] = rsqrt(sum_t ss[t, row] / D + eps)       (ss: per-column-tile sums of squares, written by
                                                         the residual epilogue that produced `a`)
(1 + scale) is folded into the weights at load, as before.

Epilogues (EPI):
  EPI_RES  (0): x[:, cols] (+)= acc (+ bias)  (float32 residual stream; STORE: x = acc + bias instead of
                add), then a[:, cols] = x in the weight dtype and ss[tile, row] = sum over the tile's
                columns of x^2 (the next matmul's A and its norm statistics). Columns: natural order.
  EPI_GEGLU(1): h[:, j] = gelu_tanh(g * rstd) * (u * rstd), g/u = the two halves (gate/up rows of the
                weight interleaved per BH at load: `pair_perm_geglu`).
  EPI_QKV  (2): q/k/v rows with RoPE (split-half): the halves are head columns d and d + HD/2 of one head
                (`pair_perm_qkv`), rotated with the float32 tables; heads < NQ -> q, NQ -> k, NQ+1 -> v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import (HAS_PDL, INTERPRET, pdl_kwargs, arrive_last, bulk_prefetch_rows, default_workspace,
                                               gdc_launch_dependents, gdc_wait, gelu_tanh, gelu_tanh_ref, globaltimer)

EPI_RES, EPI_GEGLU, EPI_QKV = 0, 1, 2
PREFETCH = 0  # set by the engine (Tuning.prefetch): L2 prefetch of each program's weights at entry (1 lines, 2 bulk)
PDL_EARLY = False  # set by the engine (Tuning.pdl_early): signal dependents at entry instead of after gdc_wait
# Profiling (benchmarks/stack_probe.py): when TIMESTAMPS is an int64 CUDA tensor, each launch appends
# (name, first slot, programs) to TS_LOG and every program writes 4 %globaltimer stamps: entry, after gdc_wait,
# after the K loop, end.
TIMESTAMPS = None
TS_LOG: list = []
EARLY_EPI = True  # set by the engine (Tuning.sk_early_epi): epilogue operands loaded before the K loop (see _skinny_item)


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _skinny_kernel(
    a_ptr, wt_ptr, ws_ptr, cnt_ptr, ss_in_ptr,
    x_ptr, xa_ptr, ss_out_ptr, bias_ptr,  # EPI_RES
    h_ptr,  # EPI_GEGLU
    pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,  # EPI_QKV
    M, N, K, K_PER_SPLIT, stride_am, stride_x, stride_xa, stride_ss_in, stride_ss_out, stride_h, stride_q, stride_kv,
    D_NORM, eps,
    EPI: tl.constexpr, NORM_A: tl.constexpr, NSS_IN: tl.constexpr, STORE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
    PDL_EARLY: tl.constexpr = False, PREFETCH: tl.constexpr = False, KP: tl.constexpr = 1, LINE: tl.constexpr = 64,
    ts_ptr=None, TS: tl.constexpr = False, EARLY: tl.constexpr = False, PEEL: tl.constexpr = 1,
    w1_ptr=None, tb_ptr=None, SWISH_A: tl.constexpr = False, A_DIM: tl.constexpr = 32,
    BLOCKED_XA: tl.constexpr = False,
):
    ts = ts_ptr
    if TS:
        ts = ts_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * 4
    _skinny_item(tl.program_id(0), tl.program_id(1), a_ptr, wt_ptr, ws_ptr, cnt_ptr, ss_in_ptr, x_ptr, xa_ptr, ss_out_ptr,
                 bias_ptr, h_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                 M, N, K, K_PER_SPLIT, stride_am, stride_x, stride_xa, stride_ss_in, stride_ss_out, stride_h, stride_q,
                 stride_kv, D_NORM, eps, EPI, NORM_A, NSS_IN, STORE, HAS_BIAS, SPLIT, NQ, HD, BM, BH, BK, PDL,
                 PDL_EARLY, PREFETCH, KP, LINE, "", ts, TS, EARLY, PEEL, w1_ptr, tb_ptr, SWISH_A, A_DIM, BLOCKED_XA)


@triton.jit
def _swish_a(xt, w1_ptr, tb_ptr, offs_k, k_ok, m_ok, K, A_DIM: tl.constexpr):
    """SWISH_A: the A block [BM, BK] = swish(x_t @ w1[:, k] + tb[k]) (the time MLP's first half, as swish_in computes
    it), zero past the rows and the K range."""
    offs_a = tl.arange(0, A_DIM)
    w1 = tl.load(w1_ptr + offs_a[:, None] * K + offs_k[None, :], mask=k_ok[None, :], other=0.0)
    hh = tl.dot(xt, w1) + tl.load(tb_ptr + offs_k, mask=k_ok, other=0.0)[None, :]
    hh = hh / (1.0 + tl.exp2(-1.4426950408889634 * hh))  # swish; exp2: one MUFU.EX2 (_common.gelu_tanh's comment)
    return tl.where(m_ok[:, None] & k_ok[None, :], hh, 0.0)


@triton.jit
def _skinny_item(
    pid_n, pid_k, a_ptr, wt_ptr, ws_ptr, cnt_ptr, ss_in_ptr, x_ptr, xa_ptr, ss_out_ptr, bias_ptr, h_ptr,
    pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
    M, N, K, K_PER_SPLIT, stride_am, stride_x, stride_xa, stride_ss_in, stride_ss_out, stride_h, stride_q, stride_kv,
    D_NORM, eps,
    EPI: tl.constexpr, NORM_A: tl.constexpr, NSS_IN: tl.constexpr, STORE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
    PDL_EARLY: tl.constexpr, PREFETCH: tl.constexpr, KP: tl.constexpr, LINE: tl.constexpr, CM: tl.constexpr,
    ts_ptr=None, TS: tl.constexpr = False, EARLY: tl.constexpr = False, PEEL: tl.constexpr = 1,
    w1_ptr=None, tb_ptr=None, SWISH_A: tl.constexpr = False, A_DIM: tl.constexpr = 32,
    BLOCKED_XA: tl.constexpr = False,
):
    """One (column tile, K split) of the skinny matmul: the body of `_skinny_kernel`, also called by the persistent
    action-expert kernel (kernels/action_stack.py). CM: cache modifier of activation loads (".cg" there: the rows were
    written by other programs of the same launch, L1 must not serve stale copies). TS: profiling stamps (TIMESTAMPS).
    EARLY: the epilogue's other operands are requested before the K loop instead of after it, so their latency
    hides behind the weight stream: RoPE tables and bias before gdc_wait (inputs of the whole inference), the row
    norms' sums of squares and the residual tile right after it (written by the previous kernel).
    PEEL (0 or 1): whether the first K block's weights are loaded before gdc_wait. 1 makes the loop's weight requests
    wait behind that block's A tile and dot (in-order issue); 0 (the default) asks for every tile of the first
    STAGES-1 blocks at once after the wait: faster (benchmarks/NOTES.md session 5; preloading 2-4 blocks into
    registers was slower still, commit 3a7f2c0 has it).
    SWISH_A: a_ptr is x_t [M, A_DIM] (float32) and each A block is swish(x_t @ w1 + tb) computed on the spot (`_swish_a`:
    the action-time MLP's first half, which swish_in would write to memory for one more launch)."""
    BN: tl.constexpr = 2 * BH
    if TS:
        tl.store(ts_ptr, globaltimer(pid_n))
    offs_m = tl.arange(0, BM)
    m_ok = offs_m < M
    r1 = pid_n * BN + tl.arange(0, BH)  # weight rows (= workspace columns) of the two halves
    r2 = r1 + BH
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w1_rows = wt_ptr + r1.to(tl.int64)[:, None] * K
    w2_rows = wt_ptr + r2.to(tl.int64)[:, None] * K
    k_lo = pid_k * K_PER_SPLIT
    if PDL_EARLY:  # let the next kernel's programs be scheduled as soon as all of ours are
        gdc_launch_dependents()
    if PREFETCH == 2:  # ask L2 for this program's whole weight slab now (copy engine, one request per row)
        EB: tl.constexpr = wt_ptr.dtype.element_ty.primitive_bitwidth // 8
        bulk_prefetch_rows(wt_ptr + (pid_n * BN).to(tl.int64) * K + k_lo, tl.cast(K, tl.int64) * EB,
                           tl.minimum(K_PER_SPLIT, K - k_lo) * EB, BN)
    elif PREFETCH == 1:  # the same with one prefetch.global.L2 per 128-byte line, spread over the threads
        lines = k_lo + tl.arange(0, KP // LINE) * LINE
        pre_rows = pid_n * BN + tl.arange(0, BN)
        _prefetch_l2(wt_ptr + pre_rows.to(tl.int64)[:, None] * K + lines[None, :])
    j = tl.arange(0, BH)
    zt = tl.zeros((BM, BH), dtype=tl.float32)
    cs, sn, xo1, xo2 = zt, zt, zt, zt
    b1, b2 = tl.zeros((BH,), dtype=tl.float32), tl.zeros((BH,), dtype=tl.float32)
    rstd = tl.zeros((BM,), dtype=tl.float32)
    if EARLY:
        if EPI == 2:  # positions and RoPE tables: set before the inference, never written by a kernel
            HALF: tl.constexpr = HD // 2
            d = (pid_n % (HALF // BH)) * BH + j
            cs, sn = _rope_rows(pos_ptr, cos_ptr, sin_ptr, offs_m, m_ok, d, HALF)
        if EPI == 0 and HAS_BIAS:
            b1 = tl.load(bias_ptr + pid_n * BN + j).to(tl.float32)
            b2 = tl.load(bias_ptr + pid_n * BN + BH + j).to(tl.float32)
    # PEEL 1: the first K block's weight tiles are requested before waiting on the previous kernel (PDL) and consumed
    # by a dot outside the loop. PEEL 0: nothing before the wait; every tile goes through the loop's prologue at once.
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    offs_k0 = k_lo + tl.arange(0, BK)
    if PEEL:
        w1_0, w2_0 = _w_block(w1_rows, w2_rows, offs_k0, k_hi)
    if PDL:
        gdc_wait()  # the previous kernel's outputs (this kernel's A) are visible from here on
        if not PDL_EARLY:
            gdc_launch_dependents()
    if TS:
        tl.store(ts_ptr + 1, globaltimer(pid_n))
    if EARLY:  # the previous kernel's other outputs that the epilogue needs
        if NORM_A:
            rstd = _row_rstd(ss_in_ptr, stride_ss_in, offs_m, m_ok, D_NORM, eps, NSS_IN, BM, CM)
        if EPI == 0 and not STORE:
            px = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + (pid_n * BN + j)[None, :]
            xo1 = tl.load(px, mask=m_ok[:, None], other=0.0, cache_modifier=CM)
            xo2 = tl.load(px + BH, mask=m_ok[:, None], other=0.0, cache_modifier=CM)
    if SWISH_A:  # x_t: the previous kernel's output
        xt = tl.load(a_ptr + offs_m[:, None] * A_DIM + tl.arange(0, A_DIM)[None, :], mask=m_ok[:, None], other=0.0)
    if PEEL:
        if SWISH_A:
            a_0 = _swish_a(xt, w1_ptr, tb_ptr, offs_k0, offs_k0 < k_hi, m_ok, K, A_DIM)
        else:
            a_0 = tl.load(a_rows + offs_k0[None, :], mask=m_ok[:, None] & (offs_k0 < k_hi)[None, :], other=0.0,
                          cache_modifier=CM)
        acc1 = tl.dot(a_0, tl.trans(w1_0))
        acc2 = tl.dot(a_0, tl.trans(w2_0))
    else:
        acc1 = tl.zeros((BM, BH), dtype=tl.float32)
        acc2 = tl.zeros((BM, BH), dtype=tl.float32)
    for k0 in range(k_lo + PEEL * BK, k_lo + K_PER_SPLIT, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        w1 = tl.load(w1_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        w2 = tl.load(w2_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        if SWISH_A:
            a = _swish_a(xt, w1_ptr, tb_ptr, offs_k, k_ok, m_ok, K, A_DIM)
        else:
            a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0, cache_modifier=CM)
        acc1 += tl.dot(a, tl.trans(w1))
        acc2 += tl.dot(a, tl.trans(w2))
    if TS:
        tl.store(ts_ptr + 2, globaltimer(tl.sum(tl.sum(acc1, 1), 0).to(tl.int32)))
    if SPLIT > 1:
        p1 = ws_ptr + pid_k * BM * N + offs_m[:, None] * N + r1[None, :]
        tl.store(p1, acc1, mask=m_ok[:, None])  # padded rows (>= M) are neither stored nor read back
        tl.store(p1 + BH, acc2, mask=m_ok[:, None])
        if arrive_last(cnt_ptr + pid_n, SPLIT):
            acc1 = tl.zeros((BM, BH), dtype=tl.float32)
            acc2 = tl.zeros((BM, BH), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                p = ws_ptr + s * BM * N + offs_m[:, None] * N + r1[None, :]
                acc1 += tl.load(p, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
                acc2 += tl.load(p + BH, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            _skinny_epilogue(acc1, acc2, pid_n, offs_m, m_ok, ss_in_ptr, x_ptr, xa_ptr, ss_out_ptr, bias_ptr, h_ptr,
                             pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, stride_x, stride_xa, stride_ss_in,
                             stride_ss_out, stride_h, stride_q, stride_kv, D_NORM, eps,
                             EPI, NORM_A, NSS_IN, STORE, HAS_BIAS, NQ, HD, BM, BH, CM,
                             EARLY, rstd, xo1, xo2, cs, sn, b1, b2, BLOCKED_XA)
    else:
        _skinny_epilogue(acc1, acc2, pid_n, offs_m, m_ok, ss_in_ptr, x_ptr, xa_ptr, ss_out_ptr, bias_ptr, h_ptr,
                         pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, stride_x, stride_xa, stride_ss_in,
                         stride_ss_out, stride_h, stride_q, stride_kv, D_NORM, eps,
                         EPI, NORM_A, NSS_IN, STORE, HAS_BIAS, NQ, HD, BM, BH, CM,
                         EARLY, rstd, xo1, xo2, cs, sn, b1, b2, BLOCKED_XA)
    if TS:
        tl.debug_barrier()
        tl.store(ts_ptr + 3, globaltimer(pid_n))


@triton.jit
def _w_block(w1_rows, w2_rows, offs_k, k_hi):
    """The two weight half-tiles [BH, BK] of one K block (columns past this program's K range read as 0)."""
    k_ok = offs_k < k_hi
    w1 = tl.load(w1_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)
    w2 = tl.load(w2_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)
    return w1, w2



@triton.jit
def _rope_rows(pos_ptr, cos_ptr, sin_ptr, offs_m, m_ok, d, HALF: tl.constexpr):
    """cos/sin [BM, BH] of the rows' positions at head columns d (split-half RoPE tables [pos, HALF])."""
    pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    cs = tl.load(cos_ptr + pos[:, None] * HALF + d[None, :], mask=m_ok[:, None], other=0.0)
    sn = tl.load(sin_ptr + pos[:, None] * HALF + d[None, :], mask=m_ok[:, None], other=0.0)
    return cs, sn


@triton.jit
def _row_rstd(ss_in_ptr, stride_ss_in, offs_m, m_ok, D_NORM, eps, NSS_IN: tl.constexpr, BM: tl.constexpr,
              CM: tl.constexpr):
    """Gemma RMSNorm row scale from the per-column-tile sums of squares: rsqrt(sum / D + eps)."""
    tot = tl.zeros((BM,), dtype=tl.float32)
    for t in tl.static_range(NSS_IN):
        tot += tl.load(ss_in_ptr + t * stride_ss_in + offs_m, mask=m_ok, other=0.0, cache_modifier=CM)
    return 1.0 / tl.sqrt(tot / D_NORM + eps)


@triton.jit
def _skinny_epilogue(acc1, acc2, pid_n, offs_m, m_ok, ss_in_ptr, x_ptr, xa_ptr, ss_out_ptr, bias_ptr, h_ptr,
                     pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, stride_x, stride_xa, stride_ss_in,
                     stride_ss_out, stride_h, stride_q, stride_kv, D_NORM, eps,
                     EPI: tl.constexpr, NORM_A: tl.constexpr, NSS_IN: tl.constexpr, STORE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr,
                     CM: tl.constexpr = "", EARLY: tl.constexpr = False, rstd=None, xo1=None, xo2=None, cs=None, sn=None,
                     b1=None, b2=None, BLOCKED_XA: tl.constexpr = False):
    if NORM_A:
        if not EARLY:
            rstd = _row_rstd(ss_in_ptr, stride_ss_in, offs_m, m_ok, D_NORM, eps, NSS_IN, BM, CM)
        acc1 = acc1 * rstd[:, None]
        acc2 = acc2 * rstd[:, None]
    rows = offs_m.to(tl.int64)[:, None]
    j = tl.arange(0, BH)
    if EPI == 0:
        c1 = pid_n * 2 * BH + j
        c2 = c1 + BH
        if HAS_BIAS:
            if not EARLY:
                b1 = tl.load(bias_ptr + c1).to(tl.float32)
                b2 = tl.load(bias_ptr + c2).to(tl.float32)
            acc1 += b1[None, :]
            acc2 += b2[None, :]
        p1 = x_ptr + rows * stride_x + c1[None, :]
        mk = m_ok[:, None]
        if STORE:
            x1 = acc1
            x2 = acc2
        else:
            if not EARLY:
                xo1 = tl.load(p1, mask=mk, other=0.0, cache_modifier=CM)
                xo2 = tl.load(p1 + BH, mask=mk, other=0.0, cache_modifier=CM)
            x1 = acc1 + xo1
            x2 = acc2 + xo2
        tl.store(p1, x1, mask=mk)
        tl.store(p1 + BH, x2, mask=mk)
        if BLOCKED_XA:  # kernels/mega_chain.py's activation layout (to_blocked): 64-column blocks of stride_xa
            # elements, a row's 16-byte groups XOR-swizzled by the row
            pa = xa_ptr + rows * 64
            pa1 = pa + (c1 // 64)[None, :] * stride_xa + ((((c1 % 64) // 8)[None, :] ^ (rows % 8)) * 8) + (c1 % 8)[None, :]
            pa2 = pa + (c2 // 64)[None, :] * stride_xa + ((((c2 % 64) // 8)[None, :] ^ (rows % 8)) * 8) + (c2 % 8)[None, :]
            tl.store(pa1, x1.to(xa_ptr.dtype.element_ty), mask=mk)
            tl.store(pa2, x2.to(xa_ptr.dtype.element_ty), mask=mk)
        else:
            pa = xa_ptr + rows * stride_xa + c1[None, :]
            tl.store(pa, x1.to(xa_ptr.dtype.element_ty), mask=mk)
            tl.store(pa + BH, x2.to(xa_ptr.dtype.element_ty), mask=mk)
        tl.store(ss_out_ptr + pid_n * stride_ss_out + offs_m, tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1), mask=m_ok)
    elif EPI == 1:
        hcol = pid_n * BH + j
        hv = gelu_tanh(acc1) * acc2
        tl.store(h_ptr + rows * stride_h + hcol[None, :], hv.to(h_ptr.dtype.element_ty), mask=m_ok[:, None])
    else:
        HALF: tl.constexpr = HD // 2
        TPH: tl.constexpr = HALF // BH  # programs per head
        head = pid_n // TPH
        d = (pid_n % TPH) * BH + j
        mk = m_ok[:, None]
        if head <= NQ:
            if not EARLY:
                cs, sn = _rope_rows(pos_ptr, cos_ptr, sin_ptr, offs_m, m_ok, d, HALF)
            o1 = acc1 * cs - acc2 * sn
            o2 = acc2 * cs + acc1 * sn
        else:
            o1 = acc1
            o2 = acc2
        if head < NQ:
            dst = q_ptr + rows * stride_q + head * HD + d[None, :]
        elif head == NQ:
            dst = k_ptr + rows * stride_kv + d[None, :]
        else:
            dst = v_ptr + rows * stride_kv + d[None, :]
        tl.store(dst, o1.to(dst.dtype.element_ty), mask=mk)
        tl.store(dst + HALF, o2.to(dst.dtype.element_ty), mask=mk)


# ---------------------------------------------------------------- load-time layouts
def pair_perm_geglu(F: int, bh: int) -> torch.Tensor:
    """Column order of [gate | up] ([K, 2F]) so that program n owns gate cols n*bh.. and the matching up cols."""
    assert F % bh == 0, (F, bh)
    j = torch.arange(bh)
    return torch.cat([torch.cat([n * bh + j, F + n * bh + j]) for n in range(F // bh)])


def pair_perm_qkv(num_heads: int, head_dim: int, bh: int) -> torch.Tensor:
    """Column order of [q heads | k | v] so that each program owns columns d and d + head_dim/2 of one head."""
    half = head_dim // 2
    assert half % bh == 0, (head_dim, bh)
    j = torch.arange(bh)
    cols = []
    for h in range(num_heads + 2):
        for t in range(half // bh):
            c = h * head_dim + t * bh + j
            cols.append(torch.cat([c, c + half]))
    return torch.cat(cols)


def transpose_weight(w: torch.Tensor, perm: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    """W [K, N] -> W^T [N, K] contiguous (columns permuted first when `perm` is given)."""
    if perm is not None:
        w = w[:, perm.to(w.device)]
    return w.t().to(dtype or w.dtype).contiguous()


# ---------------------------------------------------------------- launcher
def _launch(a, wt, epi, split, block, num_warps, num_stages, workspace, pdl=False, ss_in=None, d_norm=1, nss_in=1, eps=1e-6,
            x=None, xa=None, ss_out=None, bias=None, store=False, h=None, pos=None, cos=None, sin=None, q=None, k=None,
            v=None, num_heads=1, head_dim=2, peel=1, swish=None, xa_block=0):
    M, K = a.shape
    N, K2 = wt.shape
    sw = {}
    if swish is not None:  # a is x_t [M, A]: A = swish(x_t @ w1 + tb) block by block (SWISH_A)
        w1, tb = swish
        assert w1.shape == (K, K2) and tb.shape == (K2,) and a.is_contiguous() and w1.is_contiguous(), (a.shape, w1.shape)
        assert a.dtype == w1.dtype == tb.dtype == torch.float32 and K == triton.next_power_of_2(K) >= 16
        sw = dict(w1_ptr=w1, tb_ptr=tb, SWISH_A=True, A_DIM=K)
        K = K2
    assert K == K2 and a.stride(1) == 1 and wt.is_contiguous(), (a.shape, wt.shape)
    BM, BH, BK = block
    BM = max(BM, triton.next_power_of_2(M))
    pdl = bool(pdl) and HAS_PDL and a.is_cuda
    assert M <= BM and N % (2 * BH) == 0, (M, N, BH)
    split = max(1, min(split, triton.cdiv(K, BK)))
    k_per = triton.cdiv(triton.cdiv(K, split), BK) * BK
    split = triton.cdiv(K, k_per)
    peel = 1 if peel else 0
    grid = (N // (2 * BH), split)
    line = 128 // wt.element_size()
    prefetch = int(PREFETCH) if a.is_cuda and not INTERPRET else 0
    if prefetch == 1 and not (k_per % line == 0 and (k_per // line) & (k_per // line - 1) == 0):
        prefetch = 0
    if prefetch == 2 and (K * wt.element_size()) % 16:
        prefetch = 0  # bulk copies need 16-byte aligned rows
    ws, cnt = (workspace or default_workspace(a.device)).need(split * BM * N if split > 1 else 1, grid[0])
    dummy = ws
    ts = {}
    if TIMESTAMPS is not None and a.is_cuda:
        first = sum(n for _, _, n in TS_LOG) * 4
        TS_LOG.append(({0: "res", 1: "geglu", 2: "qkv"}[epi], first, grid[0] * grid[1]))
        ts = dict(ts_ptr=TIMESTAMPS[first:], TS=True)
    _skinny_kernel[grid](
        a, wt, ws, cnt, ss_in if ss_in is not None else dummy,
        x if x is not None else dummy, xa if xa is not None else dummy, ss_out if ss_out is not None else dummy,
        bias if bias is not None else dummy, h if h is not None else dummy,
        pos if pos is not None else cnt, cos if cos is not None else dummy, sin if sin is not None else dummy,
        q if q is not None else dummy, k if k is not None else dummy, v if v is not None else dummy,
        M, N, K, k_per, a.stride(0), x.stride(0) if x is not None else 0,
        xa_block if xa_block else (xa.stride(0) if xa is not None else 0),
        ss_in.stride(0) if ss_in is not None else 0, ss_out.stride(0) if ss_out is not None else 0,
        h.stride(0) if h is not None else 0, q.stride(0) if q is not None else 0, k.stride(0) if k is not None else 0,
        d_norm, eps,
        EPI=epi, NORM_A=ss_in is not None, NSS_IN=nss_in, STORE=store, HAS_BIAS=bias is not None, SPLIT=split,
        NQ=num_heads, HD=head_dim, BM=BM, BH=BH, BK=BK, PDL=pdl, PDL_EARLY=pdl and PDL_EARLY, PREFETCH=prefetch, KP=k_per, LINE=line, num_warps=num_warps, num_stages=num_stages,
        EARLY=bool(EARLY_EPI), PEEL=peel, BLOCKED_XA=bool(xa_block), **ts, **sw, **pdl_kwargs(pdl))


def skinny_residual(a, wt, x, xa, ss_out, bias=None, store=False, ss_in=None, nss_in=1, d_norm=1, eps=1e-6,
                    split=1, block=(64, 32, 128), num_warps=4, num_stages=4, workspace=None, pdl=False, peel=1, swish=None,
                    xa_block=0):
    """x [M, N] fp32 (+)= a [M, K] @ wt.T (+ bias); xa [M, N] = x in xa's dtype; ss_out [N/BN, >=M] = per-tile
    row sums of x^2. With ss_in the product is row-scaled by rsqrt(sum ss_in / d_norm + eps) first. swish = (w1
    [A, K], tb [K]): a is x_t [M, A] and the A operand is swish(x_t @ w1 + tb) (swish_in's output, never stored).
    xa_block > 0: xa is flat, in kernels/mega_chain.py's blocked layout with 64-column blocks of xa_block elements
    (`to_blocked`), so the persistent kernel reads this output without a staging pass."""
    M = a.shape[0]
    assert x.shape == (M, wt.shape[0]) and x.dtype == torch.float32 and x.stride(1) == 1
    assert (xa.dim() == 1 and xa.numel() >= (wt.shape[0] // 64) * xa_block and M <= xa_block // 64) if xa_block \
        else xa.stride(1) == 1
    assert ss_out.shape[0] == wt.shape[0] // (2 * block[1]) and ss_out.stride(1) == 1
    _launch(a, wt, EPI_RES, split, block, num_warps, num_stages, workspace, pdl, ss_in=ss_in, d_norm=d_norm, nss_in=nss_in,
            eps=eps, x=x, xa=xa, ss_out=ss_out, bias=bias, store=store, peel=peel, swish=swish, xa_block=xa_block)
    return x


def skinny_geglu(a, wt, h, ss_in=None, nss_in=1, d_norm=1, eps=1e-6, split=1, block=(64, 32, 128), num_warps=4,
                 num_stages=4, workspace=None, pdl=False, peel=1):
    """h [M, F] = gelu_tanh(n(a) @ Wg) * (n(a) @ Wu), wt = transpose_weight([Wg | Wu], pair_perm_geglu(F, BH))."""
    assert h.shape == (a.shape[0], wt.shape[0] // 2) and h.stride(1) == 1
    _launch(a, wt, EPI_GEGLU, split, block, num_warps, num_stages, workspace, pdl, ss_in=ss_in, d_norm=d_norm,
            nss_in=nss_in, eps=eps, h=h, peel=peel)
    return h


def skinny_qkv_rope(a, wt, pos, cos, sin, q, k, v, num_heads, head_dim, ss_in=None, nss_in=1, d_norm=1, eps=1e-6,
                    split=1, block=(64, 32, 128), num_warps=4, num_stages=4, workspace=None, pdl=False, peel=1):
    """q [M, NQ*HD], k/v rows [M, HD] = RoPE'd n(a) @ Wqkv, wt = transpose_weight(Wqkv, pair_perm_qkv(NQ, HD, BH))."""
    assert wt.shape[0] == (num_heads + 2) * head_dim and (head_dim // 2) % block[1] == 0
    assert q.stride(1) == 1 and k.stride() == v.stride() and k.stride(1) == 1
    _launch(a, wt, EPI_QKV, split, block, num_warps, num_stages, workspace, pdl, ss_in=ss_in, d_norm=d_norm,
            nss_in=nss_in, eps=eps, pos=pos, cos=cos, sin=sin, q=q, k=k, v=v, num_heads=num_heads, head_dim=head_dim,
            peel=peel)
    return q, k, v


# ---------------------------------------------------------------- small helpers
@triton.jit
def _prep_rows_kernel(x_ptr, xa_ptr, ss_ptr, D, stride_x, stride_xa, stride_ss, NSS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=ok, other=0.0)
    tl.store(xa_ptr + row.to(tl.int64) * stride_xa + offs, x.to(xa_ptr.dtype.element_ty), mask=ok)
    tl.store(ss_ptr + row, tl.sum(x * x, 0))
    for t in tl.static_range(1, NSS):
        tl.store(ss_ptr + t * stride_ss + row, 0.0)


def prep_rows(x, xa, ss):
    """xa = x in xa's dtype, ss[0, row] = sum(x^2), ss[1:, row] = 0: the A operand + norm statistics of rows x."""
    M, D = x.shape
    assert xa.shape == (M, D) and ss.shape[1] >= M and x.stride(1) == 1 and xa.stride(1) == 1 and ss.stride(1) == 1
    _prep_rows_kernel[(M,)](x, xa, ss, D, x.stride(0), xa.stride(0), ss.stride(0), NSS=ss.shape[0],
                            BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return xa, ss


@triton.jit
def _swish_in_kernel(x_ptr, w1_ptr, tb_ptr, h_ptr, R, W, stride_h, A: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_a = tl.arange(0, A)
    m_ok, n_ok = offs_m < R, offs_n < W
    x = tl.load(x_ptr + offs_m[:, None] * A + offs_a[None, :], mask=m_ok[:, None], other=0.0)
    hh = _swish_a(x, w1_ptr, tb_ptr, offs_n, n_ok, m_ok, W, A)  # the same block SWISH_A computes in the matmul
    tl.store(h_ptr + offs_m[:, None] * stride_h + offs_n[None, :], hh.to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def swish_in(x, w1, tb, h, block_n: int = 64):
    """h [R, W] = swish(x [R, A] @ w1 [A, W] + tb [W]): the first half of the action-time MLP (time bias folded)."""
    R, A = x.shape
    W = w1.shape[1]
    assert h.shape == (R, W) and x.is_contiguous() and w1.is_contiguous() and h.stride(1) == 1
    BM = max(16, triton.next_power_of_2(R))
    _swish_in_kernel[(triton.cdiv(W, block_n),)](x, w1, tb, h, R, W, h.stride(0), A=A, BM=BM, BN=block_n, num_warps=4)
    return h


# ---------------------------------------------------------------- references
def rstd_ref(a, eps=1e-6):
    a = a.float()
    return torch.rsqrt(a.square().mean(-1, keepdim=True) + eps)


def skinny_residual_ref(a, w, x, bias=None, store=False, norm=False, eps=1e-6):
    y = a.float() @ w.float()
    if norm:
        y = y * rstd_ref(a, eps)
    y = y + (bias.float() if bias is not None else 0)
    return y if store else x.float() + y


def skinny_geglu_ref(a, wg, wu, norm=False, eps=1e-6):
    s = rstd_ref(a, eps) if norm else 1.0
    return gelu_tanh_ref(a.float() @ wg.float() * s) * (a.float() @ wu.float() * s)
