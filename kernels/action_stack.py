"""Persistent action expert: every layer of one flow step in ONE launch, phases separated by grid barriers.

Why: at M = 50 rows the action expert is 180 layer-steps x 5 weight-streaming kernels, each ~10 us although its
weights take 1.4-5.6 us at DRAM speed (benchmarks/NOTES.md, "Why the skinny kernels are still ~10 us"): launch,
pipeline fill and split-K tail are paid 900 times. Here one program per SM walks through the layers; per layer

    A  qkv + RMSNorm + RoPE      (skinny_matmul._skinny_item, EPI_QKV; K/V rows go straight into the layer's cache)
    B  attention                 (action_attention._attention_item: split-KV, last program of a row block merges)
    C  o-proj + residual         (split-K, last program of a column tile reduces in fixed order; writes x, bf16 x, ss)
    D  gate|up + GeGLU           (the RMSNorm's row scale applied in the epilogue from C's sums of squares)
    E  down + residual           (as C)

with a grid-wide barrier between phases (each phase reads what all programs wrote in the previous one). The
kernel is the same math as the per-kernel skinny path, item for item, so results are bitwise identical to it.

Weight streaming across barriers (PREFETCH): before a barrier each program can ask L2 for the weight slab (or,
for attention, its share of the layer's K/V rows) of the phase AHEAD phases later: 1 = `prefetch.global.L2` per
128-byte line, 2 = `cp.async.bulk.prefetch.L2` per weight row, 0 = off. Barriers (BARRIER): 0 = one arrival
counter (thread 0 of each program polls it), 1 = one flag per program.

Status (benchmarks/NOTES.md, session 4): slower than the per-kernel path with PDL. A grid barrier costs ~2.1 us
(counter; 3.5 us with flags) against a hardware-resolved PDL boundary, and every phase still costs what its
separate kernel did (~9.4 us); prefetching made it slower (57.5 us per layer-step without, 65.7 per-line, 85.9
bulk, vs 46.5 for the per-kernel path). Opt-in (`Tuning.act_stack`), with the probe's best settings (counter
barrier, no prefetch) as defaults, for work on finer-grained dependencies (per-tile flags instead of barriers).
End to end these settings measured 20.6 ms at 1 camera, slower than the first version (all threads polling the
counter, per-line prefetch: 16.7 ms, commit 12f0fe6); that disagreement with the isolated probe is not resolved.

Requirements: all NPROG programs resident at once (NPROG <= SMs, one program per SM fits), which the launcher
ensures; the barrier memory `bar` is zero at launch (the engine zeroes it once per graph replay). Without a GPU
(TRITON_INTERPRET=1 runs programs one after another, so a barrier would never open) the launcher runs the same
kernel one (layer, phase) per launch instead: `grid_sync=False`. Activations written inside the launch are read
with `.cg` (L2) so no SM sees a stale L1 copy from the previous layer.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import HAS_PDL, INTERPRET, bulk_prefetch_rows, gdc_wait, pdl_kwargs
from pi0_triton_policy.kernels.action_attention import _attention_item
from pi0_triton_policy.kernels.skinny_matmul import EPI_GEGLU, EPI_QKV, EPI_RES, _prefetch_l2, _skinny_item

CNT_ATT, CNT_O, CNT_DN = 0, 1024, 2048  # arrival-counter regions (attention row blocks, o tiles, down tiles)
NUM_PHASES = 5
# the same constants as seen from inside @triton.jit code (globals there must be constexpr)
_CNT_ATT, _CNT_O, _CNT_DN = tl.constexpr(CNT_ATT), tl.constexpr(CNT_O), tl.constexpr(CNT_DN)
_NPH = tl.constexpr(NUM_PHASES)
_EPI_RES, _EPI_GEGLU, _EPI_QKV = tl.constexpr(EPI_RES), tl.constexpr(EPI_GEGLU), tl.constexpr(EPI_QKV)


@triton.jit
def _spin_until(bar_ptr, target):
    """Thread 0 of the program polls the counter (ld.acquire.gpu) until it reaches `target`, then fences; the
    other threads skip ahead to the CTA barrier that follows. (A plain Triton loop would have all 128 threads of
    all programs hammer one L2 line, slowing the arrivals it waits for.)"""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred %p<2>;
        .reg .u32 %v;
        .reg .u32 %t;
        mov.u32 %t, %tid.x;
        setp.ne.u32 %p0, %t, 0;
        @%p0 bra SPIN_DONE_${:uid};
        SPIN_LOOP_${:uid}:
        ld.acquire.gpu.global.u32 %v, [$1];
        setp.lt.u32 %p1, %v, $2;
        @%p1 bra SPIN_LOOP_${:uid};
        fence.acq_rel.gpu;
        SPIN_DONE_${:uid}:
        mov.u32 $0, 0;
        }""", "=r,l,r", [bar_ptr, target], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _grid_sync(bar_ptr, target):
    """Arrive at the launch's barrier counter and wait until `target` arrivals (cumulative over the launch)."""
    tl.debug_barrier()  # all of this program's stores issued before the (cumulative) release below
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")  # one thread per program
    _spin_until(bar_ptr, target)
    tl.debug_barrier()  # the rest of the program waits for thread 0's acquire


