"""Small @triton.jit helpers shared by the fused ops (not ops themselves).

- `gelu_tanh`: tanh-approximate GELU written with exp, so it runs the same under TRITON_INTERPRET=1.
- `bulk_prefetch_rows`: thread 0 asks the copy engine to pull rows of a weight slab into L2 (Hopper), so a
  kernel launched early under PDL can have its weights on chip before the previous kernel ends.
- `online_softmax_step`: one key block of the flash attention kernels' online softmax (base 2).
- `arrive_last`: the "last program of a group reduces" pattern. Split-K matmuls and split-KV attention
  write fp32 partials to a workspace, then bump a per-tile counter; the program that arrives last sums
  the partials in a FIXED order (s = 0, 1, ...), so results are bitwise deterministic (unlike float
  atomics), and resets the counter to 0 so the next launch (or CUDA-graph replay) starts clean.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Programmatic dependent launch (Hopper): a kernel launched with launch_pdl=True may start while the previous
# kernel in the stream finishes; it must call gdc_wait() before reading anything that kernel wrote (and
# before writing anything at all). Used only where the Triton build has it and never under the interpreter.
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401

    HAS_PDL = not INTERPRET and os.environ.get("PI0_NO_PDL", "0") != "1"
except Exception:  # older Triton
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


def pdl_kwargs(pdl: bool) -> dict:
    """Launch keyword for a kernel that uses gdc_wait (empty when PDL is off: older Triton, interpreter)."""
    return {"launch_pdl": True} if pdl and HAS_PDL else {}


@triton.jit
def gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh(y) = 1 - 2 / (exp(2y) + 1), exp(2y) = exp2(2 log2(e) y):
    # a float32 tl.exp compiles to a multiply, a denormal guard and MUFU.EX2 (5 SASS instructions), tl.exp2 to the
    # MUFU.EX2 alone (flush-to-zero: nothing here is near 2^-126) (NOTES.md session 13)
    y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 1.0 - 2.0 / (tl.exp2(2.8853900817779268 * y) + 1.0)
    return 0.5 * x * (1.0 + t)


@triton.jit
def online_softmax_step(s, ok, m_i, l_i):
    """One key block of a flash (online) softmax, in base 2: s [rows, keys] the block's logits (softmax scale already
    applied), ok [keys] which keys count, m_i / l_i the rows' running max and sum (start: -1e30 / 0). Returns the
    block's probabilities p, the factor alpha that rescales what was accumulated before, and the new max and sum.
    Base 2 because tl.exp2 is one MUFU.EX2 and tl.exp five instructions (gelu_tanh's comment)."""
    s = tl.where(ok[None, :], s * 1.4426950408889634, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def arrive_last(counter_ptr, num: tl.constexpr):
    """True in exactly one of the `num` programs that call this on one counter: the last to arrive."""
    tl.debug_barrier()  # every thread of this program has issued its partial stores
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = old == num - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def bulk_prefetch_rows(ptr, stride_bytes, nbytes, nrows):
    """Thread 0 asks the copy engine to bring `nrows` rows of `nbytes` contiguous bytes (stride_bytes apart) into
    L2 (`cp.async.bulk.prefetch.L2`: one instruction per row, no registers or shared memory held)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred %p<2>;
        .reg .u32 %t;
        .reg .u32 %i;
        .reg .u64 %a;
        mov.u32 %t, %tid.x;
        setp.ne.u32 %p0, %t, 0;
        @%p0 bra PF_DONE_${:uid};
        mov.u64 %a, $1;
        mov.u32 %i, 0;
        PF_LOOP_${:uid}:
        cp.async.bulk.prefetch.L2.global [%a], $3;
        add.u64 %a, %a, $2;
        add.u32 %i, %i, 1;
        setp.lt.u32 %p1, %i, $4;
        @%p1 bra PF_LOOP_${:uid};
        PF_DONE_${:uid}:
        mov.u32 $0, 0;
        }""", "=r,l,l,r,r", [ptr, stride_bytes, nbytes, nrows], dtype=tl.int32, is_pure=False, pack=1)



@triton.jit
def globaltimer(dep):
    """%globaltimer (ns, comparable across SMs); `dep` orders the read after a value is ready. Profiling only."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False, pack=1)


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


class Workspace:
    """fp32 scratch for split-K / split-KV partials plus the int32 arrival counters (all zero at rest).

    One instance serves every launch of an engine: kernels run one after another on one stream, and
    each counter is back to 0 when its kernel ends.
    """

    def __init__(self, device, numel: int = 1 << 20, counters: int = 4096):
        self.device = torch.device(device)
        self.buf = torch.empty(numel, dtype=torch.float32, device=self.device)
        self.counters = torch.zeros(counters, dtype=torch.int32, device=self.device)

    def need(self, numel: int, counters: int):
        if numel > self.buf.numel():
            self.buf = torch.empty(numel, dtype=torch.float32, device=self.device)
        if counters > self.counters.numel():
            self.counters = torch.zeros(counters, dtype=torch.int32, device=self.device)
        return self.buf, self.counters


_DEFAULT_WS: dict = {}


def default_workspace(device) -> Workspace:
    key = str(torch.device(device))
    if key not in _DEFAULT_WS:
        _DEFAULT_WS[key] = Workspace(device)
    return _DEFAULT_WS[key]
