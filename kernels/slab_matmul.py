"""Skinny matmul whose weights are in shared memory before the previous kernel has finished (Gluon, Hopper only).

out[M, N] = a[M, K] @ W[K, N] for M <= 64 activation rows (the action expert), W stored transposed (`wt` [N, K]).

Why a second skinny kernel: the Triton one (skinny_matmul.py) can only start its weight stream after the PDL wait,
because Triton's loop pipeliner decides where loads go; every kernel of the action-expert chain then pays a DRAM
round trip plus a pipeline fill after its predecessor ends (benchmarks/NOTES.md, sessions 4-5). Here each program
asks the TMA engine for its whole weight slab (all of its K blocks, one mbarrier per block) the moment it is
resident, i.e. while the previous kernel still runs (PDL lets it be scheduled early and the slab is small enough
for two programs of different kernels to share an SM). Only the activations wait for `griddepcontrol.wait`;
they come from L2 (written by the previous kernel).

One program = BN output columns x one K range of NB blocks of BK (split-K over programs: grid (N / BN, SPLIT)).
The MMA is a Hopper warpgroup MMA with the activation rows as its M = 64 side (rows >= M are zero-filled by TMA)
and the weight columns as its N side. SPLIT > 1: fp32 partials in a workspace, the last program of a column tile
to arrive sums them in fixed order (deterministic), as in skinny_matmul.

Gluon cannot run under TRITON_INTERPRET; `slab_matmul_reference` is the plain PyTorch math it is tested against
on the GPU (tests/test_kernels.py, marked gpu).
"""

from __future__ import annotations

import torch

try:  # Gluon (Triton >= 3.5) with Hopper TMA / mbarrier / warpgroup MMA
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAS_GLUON = True
except Exception:  # pragma: no cover - older Triton
    HAS_GLUON = False