@triton.jit
def _flag_arrive(flag_ptr, gen):
    """Thread 0: fence, then st.release this program's flag = gen (no contended atomics: one flag per program)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred %p;
        .reg .u32 %t;
        mov.u32 %t, %tid.x;
        setp.eq.u32 %p, %t, 0;
        @%p fence.acq_rel.gpu;
        @%p st.release.gpu.global.u32 [$1], $2;
        mov.u32 $0, 0;
        }""", "=r,l,r", [flag_ptr, gen], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fence_acquire(x):
    return tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [x], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def _grid_sync_flags(flags_ptr, pid, gen, NPROG: tl.constexpr):
    """Per-program flags: each program publishes `gen`, then all its threads poll every flag (plain loads of a few
    shared lines, no atomics serialising on one address) until the smallest is >= gen."""
    tl.debug_barrier()
    _flag_arrive(flags_ptr + pid, gen)
    NP2: tl.constexpr = triton.next_power_of_2(NPROG)
    offs = tl.arange(0, NP2)
    ok = offs < NPROG
    seen = tl.min(tl.load(flags_ptr + offs, mask=ok, other=1 << 30, volatile=True), 0)
    while seen < gen:
        seen = tl.min(tl.load(flags_ptr + offs, mask=ok, other=1 << 30, volatile=True), 0)
    _fence_acquire(seen)
    tl.debug_barrier()


@triton.jit
def _prefetch_rows(w_ptr, row0, K, k0, NROWS: tl.constexpr, KLEN: tl.constexpr, LINE: tl.constexpr, MODE: tl.constexpr):
    if MODE == 2:
        EB: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        start = w_ptr + tl.cast(row0, tl.int64) * K + k0
        bulk_prefetch_rows(start, tl.cast(K, tl.int64) * EB, KLEN * EB, NROWS)
    else:
        rows = row0 + tl.arange(0, NROWS)
        cols = k0 + tl.arange(0, KLEN // LINE) * LINE
        _prefetch_l2(w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :])


@triton.jit
def _prefetch_phase(ph: tl.constexpr, layer, pid, wqkv_ptr, wo_ptr, wgu_ptr, wdn_ptr, kc_ptr, vc_ptr, kv_layer_stride,
                    D: tl.constexpr, F: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
                    BH_QKV: tl.constexpr, BH_GU: tl.constexpr, BH_RES: tl.constexpr, SPLIT_O: tl.constexpr,
                    SPLIT_DN: tl.constexpr, KV_LINES: tl.constexpr, LINE: tl.constexpr, MODE: tl.constexpr):
    """L2 prefetch of the slab this program streams in phase `ph` of `layer` (its first item)."""
    lay = tl.cast(layer, tl.int64)
    if ph == 0:
        NT: tl.constexpr = (NQ + 2) * HD // (2 * BH_QKV)
        if pid < NT:
            _prefetch_rows(wqkv_ptr + lay * ((NQ + 2) * HD * D), pid * 2 * BH_QKV, D, 0, 2 * BH_QKV, D, LINE, MODE)
    elif ph == 1:  # the layer's K/V rows, spread over programs (LINE-element lines of HD-element rows)
        if MODE == 2:  # one contiguous chunk of K and of V per program, clamped to the layer
            CH: tl.constexpr = KV_LINES * LINE
            st = tl.cast(tl.maximum(tl.minimum(pid * CH, kv_layer_stride - CH), 0), tl.int64)
            bulk_prefetch_rows(kc_ptr + lay * kv_layer_stride + st, st * 0, CH * 2, 1)
            bulk_prefetch_rows(vc_ptr + lay * kv_layer_stride + st, st * 0, CH * 2, 1)
        else:
            last = kv_layer_stride // LINE - 1  # clamp: never past the layer's rows (the last layer ends the tensor)
            lines = tl.minimum(pid * KV_LINES + tl.arange(0, KV_LINES), last).to(tl.int64) * LINE
            _prefetch_l2(kc_ptr + lay * kv_layer_stride + lines)
            _prefetch_l2(vc_ptr + lay * kv_layer_stride + lines)
    elif ph == 2:
        NT_O: tl.constexpr = D // (2 * BH_RES)
        KPS: tl.constexpr = NQ * HD // SPLIT_O
        if pid < NT_O * SPLIT_O:
            _prefetch_rows(wo_ptr + lay * (D * NQ * HD), (pid % NT_O) * 2 * BH_RES, NQ * HD, (pid // NT_O) * KPS,
                           2 * BH_RES, KPS, LINE, MODE)
    elif ph == 3:
        if pid < F // BH_GU:
            _prefetch_rows(wgu_ptr + lay * (2 * F * D), pid * 2 * BH_GU, D, 0, 2 * BH_GU, D, LINE, MODE)
    else:
        NT_D: tl.constexpr = D // (2 * BH_RES)
        KPS_D: tl.constexpr = F // SPLIT_DN
        if pid < NT_D * SPLIT_DN:
            _prefetch_rows(wdn_ptr + lay * (D * F), (pid % NT_D) * 2 * BH_RES, F, (pid // NT_D) * KPS_D,
                           2 * BH_RES, KPS_D, LINE, MODE)


@triton.jit
def _action_stack_kernel(
    xs_ptr, xa_ptr, ss_ptr, q_ptr, o_ptr, h_ptr,  # suffix rows r0..: residual (fp32), its bf16 copy, norm stats
    kc_ptr, vc_ptr, valid_ptr, pos_ptr, cos_ptr, sin_ptr,  # KV caches [L, TK, HD]; positions of the suffix rows
    wqkv_ptr, wo_ptr, wgu_ptr, wdn_ptr,  # stacked skinny layouts [L, N, K]
    ws_ptr, cnt_ptr, aws_ptr, aml_ptr, bar_ptr,
    R, T_PRE, TK, row_start, layer_lo, layer_hi, ph_lo, ph_hi, stride_ss, kv_layer_stride, att_chunk, eps,
    D: tl.constexpr, F: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr, NSS: tl.constexpr, BM: tl.constexpr,
    BH_QKV: tl.constexpr, BK_QKV: tl.constexpr, BH_GU: tl.constexpr, BK_GU: tl.constexpr, BH_RES: tl.constexpr,
    BK_O: tl.constexpr, SPLIT_O: tl.constexpr, BK_DN: tl.constexpr, SPLIT_DN: tl.constexpr,
    ATT_BM: tl.constexpr, ATT_BN: tl.constexpr, ATT_SPLIT: tl.constexpr, ATT_STAGES: tl.constexpr,
    NPROG: tl.constexpr, GRID_SYNC: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr,
    KV_LINES: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr = 64, WORK: tl.constexpr = 31,
    BARRIER: tl.constexpr = 1,
):
    pid = tl.program_id(0)
    NQKV: tl.constexpr = (NQ + 2) * HD
    WA: tl.constexpr = NQ * HD  # attention width (o-proj K)
    NT_QKV: tl.constexpr = NQKV // (2 * BH_QKV)
    NT_RES: tl.constexpr = D // (2 * BH_RES)
    NT_GU: tl.constexpr = F // BH_GU
    n_att = tl.cdiv(NQ * R, ATT_BM) * ATT_SPLIT
    if PREFETCH:  # the first AHEAD phases' slabs (the barrier-time prefetch covers the rest)
        for pre in tl.static_range(AHEAD):
            _prefetch_phase(pre % 5, layer_lo + pre // 5, pid, wqkv_ptr, wo_ptr, wgu_ptr, wdn_ptr, kc_ptr, vc_ptr,
                            kv_layer_stride, D, F, NQ, HD, BH_QKV, BH_GU, BH_RES, SPLIT_O, SPLIT_DN, KV_LINES, LINE, PREFETCH)
    if PDL:
        gdc_wait()  # the time MLP's rows (and the caches) are visible from here on
    for layer in range(layer_lo, layer_hi):
        lay = tl.cast(layer, tl.int64)
        wq = wqkv_ptr + lay * (NQKV * D)
        wo = wo_ptr + lay * (D * WA)
        wg = wgu_ptr + lay * (2 * F * D)
        wd = wdn_ptr + lay * (D * F)
        kl = kc_ptr + lay * kv_layer_stride
        vl = vc_ptr + lay * kv_layer_stride
        for ph in tl.static_range(_NPH):
            if (ph >= ph_lo) & (ph < ph_hi):
                if GRID_SYNC:
                    if PREFETCH:
                        nxt_layer = layer + (ph + AHEAD) // 5
                        if nxt_layer < layer_hi:
                            _prefetch_phase((ph + AHEAD) % 5, nxt_layer, pid, wqkv_ptr, wo_ptr, wgu_ptr, wdn_ptr, kc_ptr,
                                            vc_ptr, kv_layer_stride, D, F, NQ, HD, BH_QKV, BH_GU, BH_RES, SPLIT_O,
                                            SPLIT_DN, KV_LINES, LINE, PREFETCH)
                    nb = (layer - layer_lo) * _NPH + ph  # barriers passed before this phase
                    if nb > 0:
                        if BARRIER == 1:
                            _grid_sync_flags(bar_ptr, pid, nb, NPROG)
                        else:
                            _grid_sync(bar_ptr, nb * NPROG)
                if (WORK >> ph) % 2 == 0:  # phase switched off (timing probes only: benchmarks/stack_probe.py)
                    pass
                elif ph == 0:  # qkv + norm + RoPE -> q, and this layer's suffix K/V cache rows
                    for it in range(pid, NT_QKV, NPROG):
                        _skinny_item(it, 0, xa_ptr, wq, ws_ptr, cnt_ptr, ss_ptr, xs_ptr, xa_ptr, ss_ptr, ws_ptr, h_ptr,
                                     pos_ptr, cos_ptr, sin_ptr, q_ptr, kl + (T_PRE + row_start) * HD,
                                     vl + (T_PRE + row_start) * HD,
                                     R, NQKV, D, D, D, 0, 0, stride_ss, 0, 0, WA, HD, D, eps,
                                     _EPI_QKV, True, NSS, False, False, 1, NQ, HD, BM, BH_QKV, BK_QKV, False,
                                     False, False, 1, LINE, ".cg", ws_ptr, False, False)
                elif ph == 1:  # attention over the prefix + suffix keys
                    for it in range(pid, n_att, NPROG):
                        _attention_item(it // ATT_SPLIT, it % ATT_SPLIT, q_ptr, kl, vl, valid_ptr, o_ptr, aws_ptr, aml_ptr,
                                        cnt_ptr + _CNT_ATT, R, T_PRE, TK, row_start, WA, HD, WA, att_chunk,
                                        NQ, HD, ATT_SPLIT, ATT_BM, ATT_BN, ATT_STAGES, ".cg", False,
                                        None, None)
                elif ph == 2:  # o-proj + residual
                    for it in range(pid, NT_RES * SPLIT_O, NPROG):
                        _skinny_item(it % NT_RES, it // NT_RES, o_ptr, wo, ws_ptr, cnt_ptr + _CNT_O, ss_ptr, xs_ptr, xa_ptr,
                                     ss_ptr, ws_ptr, h_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kl, vl,
                                     R, D, WA, WA // SPLIT_O, WA, D, D, 0, stride_ss, 0, 0, 0, 1, eps,
                                     _EPI_RES, False, 1, False, False, SPLIT_O, NQ, HD, BM, BH_RES, BK_O, False,
                                     False, False, 1, LINE, ".cg", ws_ptr, False, False)
                elif ph == 3:  # gate|up + norm + GeGLU
                    for it in range(pid, NT_GU, NPROG):
                        _skinny_item(it, 0, xa_ptr, wg, ws_ptr, cnt_ptr, ss_ptr, xs_ptr, xa_ptr, ss_ptr, ws_ptr, h_ptr,
                                     pos_ptr, cos_ptr, sin_ptr, q_ptr, kl, vl,
                                     R, 2 * F, D, D, D, 0, 0, stride_ss, 0, F, 0, 0, D, eps,
                                     _EPI_GEGLU, True, NSS, False, False, 1, NQ, HD, BM, BH_GU, BK_GU, False,
                                     False, False, 1, LINE, ".cg", ws_ptr, False, False)
                else:  # down + residual
                    for it in range(pid, NT_RES * SPLIT_DN, NPROG):
                        _skinny_item(it % NT_RES, it // NT_RES, h_ptr, wd, ws_ptr, cnt_ptr + _CNT_DN, ss_ptr, xs_ptr,
                                     xa_ptr, ss_ptr, ws_ptr, h_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kl, vl,
                                     R, D, F, F // SPLIT_DN, F, D, D, 0, stride_ss, 0, 0, 0, 1, eps,
                                     _EPI_RES, False, 1, False, False, SPLIT_DN, NQ, HD, BM, BH_RES, BK_DN, False,
                                     False, False, 1, LINE, ".cg", ws_ptr, False, False)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class StackPlan:
    """Launch constants of the persistent kernel for one model shape and camera count (checked once)."""

    def __init__(self, D: int, F: int, NQ: int, HD: int, TK: int, bh_qkv: int, bh_gu: int, bh_res: int, bk_qkv=128,
                 bk_gu=128, bk_o=128, split_o=4, bk_dn=128, split_dn=4, attn=(16, 64, 2, 8), nprog: int = 0,
                 stages: int = 4, num_warps: int = 4, prefetch: int = 0, ahead: int = 2, pdl: bool = True,
                 barrier: int = 0, device=None):
        import torch

        self.D, self.F, self.NQ, self.HD, self.TK = D, F, NQ, HD, TK
        self.bh_qkv, self.bh_gu, self.bh_res = bh_qkv, bh_gu, bh_res
        WA = NQ * HD
        assert ((NQ + 2) * HD) % (2 * bh_qkv) == 0 and (HD // 2) % bh_qkv == 0, (NQ, HD, bh_qkv)
        assert D % (2 * bh_res) == 0 and F % bh_gu == 0, (D, F, bh_res, bh_gu)
        assert WA % split_o == 0 and F % split_dn == 0, (WA, split_o, F, split_dn)
        self.split_o, self.split_dn = split_o, split_dn
        self.bk_qkv, self.bk_gu = min(bk_qkv, D), min(bk_gu, D)
        self.bk_o, self.bk_dn = min(bk_o, WA // split_o), min(bk_dn, F // split_dn)
        for k, bk in ((D, self.bk_qkv), (D, self.bk_gu), (WA // split_o, self.bk_o), (F // split_dn, self.bk_dn)):
            assert k % bk == 0, (k, bk)
        bm, bn, astages, asplit = attn
        self.att_bm, self.att_bn, self.att_stages = bm, bn, astages
        chunk = triton.cdiv(triton.cdiv(TK, max(1, asplit)), bn) * bn
        self.att_chunk, self.att_split = chunk, triton.cdiv(TK, chunk)
        on_gpu = device is not None and torch.device(device).type == "cuda"
        if nprog <= 0:
            nprog = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 4
        self.nprog, self.stages, self.num_warps = nprog, stages, num_warps
        self.grid_sync = on_gpu and not INTERPRET
        line = 64  # bf16 elements per 128-byte line
        sizes_ok = all(_pow2(n) and n % line == 0 for n in (D, WA // split_o, F // split_dn))
        # prefetch: 0 off, 1 prefetch.global.L2 per 128-byte line, 2 cp.async.bulk.prefetch.L2 per weight row
        ok = self.grid_sync and sizes_ok and _pow2(2 * bh_qkv) and _pow2(2 * bh_res) and _pow2(2 * bh_gu)
        self.prefetch = int(prefetch) if ok else 0
        self.barrier = barrier  # 1: per-program flags (bar holds >= nprog int32), 0: one arrival counter
        self.ahead = ahead
        self.kv_lines = triton.next_power_of_2(max(1, triton.cdiv(TK * HD // line, nprog)))
        self.pdl = bool(pdl) and HAS_PDL and self.grid_sync
        self.bm = 64
        self.work = 31  # bit per phase; probes switch phases off to time the rest

    def workspace_numel(self) -> tuple[int, int]:
        """(skinny split-K partials, attention partials + (m, l)) sizes in float32 elements for R <= 64 rows."""
        rows = self.NQ * self.bm
        return max(self.split_o, self.split_dn) * self.bm * self.D, self.att_split * rows * (self.HD + 2)


def action_stack(plan: StackPlan, xs, xa, ss, q, o, h, kc, vc, key_valid, pos, cos, sin, wqkv, wo, wgu, wdn, ws, cnt,
                 aws, bar, t_prefix: int, row_start: int, eps: float, layers: tuple[int, int] | None = None):
    """All action-expert layers of one flow step on the suffix rows row_start.. (R = xs.shape[0] rows).

    xs [R, D] fp32 residual (in/out), xa [R, D] its weight-dtype copy, ss [NSS, >=R] its per-tile row sums of
    squares (stride(0) free), q/o [R, NQ*HD], h [R, F] scratch; kc/vc [L, TK, HD] caches (prefix rows filled; the
    suffix rows are written here); pos = positions of the suffix rows row_start..; w* = stacked skinny layouts;
    ws (>= workspace_numel()[0]) / aws (>= [1]) float32 scratch, cnt int32 counters (zero, >= 3072), bar int32
    (zero; >= nprog elements for the flag barrier) per launch."""
    R, D = xs.shape
    L, TK, HD = kc.shape
    assert D == plan.D and HD == plan.HD and TK == plan.TK and R <= plan.bm, (xs.shape, kc.shape)
    assert xs.is_contiguous() and xa.is_contiguous() and q.is_contiguous() and o.is_contiguous() and h.is_contiguous()
    assert kc.is_contiguous() and vc.is_contiguous() and ss.stride(1) == 1
    lo, hi = layers or (0, L)
    n_ws, n_aws = plan.workspace_numel()
    assert ws.numel() >= n_ws and aws.numel() >= n_aws and cnt.numel() >= CNT_DN + 1024
    assert bar.numel() >= (plan.nprog if plan.barrier == 1 else 1), "the flag barrier needs one int32 per program"
    aml = aws[plan.att_split * plan.NQ * plan.bm * HD:]
    kw = dict(D=D, F=plan.F, NQ=plan.NQ, HD=HD, NSS=ss.shape[0], BM=plan.bm, BH_QKV=plan.bh_qkv, BK_QKV=plan.bk_qkv,
              BH_GU=plan.bh_gu, BK_GU=plan.bk_gu, BH_RES=plan.bh_res, BK_O=plan.bk_o, SPLIT_O=plan.split_o,
              BK_DN=plan.bk_dn, SPLIT_DN=plan.split_dn, ATT_BM=plan.att_bm, ATT_BN=plan.att_bn,
              ATT_SPLIT=plan.att_split, ATT_STAGES=plan.att_stages, NPROG=plan.nprog, PREFETCH=plan.prefetch, WORK=plan.work, BARRIER=plan.barrier,
              AHEAD=plan.ahead, KV_LINES=plan.kv_lines, num_warps=plan.num_warps, num_stages=plan.stages)
    args = (xs, xa, ss, q, o, h, kc, vc, key_valid, pos, cos, sin, wqkv, wo, wgu, wdn, ws, cnt, aws, aml, bar,
            R, t_prefix, TK, row_start)
    tail = (ss.stride(0), TK * HD, plan.att_chunk, eps)
    if plan.grid_sync:  # one launch, barriers in the kernel
        _action_stack_kernel[(plan.nprog,)](*args, lo, hi, 0, NUM_PHASES, *tail, GRID_SYNC=True, PDL=plan.pdl, **kw,
                                            **pdl_kwargs(plan.pdl))
        return xs
    for layer in range(lo, hi):  # no co-residency (interpreter / CPU): one launch per phase, same code
        for ph in range(NUM_PHASES):
            _action_stack_kernel[(plan.nprog,)](*args, layer, layer + 1, ph, ph + 1, *tail, GRID_SYNC=False, PDL=False,
                                                **kw)
    return xs