def slab_matmul_reference(a: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The math of `slab_matmul`: a @ wt.T in float32."""
    return a.float() @ wt.float().t()


if HAS_GLUON:

    @gluon.jit
    def _gdc_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _globaltimer():
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _slab_kernel(a_desc, w_desc, out_ptr, ws_ptr, cnt_ptr, ts_ptr, M, N, stride_out,
                     NB: gl.constexpr, NW: gl.constexpr, NA: gl.constexpr, SPLIT: gl.constexpr, PDL: gl.constexpr,
                     EARLY_TRIGGER: gl.constexpr, A_ONCE: gl.constexpr, TS: gl.constexpr, num_warps: gl.constexpr):
        """NB K blocks per program; NW weight buffers (NW == NB: the whole slab, all requested before the PDL wait;
        NW < NB: a ring whose first NW blocks are requested before the wait), NA activation buffers (a ring filled
        after the wait). A_ONCE (diagnostic, wrong result): only the first activation block is loaded and reused.
        TS: 5 %globaltimer stamps per program at ts_ptr (entry, wait returned, first A block ready, MMAs done, end)."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        n0 = pid_n * BN
        k0 = pid_k * (NB * BK)
        ts = ts_ptr + (pid_k * gl.num_programs(0) + pid_n) * 5
        if TS:
            gl.store(ts, _globaltimer())

        w_s = gl.allocate_shared_memory(w_desc.dtype, [NW, BN, BK], w_desc.layout)
        a_s = gl.allocate_shared_memory(a_desc.dtype, [NA, BM, BK], a_desc.layout)
        w_bar = gl.allocate_shared_memory(gl.int64, [NW, 1], mbarrier.MBarrierLayout())
        a_bar = gl.allocate_shared_memory(gl.int64, [NA, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NW):
            mbarrier.init(w_bar.index(i), count=1)
        for i in gl.static_range(NA):
            mbarrier.init(a_bar.index(i), count=1)
        fence_async_shared()
        # the weights do not depend on any earlier kernel: the first NW blocks are requested before the PDL wait
        for b in gl.static_range(NW):
            mbarrier.expect(w_bar.index(b), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [n0, k0 + b * BK], w_bar.index(b), w_s.index(b))
        if PDL:
            if EARLY_TRIGGER:
                _gdc_launch_dependents()
            _gdc_wait()  # the activations (written by the previous kernel) are visible from here on
            if not EARLY_TRIGGER:
                _gdc_launch_dependents()
        if TS:
            gl.store(ts + 1, _globaltimer())
        for b in gl.static_range(1 if A_ONCE else NA):
            mbarrier.expect(a_bar.index(b), a_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [0, k0 + b * BK], a_bar.index(b), a_s.index(b))

        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BN, 16])
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma_layout)
        for b in gl.static_range(NB):
            if A_ONCE:
                if b == 0:
                    mbarrier.wait(a_bar.index(0), 0)
            else:
                mbarrier.wait(a_bar.index(b % NA), (b // NA) % 2)
            if TS:
                if b == 0:
                    gl.store(ts + 2, _globaltimer())
            mbarrier.wait(w_bar.index(b % NW), (b // NW) % 2)
            acc = warpgroup_mma(a_s.index(0 if A_ONCE else b % NA), w_s.index(b % NW).permute((1, 0)), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            # block b-1's MMA is done: its buffers take the blocks NW / NA further on (rings)
            if b >= 1 and b - 1 + NW < NB:
                mbarrier.expect(w_bar.index((b - 1) % NW), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [n0, k0 + (b - 1 + NW) * BK], w_bar.index((b - 1) % NW),
                                                w_s.index((b - 1) % NW))
            if not A_ONCE:
                if b >= 1 and b - 1 + NA < NB:
                    mbarrier.expect(a_bar.index((b - 1) % NA), a_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(a_desc, [0, k0 + (b - 1 + NA) * BK], a_bar.index((b - 1) % NA),
                                                    a_s.index((b - 1) % NA))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if TS:
            gl.store(ts + 3, _globaltimer())
        for i in gl.static_range(NW):
            mbarrier.invalidate(w_bar.index(i))
        for i in gl.static_range(NA):
            mbarrier.invalidate(a_bar.index(i))

        offs_m = gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
        offs_n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
        m_ok = (offs_m < M)[:, None]
        if SPLIT > 1:
            part = ws_ptr + pid_k * BM * N + offs_m[:, None] * N + offs_n[None, :]
            gl.store(part, acc, mask=m_ok)
            gl.thread_barrier()  # every thread's partial is issued before the arrival
            old = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if old == SPLIT - 1:
                gl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")
                tot = gl.zeros((BM, BN), dtype=gl.float32, layout=mma_layout)
                for s in gl.static_range(SPLIT):
                    p = ws_ptr + s * BM * N + offs_m[:, None] * N + offs_n[None, :]
                    tot += gl.load(p, mask=m_ok, other=0.0, cache_modifier=".cg")
                gl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], tot.to(out_ptr.dtype.element_ty),
                         mask=m_ok)
        else:
            gl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=m_ok)
        if TS:
            gl.thread_barrier()
            gl.store(ts + 4, _globaltimer())

    @gluon.jit
    def _pdl_link_kernel(out_ptr, ts_ptr, TS: gl.constexpr):
        """The cheapest link of a PDL chain (timing floor): wait for the previous kernel, let the next one in, store
        one value. TS: stamps at entry and after the wait (5 slots per program, like _slab_kernel)."""
        pid = gl.program_id(0)
        if TS:
            gl.store(ts_ptr + pid * 5, _globaltimer())
        _gdc_wait()
        _gdc_launch_dependents()
        if TS:
            gl.store(ts_ptr + pid * 5 + 1, _globaltimer())
        gl.store(out_ptr + pid, pid)


class SlabPlan:
    """Launch plan of one weight matrix: its TMA descriptor and the shapes. Built once at load."""

    def __init__(self, wt: torch.Tensor, bn: int, split: int, nw: int = 0, na: int = 0, bk: int = 64, bm: int = 64):
        N, K = wt.shape
        assert N % bn == 0 and K % (split * bk) == 0, (N, K, bn, split, bk)
        self.N, self.K, self.bn, self.split, self.bk, self.bm = N, K, bn, split, bk, bm
        self.nb = K // (split * bk)
        self.nw = min(nw, self.nb) if nw else self.nb  # weight buffers; 0: the whole slab in shared memory
        self.na = min(na, self.nb) if na else self.nw  # activation buffers; 0: as many as weight buffers
        w_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
        self.a_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16)
        self.w_desc = TensorDescriptor.from_tensor(wt, [bn, bk], w_layout)
        self.wt = wt

    def a_desc(self, a: torch.Tensor):
        assert a.shape[1] == self.K and a.stride(1) == 1 and a.shape[0] <= self.bm, (a.shape, self.K)
        return TensorDescriptor.from_tensor(a, [self.bm, self.bk], self.a_layout)

    def smem_bytes(self) -> int:
        return (self.nw * self.bn + self.na * self.bm) * self.bk * 2


def slab_matmul(plan: SlabPlan, a_desc, M: int, out: torch.Tensor, workspace=None, counters=None, pdl=True,
                early_trigger=False, num_warps=4, a_once=False,
                timestamps=None):
    """out[:M] = a @ plan.wt.T (a given by its descriptor from plan.a_desc)."""
    if plan.split > 1:
        assert workspace is not None and workspace.numel() >= plan.split * plan.bm * plan.N
        assert counters is not None and counters.numel() >= plan.N // plan.bn
    else:
        workspace = counters = out
    grid = (plan.N // plan.bn, plan.split)
    ts = timestamps if timestamps is not None else counters
    _slab_kernel[grid](a_desc, plan.w_desc, out, workspace, counters, ts, M, plan.N, out.stride(0),
                       NB=plan.nb, NW=plan.nw, NA=plan.na, SPLIT=plan.split, TS=timestamps is not None, PDL=pdl, EARLY_TRIGGER=early_trigger, A_ONCE=a_once,
                       num_warps=num_warps,
                       **({"launch_pdl": True} if pdl else {}))
    return out


def pdl_link(out: torch.Tensor, programs: int, timestamps=None):
    """One empty link of a PDL chain (see _pdl_link_kernel): out[:programs] = program ids."""
    ts = timestamps if timestamps is not None else out
    _pdl_link_kernel[(programs,)](out, ts, TS=timestamps is not None, num_warps=4, launch_pdl=True)
