"""The action expert's four matmuls over all layers of a flow step in ONE persistent kernel (CUDA C++ via NVRTC,
Hopper; experimental).

Chain (the same one slab_probe/cluster_probe time kernel by kernel; plain bf16 outputs, no epilogues):
    q = x @ Wqkv^T (2560 cols) -> x2 = q[:, :2048] @ Wo^T -> h8 = x2 @ Wgu^T (8192) -> x = h8[:, :4096] @ Wd^T -> ...

Why: sessions 4-6 measured every dependent link of the kernel-per-op chain at ~5.5 us (wait + activations + MMA +
split-K tail), whatever generated the kernel, and the weight stream stops at every link. Here the weight stream never
stops: one resident program per SM, each with a producer warp that walks the program's whole schedule (every layer,
every op) and keeps a ring of shared-memory slots full with 1-D bulk copies (cp.async.bulk, completion on an
mbarrier), independent of the data dependencies. The consumer warpgroup of a program waits only for the activations
of its unit: a per-(layer, op, K range) arrival counter in global memory, so a split-K unit of o / down waits only for
the producing op's tiles of its own K range. It multiplies with wgmma (m64nNk16, bf16 -> fp32) straight from the
ring: weight chunks are [N][64] tiles in the 128-byte swizzle, and the activations live in global memory in the same
blocked, swizzled layout (`to_blocked`), so a unit's K range arrives by four bulk copies and the MMAs start on the
first. Split-K partials are reduced inside the cluster: the warp holding rows 16r.. sends them with st.async into rank
r's shared memory, whose mbarrier counts the bytes; the owner sums the 4 slots in fixed order (bitwise deterministic).

Work units: as many programs as clusters of 4 fit at once (30 on an H100 SXM: its GPCs hold 120 programs in
clusters of 4, not 132), rank = program % 4. Columns are dealt in groups of 8 as evenly as possible:
    qkv  N 2560 K 1024: every program its own 16-24 columns x full K
    o    N 1024 K 2048: every cluster its own 32-40 columns, its 4 ranks a K range of 512 each
    gu   N 8192 K 1024: every program its own 64-72 columns x full K
    down N 1024 K 4096: every cluster its own 32-40 columns, its 4 ranks a K range of 1024 each
A unit publishes on the counter of every quarter of the next op's K range its columns touch; the host counts how
many arrivals each quarter waits for, and a loader lane (sixth warp) waits on them and bulk-copies each quarter, so
the consumer warpgroup only waits on mbarriers. Weights are re-laid out once (`MegaPlan.prepare`) so every chunk a slot
receives is one contiguous block, already swizzled. All programs must be resident at once (they spin on each other):
the plan sizes itself with cuOccupancyMaxActiveClusters. Measured in benchmarks/NOTES.md (session 7).

LAYER mode (`MegaPlan(layer=True)`, `mega_chain(..., layer_state=...)`): the real layer's epilogues as the skinny path
computes them (kernels/skinny_matmul.py): qkv / gate|up columns dealt in pairs of 8-column groups (RoPE partners,
gate and up), the RMSNorm row scale from per-cluster sums of squares that the o / down owners write next to the fp32
residual (the loader copies them in), RoPE on q / k, h = gelu_tanh(g) * u, x += o / down in fp32. o reads the RoPE'd q
where the real layer has attention (`mega_layer_reference` is that math), or, with ATTN (layer_state with kc / vc / att /
key_valid / T), the attention link itself (`attention_unit`: correct, deterministic, still 2.8x slower than the engine's
Triton attention, benchmarks/NOTES.md session 7).

STATE (`mega_chain(..., layer_state={..., "state": True})`, the engine's flow step 0): 51 rows, the last one the state
token, whose key is written at T (the first suffix key, where the later steps' fixed keys expect it) and which attends
to the prefix and itself only; a separate compile (`#define R 51`), ATTN 2 then packs 26 tiles on 104 programs.

`mega_chain_reference` is the plain PyTorch math (bf16 rounding after every op, like the kernel's stores).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import triton
import triton.language as tl

from pi0_triton_policy.kernels._common import HAS_PDL, gdc_launch_dependents, gdc_wait, pdl_kwargs
from pi0_triton_policy.kernels.cluster_matmul import (_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, CUDA_HELPERS,
                                                      HOPPER_HELPERS, _LaunchAttr, _LaunchConfig, _libcuda, compile_cuda,
                                                      wgmma_n_source)

R = 50  # activation rows (the action tokens)
CLUSTER, THREADS = 4, 192  # 4 consumer warps + the weight producer warp + the activation loader warp
NS, SLOT = 8, 10240  # weight ring: slots x bytes (1024-aligned: wgmma's 128-byte swizzle atoms)
A_BLOCK = 56 * 128  # one 64-column block of the activations: 56 rows of 128 B (see consume)
A_BYTES = 16 * A_BLOCK  # KC <= 1024
BN_SPLIT_MAX = 40  # widest column tile of a split op (o, down)
RECV_BYTES = 2 * 4 * 16 * BN_SPLIT_MAX * 4  # [parity][source rank][16 owned rows][BN] fp32
ROWSQ_BYTES = 3 * 1024  # LAYER: an owner's new x^2 [16][40] fp32; 3 KB keeps the ring 1024-aligned
# LAYER: the clusters' sums of squares [<= 32][RS] fp32, copied in by the loader; RS (`ss_stride`) = the rows rounded
# up to even, so that a parity's block is a whole number of 16-byte units (a bulk copy's size and address)
SS_BYTES = 7 * 1024
def ss_stride(rows: int) -> int:
    """Floats per cluster in the sums-of-squares blocks (the kernel's RS): 50 -> 50, 51 (STATE) -> 52."""
    return rows + rows % 2


def smem_bytes(ns: int = NS) -> int:  # + ATTN 2's K / V ring mbarriers (6 slots), MCAST's
    return A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES + ns * SLOT + 8 * (2 * ns + 9 + 2 * 6 + 1)


SMEM = smem_bytes()
assert (A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) % 1024 == 0 and SLOT % 1024 == 0, "wgmma's swizzle atoms are 1024-aligned"
NAMES = ("qkv", "o", "gu", "down")
# op: (N, K, SPLIT, CK, NJMAX); CK = K columns per ring chunk (one 128-byte swizzle atom wide), NJMAX = most n8 column
# groups a program gets (with 120 programs); the widest chunk (LAYER gate|up: 80 x 64 bf16) fills a SLOT
OPS = dict(qkv=(2560, 1024, 1, 64, 3), o=(1024, 2048, 4, 64, 5), gu=(8192, 1024, 1, 64, 9), down=(1024, 4096, 4, 64, 5))
# LAYER (the real layer's epilogues): qkv and gate|up columns are dealt in units of 2 x PAIR columns (PAIR RoPE
# partners d.., d + 128.. of a head; gate and up of the same PAIR h columns), one program computes a unit whole.
# PAIR 8 (16-column units): 16 / 32 and 64 / 80 columns per program; PAIR 4 (8-column units, one exchange between
# lanes in the epilogue): 16 / 24 and 64 / 72, so the widest program streams 25% / 10% fewer weight bytes
PAIRED = {8: dict(qkv=(4, 2), gu=(10, 8)), 4: dict(qkv=(3, 2), gu=(9, 8))}  # PAIR -> n8 groups per program: the two widths
RANGE = dict(qkv=128, o=256, gu=256, down=256)  # columns per arrival counter of the op's output (a quarter of the next op's K range)

_SOURCE = r"""
#define R @ROWS@                        /* activation rows: the 50 actions (+ STATE: the state token last) */
#define STATE @STATE@                    /* 1: flow step 0, whose last row is the state token: its key is the first
                                            suffix key (T), the actions' keys follow (T + 1 + r), and it sees only the
                                            prefix and itself; steps 1.. then find it among their fixed keys */
#define RS @RS@                          /* floats per cluster in the sums of squares (ss_stride) */
#define ATILES ((8 * R + 15) / 16)       /* ATTN 2: tiles of 16 packed (head, row) query rows, one cluster each */
#define NS @NS@
#define SLOT @SLOT@
#define A_BYTES @A_BYTES@
#define A_BLOCK @A_BLOCK@
#define RECV_BYTES @RECV_BYTES@
#define BNS @BN_SPLIT_MAX@
#define NC 128                       /* consumer threads */
#define LAYER @LAYER@                  /* 1: the real layer's epilogues (RMSNorm row scale, RoPE, GeGLU, fp32 residual) */
#define ROWSQ_BYTES @ROWSQ_BYTES@
#define SS_BYTES @SS_BYTES@
#define A_PIPE @A_PIPE@                /* 1: activations in four bulk copies (one mbarrier each), MMAs start on the first */
#define PUB @PUB@                     /* publish variant (unit_body) */
#define WGD @WGD@                     /* wgmma groups in flight before a ring slot is released */
#define WGD_S "@WGD@"
#define ATTN @ATTN@                    /* LAYER probe: the attention link too (1: attention_unit, 2: attention_unit2) */
#define LOADER @LOADER@                /* 1: a loader lane waits for the activations' counters and copies them */
#define AHEAD @AHEAD@                  /* ops of L2 prefetch ahead of the ring (0: none) */
#define MCAST @MCAST@                  /* 1: qkv / gate|up activations multicast to the cluster (load_activations) */
#define GELU @GELU@                    /* gate|up's GELU: 0 IEEE division, 1 fast division, 2 tanh.approx (gelu_tanh_f) */
#define PF @PF@                        /* lazy L2 prefetch: chunks of the schedule past the ring, asked for while the
                                          producer waits for a free slot (0: off; produce) */
#define TAIL @TAIL@                    /* L2 prefetch of an op's chunks past the ring once its first slot is won (produce):
                                          0 off, 1 gate|up only, 2 every op */
#define SPACK @SPACK@                  /* 1: consecutive chunks of an op share a ring slot while they fit (produce) */
#define PAIR @PAIR@                    /* LAYER: columns per half of a qkv / gate|up unit (8: 16-column units, 4: 8) */
#define TS @TS@                        /* 0: the %globaltimer stamps compiled out (the engine's kernels: less code to
                                          fetch every layer, NOTES.md session 12); 1: stamped when Args.use_ts */
#define STAMPS (TS && g.use_ts)
#define ROLL @ROLL@                    /* 1: qkv's and gate|up's epilogues (PAIR 8) as rolled loops over the accumulators
                                          staged in the activation region (less code fetched every layer) */
#define RCP @RCP@                      /* ATTN 2's softmax normalisers: 0 IEEE reciprocal (a slow-path CALL), 1 fast */
#define EXP @EXP@                      /* exponentials (fexp): 0 __expf (no -ftz: FMUL + a denormal guard + MUFU.EX2, 5
                                          instructions), 1 ex2.approx.ftz of x log2(e) (FMUL + MUFU.EX2) */
#define A_FREE (2 * NS + 9 + 2 * 6)    /* MCAST's mbarrier, after ATTN 2's K / V ring's */
@HELPERS@
@HOPPER@
typedef unsigned short bf16;

/* per op: columns, K, K split (1, or the cluster's 4 ranks), K columns per ring chunk, most n8 column groups per
   program, and the column width of one arrival counter of its output (a quarter of the next op's K range: the
   activations of a unit arrive in four parts, each behind its own counter) */
template <int P> struct Op;
template <> struct Op<0> { enum { N = 2560, K = 1024, SPLIT = 1, CK = 64, NJMAX = LAYER && PAIR == 8 ? 4 : 3, NJALT = 2, RANGE = 128 }; };
template <> struct Op<1> { enum { N = 1024, K = 2048, SPLIT = 4, CK = 64, NJMAX = 5, NJALT = 4, RANGE = 256 }; };
template <> struct Op<2> { enum { N = 8192, K = 1024, SPLIT = 1, CK = 64, NJMAX = LAYER && PAIR == 8 ? 10 : 9, NJALT = 8, RANGE = 256 }; };
template <> struct Op<3> { enum { N = 1024, K = 4096, SPLIT = 4, CK = 64, NJMAX = 5, NJALT = 4, RANGE = 256 }; };
/* SPACK: chunks per ring slot. A slot holds one chunk of any width (SLOT = the widest, gate|up's 80 x 64), so with one
   per slot the ring holds 16-40 KB of qkv / o / down weights instead of 80 KB, and their units stream the rest from
   DRAM while their MMAs wait: two of their chunks (<= 5 KB each) share a slot */
template <int P> struct Pack { enum { CPS = SPACK && 2 * Op<P>::NJMAX * 8 * Op<P>::CK * 2 <= SLOT
                                              && (Op<P>::K / Op<P>::SPLIT / Op<P>::CK) % 2 == 0 ? 2 : 1 }; };

struct Args {
    const bf16* w[4];      /* prepared weights per op: [L][N * K], program p's block at meta.z: [KC / CK][bn][CK] */
    bf16* act[4];          /* x, q, x2, h8: op P reads act[P] and writes act[(P + 1) % 4] */
    const int4* meta;      /* [4 ops][programs]: first column, columns, weight block offset (elements), - */
    unsigned* ctr;         /* [L][4 ops][32 ranges] arrival counters, zero before the launch */
    unsigned long long* ts;/* [programs][L][4][8] stamps (use_ts) */
    int L, use_ts, programs, pad;
    float* xs;             /* LAYER: the fp32 residual stream [50][1024] (row-major) */
    float* ss;             /* LAYER: [2 parities][clusters][50] sums of squares of x over each cluster's columns
                              (parity 0: written by down, read by qkv; 1: by o, read by gate|up) */
    const int* pos;        /* LAYER: RoPE position of each row */
    const float* cos_t;    /* LAYER: [positions][128] */
    const float* sin_t;
    float eps;
    int pad2;
    bf16* att;             /* ATTN: attention output [50][2048], blocked (o's activations) */
    bf16* kc;              /* ATTN: K / V [TK][256] row-major: rows < T fixed (the prefix), T.. written by qkv */
    bf16* vc;
    const int* key_valid;  /* ATTN: [TK + 16]: prefix keys (prompt padding = 0), 1 for the suffix, 0 past TK */
    int T, TK;
    long long kv_layer;    /* ATTN 2: elements between layers' K / V caches (0: one cache for every layer) */
    unsigned wait[4][32];  /* op P's activations of range r are complete when the producing op's counter r reaches wait[P][r] */
};

__device__ __forceinline__ void bar_consumers() { asm volatile("bar.sync 1, 128;" ::: "memory"); }
__device__ __forceinline__ bool mbar_try_cluster(unsigned bar, unsigned parity) {
    unsigned ok;
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    return ok;
}
__device__ __forceinline__ unsigned mapa(unsigned addr, unsigned rank) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
/* GELU, tanh form: 0.5 x (1 + tanh(y)) = x / (1 + exp(-2y)). GELU 0: 1 - 2 / (exp(2y) + 1) with an IEEE division
   (NVRTC has no fast math: a slow-path subroutine per call, 38 in the code); 1: the sigmoid form with a fast division
   (2 ulp, far below the bf16 rounding that follows; no cancellation in 1 + t for negative x); 2: the hardware
   tanh.approx.f32 (2^-11 relative in t, which 1 + t turns into several % for x < -2) */
__device__ __forceinline__ float fexp(float x) {
#if EXP
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
#else
    return __expf(x);
#endif
}
/* the RMSNorm row scales: EXP 2 also takes rsqrt as the one MUFU instruction (rsqrtf without -ftz adds a denormal
   guard around it; the argument is >= eps, never denormal) */
__device__ __forceinline__ float frsqrt(float x) {
#if EXP >= 2
    float y;
    asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return rsqrtf(x);
#endif
}
__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    if (GELU == 1) return __fdividef(x, 1.f + fexp(-2.f * y));
    float t;
    if (GELU == 2) asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(y));
    else t = 1.f - 2.f / (fexp(2.f * y) + 1.f);
    return 0.5f * x * (1.f + t);
}
/* a publish: one fence after the unit's barrier (PUB 4: release only, no L1 invalidate; needs PTX ISA 8.6), then
   the counter adds, relaxed for PUB >= 3: a release add lowers to one more MEMBAR.GPU per counter (up to 5 for a
   qkv unit), 35.1 -> 31.8 us per layer (NOTES.md session 10) */
__device__ __forceinline__ void pub_fence() {
    if (PUB == 4) asm volatile("fence.release.gpu;" ::: "memory");
    else asm volatile("fence.acq_rel.gpu;" ::: "memory");
}
__device__ __forceinline__ void pub_add(const unsigned* p) {
    if (PUB >= 3) asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" :: "l"(p) : "memory");
    else asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(p) : "memory");
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* the ring chunks of one layer, per op: qkv 16, o 8, gate|up 16, down 16 (K / SPLIT / CK) */
#define CH0 (Op<0>::K / Op<0>::SPLIT / Op<0>::CK)
#define CH1 (Op<1>::K / Op<1>::SPLIT / Op<1>::CK)
#define CH2 (Op<2>::K / Op<2>::SPLIT / Op<2>::CK)
#define CH3 (Op<3>::K / Op<3>::SPLIT / Op<3>::CK)
/* PF: chunk c of this program's schedule (the producer's running count) asked into L2. The ring (80 KB) holds o's
   and the head of gate|up's weights while attention runs (~7 us); without this, gate|up's remaining 50-80 KB per SM
   then stream from DRAM at ~25 GB/s per SM after its activations are in. Issued only while the producer would spin
   anyway, so no ring copy queues behind a prefetch (AHEAD's problem) */
__device__ __forceinline__ void prefetch_chunk(const Args& g, int c, int prog) {
    const int l = c / (CH0 + CH1 + CH2 + CH3), r = c - l * (CH0 + CH1 + CH2 + CH3);
    if (l >= g.L) return;
    const int P = r < CH0 ? 0 : r < CH0 + CH1 ? 1 : r < CH0 + CH1 + CH2 ? 2 : 3;
    const int j = r - (P == 0 ? 0 : P == 1 ? CH0 : P == 2 ? CH0 + CH1 : CH0 + CH1 + CH2);
    const size_t nk = P == 0 ? (size_t)Op<0>::N * Op<0>::K : P == 1 ? (size_t)Op<1>::N * Op<1>::K
                    : P == 2 ? (size_t)Op<2>::N * Op<2>::K : (size_t)Op<3>::N * Op<3>::K;
    const int4 m = g.meta[P * g.programs + prog];
    const bf16* p = g.w[P] + (size_t)l * nk + m.z + (size_t)j * m.y * 64;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"((unsigned)(m.y * 128)) : "memory");
}

/* producer: one lane walks the program's whole schedule and keeps the ring full */
template <int P> __device__ __forceinline__ void produce(const Args& g, int l, int prog, unsigned ring, unsigned bars, int& ci,
                                                         int& pf) {
    typedef Op<P> O;
    static_assert(O::CK == 64, "prefetch_chunk: 64 K columns per chunk");
    const int4 m = g.meta[P * g.programs + prog];
    constexpr int NCH = O::K / O::SPLIT / O::CK;
    const unsigned bytes = m.y * O::CK * 2;
    const bf16* blk = g.w[P] + (size_t)l * O::N * O::K + m.z;
    constexpr int CPS = Pack<P>::CPS;  /* a slot's chunks are consecutive in the prepared layout: one copy */
    for (int j = 0; j < NCH; j += CPS, ++ci) {
        const int slot = ci % NS, use = ci / NS;
        const unsigned full = bars + 8 * slot, empty = bars + 8 * (NS + slot);
        if (use > 0) while (!mbar_try(empty, (use - 1) & 1)) {
            if (PF) {  /* the ring is full: the chunks from this one on, PF of them, into L2 */
                if (pf < ci) pf = ci;
                if (pf < ci + PF) prefetch_chunk(g, pf++, prog);
            }
        }
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(full), "r"(CPS * bytes) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(ring + slot * SLOT), "l"(blk + (size_t)j * m.y * O::CK), "r"(CPS * bytes), "r"(full) : "memory");
        /* TAIL: the op's first slot is won once the op before it consumes (for gate|up: after attention, whose loads
           PF's earlier prefetches slowed); the chunks that will not fit in the ring before this op's MMAs free it
           are asked into L2 now, so they come from L2 rather than DRAM when the ring takes them */
        if ((TAIL == 2 || (TAIL == 1 && P == 2)) && j == 0)
            for (int t = NS * CPS; t < NCH; ++t)
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(blk + (size_t)t * m.y * O::CK), "r"(bytes) : "memory");
    }
}

/* the whole weight block of (layer l, op P) of this program, asked into L2 (no shared memory): DRAM keeps streaming
   while the consumers are busy with dependencies and the ring is full */
template <int P> __device__ __forceinline__ void prefetch_l2(const Args& g, int l, int prog) {
    typedef Op<P> O;
    const int4 m = g.meta[P * g.programs + prog];
    const unsigned bytes = m.y * (O::K / O::SPLIT) * 2;
    const char* blk = (const char*)(g.w[P] + (size_t)l * O::N * O::K + m.z);
    for (unsigned off = 0; off < bytes; off += 16384)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(blk + off), "r"(bytes - off < 16384 ? bytes - off : 16384) : "memory");
}
__device__ __forceinline__ void prefetch_op(const Args& g, int t, int prog) {  /* t = layer * 4 + op */
    if (t >= g.L * 4) return;
    switch (t & 3) {
        case 0: prefetch_l2<0>(g, t >> 2, prog); break;
        case 1: prefetch_l2<1>(g, t >> 2, prog); break;
        case 2: prefetch_l2<2>(g, t >> 2, prog); break;
        default: prefetch_l2<3>(g, t >> 2, prog); break;
    }
}

@WGMMA@
/* the key / value cache row of activation row `row` (see STATE) */
__device__ __forceinline__ int suffix_key(const Args& g, int row) {
    return STATE ? (row == R - 1 ? g.T : g.T + 1 + row) : g.T + row;
}

/* element offset of (row, col) in the activations' global layout: blocks of 64 columns x 56 rows of 128 B, the
   16-byte groups of a row XOR-swizzled by row (the shared-memory layout wgmma reads, so a K range is one bulk copy) */
/* element offset of (key, dim d) in a layer's K / V cache: ATTN 1 row-major; ATTN 2 rows of 256 with the 16-byte groups
   XOR-swizzled by key % 8 (kv_swizzle); ATTN 3 [key / 16][d / 64][key % 16][64] with the same swizzle inside each
   128-byte row (kv_blocked: a sub-block of 16 keys is 8 KB, each 64-dim block of it a wgmma operand) */
__device__ __forceinline__ size_t kv_index(int key, int d) {
    if (ATTN == 3)
        return (size_t)(key >> 4) * 4096 + (d >> 6) * 1024 + (key & 15) * 64 + ((((d & 63) >> 3) ^ (key & 7)) << 3) + (d & 7);
    return (size_t)key * 256 + (ATTN == 2 ? d ^ ((key & 7) << 3) : d);
}

__device__ __forceinline__ size_t blocked(int row, int col) {
    return (size_t)(col >> 6) * (A_BLOCK / 2) + row * 64 + ((((col & 63) >> 3) ^ (row & 7)) << 3) + (col & 7);
}


/* the MMA and epilogue of one unit whose tile is NJ x 8 columns wide (one warpgroup: 64 rows x NJ*8, K = KC) */
template <int P, int NJ> __device__ __forceinline__ void unit_body(const Args& g, int l, int prog, unsigned char* smem,
                                                                  int& ci, int& su, int n0, int rank, unsigned aparity,
                                                                  unsigned long long* ts) {
    typedef Op<P> O;
    constexpr int KC = O::K / O::SPLIT, NCH = KC / 64, CPS = Pack<P>::CPS;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const unsigned a_u32 = smem_u32(smem), recv_u32 = smem_u32(smem + A_BYTES);
    const unsigned ring = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES), bars = ring + NS * SLOT;
    float* recv = (float*)(smem + A_BYTES);
    float* rowsq = (float*)(smem + A_BYTES + RECV_BYTES);
    const bool stamp = STAMPS && tid == 0;
    const int r0 = 16 * warp + (lane >> 2), c0 = 2 * (lane & 3);
    /* LAYER qkv: the RoPE factors of this thread's rows and columns do not depend on anything: loaded before the MMAs */
    float2 rc[NJ / 2 > 0 ? NJ / 2 : 1][2], rsn[NJ / 2 > 0 ? NJ / 2 : 1][2];
    /* PAIR 4: a unit is one n8 group (dims 4u.. of the first half in columns 0-3, their partners in 4-7): lane c holds
       columns 2c, 2c + 1, its partner is lane c ^ 2; after one exchange lanes c < 2 finish row r0, lanes c >= 2 row
       r0 + 8 (`second`), so each thread needs the factors of one row */
    const bool second = (lane >> 1) & 1;
    float2 rc4[PAIR == 4 ? NJ : 1], rs4[PAIR == 4 ? NJ : 1];
    if (LAYER && P == 0 && PAIR == 4) {
        const int row = r0 + 8 * second < R ? r0 + 8 * second : R - 1;
        #pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int dim = 4 * (((n0 >> 3) + j) & 31) + 2 * (lane & 1);
            rc4[j] = *(const float2*)(g.cos_t + (size_t)g.pos[row] * 128 + dim);
            rs4[j] = *(const float2*)(g.sin_t + (size_t)g.pos[row] * 128 + dim);
        }
    } else if (LAYER && P == 0) {
        #pragma unroll
        for (int j = 0; j < NJ; j += 2)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h < R ? r0 + 8 * h : R - 1;
                const int pr = (n0 + 8 * j) / 16, dim = 8 * (pr % 16) + c0;
                rc[j / 2][h] = *(const float2*)(g.cos_t + (size_t)g.pos[row] * 128 + dim);
                rsn[j / 2][h] = *(const float2*)(g.sin_t + (size_t)g.pos[row] * 128 + dim);
            }
    }
    /* LAYER o / down: the residual this thread will add to (its owner rows, written by this program's previous
       residual op) is read before the MMAs, off the critical path */
    float4 x_old[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
    if (LAYER && O::SPLIT > 1)
        #pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int i = tid * 4 + k * NC * 4, rr = i / BNS, col = i % BNS, row = rank * 16 + rr;
            if (i < 16 * BNS && row < R && col < NJ * 8) x_old[k] = *(const float4*)(g.xs + (size_t)row * 1024 + n0 + col);
        }
    float d[NJ * 4];
    #pragma unroll
    for (int i = 0; i < NJ * 4; ++i) d[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    for (int ch = 0; ch < NCH; ++ch) {
        if (A_PIPE && ch % (NCH / 4) == 0)  /* the next quarter of the activations has landed */
            while (!mbar_try(bars + 8 * (2 * NS + 2 + ch / (NCH / 4)), aparity)) {}
        const int slot = (ci + ch / CPS) % NS, use = (ci + ch / CPS) / NS;
        if (ch % CPS == 0) while (!mbar_try(bars + 8 * slot, use & 1)) {}
        const unsigned long long da = sw128_desc(a_u32 + ch * A_BLOCK);
        const unsigned long long db = sw128_desc(ring + slot * SLOT + (ch % CPS) * (NJ * 8 * O::CK * 2));
        #pragma unroll
        for (int s = 0; s < 4; ++s) wgmma_n<NJ * 8>(d, da + 2 * s, db + 2 * s, 1);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        if (ch >= WGD) {  /* the MMAs of chunk ch - WGD are done: its slot may be refilled once all its chunks are */
            asm volatile("wgmma.wait_group.sync.aligned " WGD_S ";" ::: "memory");
            if ((ch - WGD) % CPS == CPS - 1)  /* all 128 threads: no divergent path near wgmma */
                mbar_arrive(bars + 8 * (NS + (ci + (ch - WGD) / CPS) % NS));
        }
    }
    /* LAYER: the row scale rsqrt(mean(x^2) + eps) of rows r0, r0 + 8 from the clusters' sums of squares (fixed
       order), read while the last MMAs run; the activations' last quarter has landed, so they are published */
    float rs[2] = {1.f, 1.f};
    if (LAYER && O::SPLIT == 1) {  /* the 4 lanes of a quad share rows: each sums every 4th cluster, then a fixed
                                      shuffle tree (deterministic) */
        const float* ssp = (const float*)(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES);
        while (!mbar_try(bars + 8 * (2 * NS + 7), P == 0 ? 0 : 1)) {}  /* two such units per layer: qkv even, gu odd */
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = r0 + 8 * h < R ? r0 + 8 * h : R - 1;
            float t = 0.f;
            #pragma unroll
            for (int c = lane & 3; c < 32; c += 4)
                if (c < g.programs / 4) t += ssp[c * RS + row];
            t += __shfl_xor_sync(0xffffffff, t, 1);
            t += __shfl_xor_sync(0xffffffff, t, 2);
            rs[h] = frsqrt(t / 1024.f + g.eps);
        }
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    /* ROLL: the epilogue stages the accumulators in the activation region, which the loader may refill after it */
    constexpr bool STAGED = ROLL && LAYER && PAIR == 8 && (P == 0 || P == 2);
    if (LOADER && !STAGED) mbar_arrive(bars + 8 * (2 * NS + 6));  /* the loader may overwrite the activations */
    #pragma unroll
    for (int back = WGD; back >= 1; --back)
        if ((NCH - back) % CPS == CPS - 1) mbar_arrive(bars + 8 * (NS + (ci + (NCH - back) / CPS) % NS));
    ci += NCH / CPS;

    /* accumulator fragment: warp w holds rows 16w + lane/4 (+8), columns 8j + 2 (lane % 4) (+1) */
    bf16* out = g.act[(P + 1) % 4];
    if (stamp) ts[2] = globaltimer();
    if (LAYER && (P == 0 || P == 2) && PAIR == 4) {
        /* one exchange per group: a thread of the first half (c < 2) sends its row r0 + 8 and gets its partner's row
           r0, one of the second half the other way round; then qkv: RoPE (q, k) of that row, gate|up: gelu(g) u */
        #pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int u = (n0 >> 3) + j;
            const float2 v0 = make_float2(d[4 * j] * rs[0], d[4 * j + 1] * rs[0]);
            const float2 v1 = make_float2(d[4 * j + 2] * rs[1], d[4 * j + 3] * rs[1]);
            const float2 send = second ? v0 : v1;
            const float2 recv = make_float2(__shfl_xor_sync(0xffffffff, send.x, 2), __shfl_xor_sync(0xffffffff, send.y, 2));
            const float2 a = second ? recv : v0, b = second ? v1 : recv;  /* first half / second half of the row */
            const int row = r0 + 8 * second;
            if (P == 2) {
                const float h0 = gelu_tanh_f(a.x) * b.x, h1 = gelu_tanh_f(a.y) * b.y;
                if (row < R) *(unsigned*)(out + blocked(row, 4 * u + 2 * (lane & 1))) = to_bf16(h0) | ((unsigned)to_bf16(h1) << 16);
                continue;
            }
            const int head = u >> 5, dim = 4 * (u & 31) + 2 * (lane & 1);
            float a0 = a.x, a1 = a.y, b0 = b.x, b1 = b.y;
            if (head < 9) {
                const float2 cs = rc4[j], sn = rs4[j];
                const float x0 = a0 * cs.x - b0 * sn.x, y0 = b0 * cs.x + a0 * sn.x;
                const float x1 = a1 * cs.y - b1 * sn.y, y1 = b1 * cs.y + a1 * sn.y;
                a0 = x0; b0 = y0; a1 = x1; b1 = y1;
            }
            if (row >= R) continue;
            *(unsigned*)(out + blocked(row, head * 256 + dim)) = to_bf16(a0) | ((unsigned)to_bf16(a1) << 16);
            *(unsigned*)(out + blocked(row, head * 256 + 128 + dim)) = to_bf16(b0) | ((unsigned)to_bf16(b1) << 16);
            if (ATTN && head >= 8) {  /* k / v of the suffix rows -> the key / value cache (as below) */
                const int key = suffix_key(g, row);
                bf16* kv = (head == 8 ? g.kc : g.vc) + (size_t)l * g.kv_layer;
                *(unsigned*)(kv + kv_index(key, dim)) = to_bf16(a0) | ((unsigned)to_bf16(a1) << 16);
                *(unsigned*)(kv + kv_index(key, 128 + dim)) = to_bf16(b0) | ((unsigned)to_bf16(b1) << 16);
            }
        }
    } else if (STAGED) {
        /* the same math as the unrolled branches below, one loop iteration per (group pair, row half): the thread's
           accumulators (and qkv's RoPE factors) through shared memory, so the body is compiled once */
        float* scr = (float*)smem + tid * (NJ * 4 + 1);
        float* scc = (float*)smem + NC * (NJ * 4 + 1) + tid * (NJ * 4 + 1);  /* qkv: [iteration][cos x2, sin x2] */
        #pragma unroll
        for (int i = 0; i < NJ * 4; ++i) scr[i] = d[i];
        if (P == 0)
            #pragma unroll
            for (int j = 0; j < NJ; j += 2)
                #pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float* f = scc + (j + h) * 4;  /* iteration j + h of the loop below */
                    f[0] = rc[j / 2][h].x; f[1] = rc[j / 2][h].y; f[2] = rsn[j / 2][h].x; f[3] = rsn[j / 2][h].y;
                }
        #pragma unroll 1
        for (int it = 0; it < NJ; ++it) {
            const int j = 2 * (it >> 1), h = it & 1, row = r0 + 8 * h;
            if (row >= R) continue;
            const float sc = h ? rs[1] : rs[0];
            float a0 = scr[4 * j + 2 * h] * sc, a1 = scr[4 * j + 2 * h + 1] * sc;
            float b0 = scr[4 * (j + 1) + 2 * h] * sc, b1 = scr[4 * (j + 1) + 2 * h + 1] * sc;
            if (P == 2) {
                const int col = 8 * ((n0 + 8 * j) / 16) + c0;
                *(unsigned*)(out + blocked(row, col)) = to_bf16(gelu_tanh_f(a0) * b0) | ((unsigned)to_bf16(gelu_tanh_f(a1) * b1) << 16);
            } else {
                const int pr = (n0 + 8 * j) / 16, head = pr / 16, dim = 8 * (pr % 16) + c0;
                if (head < 9) {
                    const float* f = scc + it * 4;
                    const float x0 = a0 * f[0] - b0 * f[2], y0 = b0 * f[0] + a0 * f[2];
                    const float x1 = a1 * f[1] - b1 * f[3], y1 = b1 * f[1] + a1 * f[3];
                    a0 = x0; b0 = y0; a1 = x1; b1 = y1;
                }
                *(unsigned*)(out + blocked(row, head * 256 + dim)) = to_bf16(a0) | ((unsigned)to_bf16(a1) << 16);
                *(unsigned*)(out + blocked(row, head * 256 + 128 + dim)) = to_bf16(b0) | ((unsigned)to_bf16(b1) << 16);
                if (ATTN && head >= 8) {
                    const int key = suffix_key(g, row);
                    bf16* kv = (head == 8 ? g.kc : g.vc) + (size_t)l * g.kv_layer;
                    *(unsigned*)(kv + kv_index(key, dim)) = to_bf16(a0) | ((unsigned)to_bf16(a1) << 16);
                    *(unsigned*)(kv + kv_index(key, 128 + dim)) = to_bf16(b0) | ((unsigned)to_bf16(b1) << 16);
                }
            }
        }
        if (LOADER) mbar_arrive(bars + 8 * (2 * NS + 6));  /* this thread's staged values are read */
    } else if (LAYER && P == 0) {
        /* pairs of groups (j, j + 1) = head columns 8g.. and 128 + 8g..: scaled, RoPE'd (q, k), stored in place */
        #pragma unroll
        for (int j = 0; j < NJ; j += 2)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h;
                if (row >= R) continue;
                const int pr = (n0 + 8 * j) / 16, head = pr / 16, dim = 8 * (pr % 16) + c0;
                float a0 = d[4 * j + 2 * h] * rs[h], a1 = d[4 * j + 2 * h + 1] * rs[h];
                float b0 = d[4 * (j + 1) + 2 * h] * rs[h], b1 = d[4 * (j + 1) + 2 * h + 1] * rs[h];
                if (head < 9) {
                    const float2 cs = rc[j / 2][h], sn = rsn[j / 2][h];
                    const float x0 = a0 * cs.x - b0 * sn.x, y0 = b0 * cs.x + a0 * sn.x;
                    const float x1 = a1 * cs.y - b1 * sn.y, y1 = b1 * cs.y + a1 * sn.y;
                    a0 = x0; b0 = y0; a1 = x1; b1 = y1;
                }
                *(unsigned*)(out + blocked(row, head * 256 + dim)) = to_bf16(a0) | ((unsigned)to_bf16(a1) << 16);
                *(unsigned*)(out + blocked(row, head * 256 + 128 + dim)) = to_bf16(b0) | ((unsigned)to_bf16(b1) << 16);
                if (ATTN && head >= 8) {  /* k / v of the suffix rows -> the key / value cache (ATTN 2 / 3: kv_index) */
                    const int key = suffix_key(g, row);
                    bf16* kv = (head == 8 ? g.kc : g.vc) + (size_t)l * g.kv_layer;
                    *(unsigned*)(kv + kv_index(key, dim)) = to_bf16(a0) | ((unsigned)to_bf16(a1) << 16);
                    *(unsigned*)(kv + kv_index(key, 128 + dim)) = to_bf16(b0) | ((unsigned)to_bf16(b1) << 16);
                }
            }
    } else if (LAYER && P == 2) {
        /* pairs of groups (j, j + 1) = gate and up of h columns 8 pr..: h = gelu_tanh(g s) (u s) */
        #pragma unroll
        for (int j = 0; j < NJ; j += 2)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h;
                if (row >= R) continue;
                const int col = 8 * ((n0 + 8 * j) / 16) + c0;
                const float h0 = gelu_tanh_f(d[4 * j + 2 * h] * rs[h]) * (d[4 * (j + 1) + 2 * h] * rs[h]);
                const float h1 = gelu_tanh_f(d[4 * j + 2 * h + 1] * rs[h]) * (d[4 * (j + 1) + 2 * h + 1] * rs[h]);
                *(unsigned*)(out + blocked(row, col)) = to_bf16(h0) | ((unsigned)to_bf16(h1) << 16);
            }
    } else if (O::SPLIT == 1) {
        #pragma unroll
        for (int j = 0; j < NJ; ++j)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h;
                if (row < R)
                    *(unsigned*)(out + blocked(row, n0 + 8 * j + c0)) =
                        to_bf16(d[4 * j + 2 * h]) | ((unsigned)to_bf16(d[4 * j + 2 * h + 1]) << 16);
            }
    } else {
        /* the rows of warp w belong to rank w: pushed there (st.async: the bytes complete that rank's mbarrier;
           two parities: a rank can be one unit ahead of the owner, never two, because every unit needs every push) */
        const int buf = su & 1;
        const unsigned parity = (su >> 1) & 1;
        ++su;
        const unsigned rbar = bars + 8 * (2 * NS + buf);
        if (tid == 0) {
            const int mine = (R - rank * 16) < 16 ? (R - rank * 16) : 16;
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(rbar), "r"(3 * mine * NJ * 8 * 4) : "memory");
        }
        #pragma unroll
        for (int j = 0; j < NJ; ++j)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h;
                if (row >= R) continue;
                const int slot_off = ((buf * 4 + rank) * 16 + (row & 15)) * BNS + 8 * j + c0;
                if (warp == rank) *(float2*)(recv + slot_off) = make_float2(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
                else asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1,%2}, [%3];"
                                  :: "r"(mapa(recv_u32 + 4 * slot_off, warp)), "f"(d[4 * j + 2 * h]), "f"(d[4 * j + 2 * h + 1]),
                                     "r"(mapa(rbar, warp)) : "memory");
            }
        bar_consumers();  /* this rank's own partial is in shared memory */
        while (!mbar_try_cluster(rbar, parity)) {}
        #pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int i = tid * 4 + k * NC * 4;
            if (i >= 16 * BNS) break;
            const int rr = i / BNS, col = i % BNS, row = rank * 16 + rr;
            if (row >= R || col >= NJ * 8) continue;
            float4 s = *(float4*)(recv + (buf * 4 * 16) * BNS + i);
            #pragma unroll
            for (int src = 1; src < 4; ++src) {  /* fixed order: deterministic */
                const float4 v = *(float4*)(recv + ((buf * 4 + src) * 16) * BNS + i);
                s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
            }
            if (LAYER) {  /* x += the sum (fp32); x^2 kept for the row sums below */
                const float4 xo = x_old[k];
                s.x += xo.x; s.y += xo.y; s.z += xo.z; s.w += xo.w;
                *(float4*)(g.xs + (size_t)row * 1024 + n0 + col) = s;
                *(float4*)(rowsq + rr * BNS + col) = make_float4(s.x * s.x, s.y * s.y, s.z * s.z, s.w * s.w);
            }
            const unsigned lo = to_bf16(s.x) | ((unsigned)to_bf16(s.y) << 16), hi = to_bf16(s.z) | ((unsigned)to_bf16(s.w) << 16);
            *(uint2*)(out + blocked(row, n0 + col)) = make_uint2(lo, hi);
        }
        if (LAYER) {  /* the sums of squares of my rows over this cluster's columns, in fixed order */
            bar_consumers();
            const int row = rank * 16 + tid;
            if (tid < 16 && row < R) {
                float t = 0.f;
                for (int col = 0; col < NJ * 8; ++col) t += rowsq[tid * BNS + col];
                g.ss[((P == 1 ? 1 : 0) * (g.programs / 4) + prog / 4) * RS + row] = t;
            }
        }
    }
    /* publish: the unit's stores (ordered before the consumers' bulk-copy reads), then a release add on each counter
       the unit's columns touch. PUB 0: one add per unit after a warpgroup barrier; PUB 1: the same without the proxy
       fence here (the consumer fences); PUB 2: every warp publishes its own stores (4 adds per unit, no barrier); PUB 3:
       PUB 0 with relaxed adds after the one fence (pub_add); PUB 4: PUB 3 with a release-only fence */
    if (PUB != 1) asm volatile("fence.proxy.async.global;" ::: "memory");
    if (PUB == 2) __syncwarp();
    else bar_consumers();
    if (PUB == 2 ? lane == 0 : tid == 0) {
        pub_fence();
        const int bn = NJ * 8;
        unsigned* ctr = g.ctr + (l * 4 + P) * 32;
        if (LAYER && P == 0) {  /* units (head, group): columns head*256 + PAIR g (range 2 head) and + 128 (2 head + 1);
                                   counter 31 counts every qkv unit (o's stand-in for attention waits on it) */
            constexpr int UC = 2 * PAIR, UPH = 256 / UC;  /* columns per unit, units per head */
            pub_add(ctr + 31);
            for (int pr = n0 / UC; pr < (n0 + bn) / UC; ++pr)
                if (pr == n0 / UC || pr / UPH != (pr - 1) / UPH)
                    for (int q = 2 * (pr / UPH); q < 2 * (pr / UPH) + 2; ++q)
                        pub_add(ctr + q);
        } else {
            const int c0 = LAYER && P == 2 ? n0 / 2 : n0, c1 = LAYER && P == 2 ? (n0 + bn) / 2 : n0 + bn;  /* h columns */
            for (int q = c0 / O::RANGE; q <= (c1 - 1) / O::RANGE; ++q)
                pub_add(ctr + q);
        }
        if (STAMPS && tid == 0) ts[3] = globaltimer();
    }
}

/* LOADER: one lane of the sixth warp walks the program's units and, for each quarter of a unit's K range, waits for
   the producing op's counter and asks for that quarter (bulk copy): the consumers only wait on the quarters'
   mbarriers, and start on the first quarter while the producing op may still be publishing the others */
template <int P> __device__ __forceinline__ void load_activations(const Args& g, int l, int prog, unsigned char* smem, int& au) {
    typedef Op<P> O;
    constexpr int KC = O::K / O::SPLIT;
    constexpr unsigned BYTES = KC / 64 * A_BLOCK / 4;
    const int rank = O::SPLIT == 1 ? 0 : (prog & 3), k0 = rank * KC;
    const unsigned a_u32 = smem_u32(smem), bars = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) + NS * SLOT;
    const char* src = (const char*)((ATTN && P == 1 ? g.att : g.act[P]) + (size_t)(k0 / 64) * (A_BLOCK / 2));
    unsigned long long* ts = g.ts + ((size_t)(prog * g.L + l) * 4 + P) * 8;
    if (au > 0) while (!mbar_try(bars + 8 * (2 * NS + 6), (au - 1) & 1)) {}  /* the previous unit's MMAs are done */
    ++au;
    if (LAYER && !ATTN && P == 1) {  /* as attention would: every q / k / v column of this layer is in (counter 31) */
        const unsigned* c = g.ctr + (l * 4 + 0) * 32 + 31;
        while (ld_acquire(c) < g.wait[1][31]) {}
    }
    if (MCAST && O::SPLIT == 1) {
        /* the 4 ranks of a cluster read the same activations: rank c asks for quarter c once, multicast into all 4
           (a quarter of the L2 reads). Every rank expects all 4 quarters' bytes, then tells every rank that its
           region is free (its previous unit's MMAs are done); rank c copies once all 4 have (the cluster's "free"
           barrier: 4 arrivals per unit, 2 such units per layer, so qkv completes phase 0, gate|up phase 1) */
        const int c = prog & 3;
        for (int q = 0; q < 4; ++q)
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bars + 8 * (2 * NS + 2 + q)), "r"(BYTES) : "memory");
        const unsigned freed = bars + 8 * A_FREE;
        for (int j = 0; j < 4; ++j)
            asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" :: "r"(mapa(freed, j)) : "memory");
        if (P != 0 || l > 0) {
            const unsigned* ctr = g.ctr + ((P == 0 ? l - 1 : l) * 4 + (P + 3) % 4) * 32 + c;
            while (ld_acquire(ctr) < g.wait[P][c]) {}
        }
        if (STAMPS) ts[0] = globaltimer();
        asm volatile("fence.proxy.async.global;" ::: "memory");
        while (!mbar_try_cluster(freed, P == 0 ? 0 : 1)) {}
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], %4;"
                     :: "r"(a_u32 + c * BYTES), "l"(src + c * BYTES), "r"(BYTES), "r"(bars + 8 * (2 * NS + 2 + c)),
                        "h"((unsigned short)0xF) : "memory");
        if (LAYER && (P != 0 || l > 0))  /* the sums of squares below are published with every quarter */
            for (int q = 0; q < 4; ++q)
                while (ld_acquire(g.ctr + ((P == 0 ? l - 1 : l) * 4 + (P + 3) % 4) * 32 + q) < g.wait[P][q]) {}
    } else
    for (int q = 0; q < 4; ++q) {
        if (ATTN && P == 1) {  /* the heads of this quarter: every attention unit that writes rows of them */
            const int head = (k0 + q * (KC / 4)) / 256;
            const unsigned* c = g.ctr + (l * 4 + 0) * 32 + 20 + head;
            while (ld_acquire(c) < g.wait[1][20 + head]) {}
        } else if (P != 0 || l > 0) {
            const int r = k0 / (KC / 4) + q;
            const unsigned* c = g.ctr + ((P == 0 ? l - 1 : l) * 4 + (P + 3) % 4) * 32 + r;
            while (ld_acquire(c) < g.wait[P][r]) {}
        }
        if (STAMPS && q == 0) ts[0] = globaltimer();
        asm volatile("fence.proxy.async.global;" ::: "memory");  /* generic-proxy stores of other SMs -> async-proxy reads */
        const unsigned abar = bars + 8 * (2 * NS + 2 + q);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(abar), "r"(BYTES) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(a_u32 + q * BYTES), "l"(src + q * BYTES), "r"(BYTES), "r"(abar) : "memory");
    }
    if (LAYER && O::SPLIT == 1) {  /* every quarter is in, so are the sums of squares published with it */
        const unsigned sbar = bars + 8 * (2 * NS + 7), bytes = g.programs / 4 * RS * 4;  /* a multiple of 16: RS */
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(sbar), "r"(bytes) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES)), "l"(g.ss + (P == 0 ? 0 : 1) * (g.programs / 4) * RS),
                        "r"(bytes), "r"(sbar) : "memory");
    }
    if (STAMPS) ts[1] = globaltimer();
}

template <int P> __device__ __forceinline__ void consume(const Args& g, int l, int prog, unsigned char* smem,
                                                         int& ci, int& su, int& au) {
    typedef Op<P> O;
    constexpr int KC = O::K / O::SPLIT;
    const int4 m = g.meta[P * g.programs + prog];
    const int n0 = m.x, nj = m.y / 8;
    const int tid = threadIdx.x;
    const int rank = O::SPLIT == 1 ? 0 : (prog & 3), k0 = rank * KC;
    unsigned long long* ts = g.ts + ((size_t)(prog * g.L + l) * 4 + P) * 8;
    const unsigned a_u32 = smem_u32(smem);
    const unsigned bars = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) + NS * SLOT;

    const unsigned abar = bars + 8 * (2 * NS + 2);
    const unsigned aparity = au & 1;
    ++au;
    if (!LOADER) {
    /* 1. the producing op's arrivals for this unit's K range (four counters, one per quarter) */
    if (tid == 0) {
        if (P != 0 || l > 0)
            for (int q = 0; q < 4; ++q) {
                const int r = k0 / (KC / 4) + q;
                const unsigned* c = g.ctr + ((P == 0 ? l - 1 : l) * 4 + (P + 3) % 4) * 32 + r;
                while (ld_acquire(c) < g.wait[P][r]) {}
            }
        if (STAMPS) ts[0] = globaltimer();
    }
    bar_consumers();

    /* 2. activations [50][KC] as KC/64 blocks of [56 rows][64] in the 128-byte swizzle (rows 50..63 of a block are
       never stored: whatever they read becomes output rows that are dropped) */
    /* the activations live in global memory in the same blocked, swizzled layout (every op stores its output so):
       the unit's K range is one contiguous run of KC/64 blocks, one bulk copy (A_PIPE: four, one mbarrier each, so
       the MMAs start on the first quarter) */
    if (tid == 0) {
        asm volatile("fence.proxy.async.global;" ::: "memory");  /* generic-proxy stores of other SMs -> async-proxy reads */
        const char* src = (const char*)(g.act[P] + (size_t)(k0 / 64) * (A_BLOCK / 2));
        constexpr unsigned PARTS = A_PIPE ? 4 : 1, BYTES = KC / 64 * A_BLOCK / PARTS;
        #pragma unroll
        for (unsigned part = 0; part < PARTS; ++part) {
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(abar + 8 * part), "r"(BYTES) : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(a_u32 + part * BYTES), "l"(src + part * BYTES), "r"(BYTES), "r"(abar + 8 * part) : "memory");
        }
    }
    if (!A_PIPE) while (!mbar_try(abar, aparity)) {}
    if (tid == 0 && STAMPS) ts[1] = globaltimer();
    }

    /* 3. MMA + epilogue, specialised on the tile width (programs differ by one column group at most) */
    if (nj == O::NJMAX) unit_body<P, O::NJMAX>(g, l, prog, smem, ci, su, n0, rank, aparity, ts);
    else unit_body<P, O::NJALT>(g, l, prog, smem, ci, su, n0, rank, aparity, ts);
}

/* one online-softmax step of a warp's rows gq, gq + 8 over a 16-key sub-block (both attention units): s holds the
   scores, -1e30 where a key is not visible, and mx their running maximum per row within this thread; afterwards s
   holds P = exp(s - max) (0 for masked keys), and the running max m, sum lsum and the output O are updated */
__device__ __forceinline__ void softmax_step(float (&s)[2][4], float (&mx)[2], float (&m)[2], float (&lsum)[2], float (&o)[32][4]) {
    #pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffff, mx[hh], 1));
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffff, mx[hh], 2));
    }
    float alpha[2], rowsum[2] = {0.f, 0.f};
    #pragma unroll
    for (int hh = 0; hh < 2; ++hh) alpha[hh] = fexp(m[hh] - mx[hh]);
    #pragma unroll
    for (int n = 0; n < 2; ++n)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[n][e] = s[n][e] <= -1e29f ? 0.f : fexp(s[n][e] - mx[e >> 1]);
            rowsum[e >> 1] += s[n][e];
        }
    #pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        rowsum[hh] += __shfl_xor_sync(0xffffffff, rowsum[hh], 1);
        rowsum[hh] += __shfl_xor_sync(0xffffffff, rowsum[hh], 2);
        lsum[hh] = lsum[hh] * alpha[hh] + rowsum[hh];
        m[hh] = mx[hh];
    }
    #pragma unroll
    for (int j = 0; j < 32; ++j) { o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1]; }
}

/* ATTN (LAYER probe): the attention link inside the persistent kernel. Unit = (head h, key quarter c) on the
   programs of cluster h (rank c): flash attention over the quarter's keys in sub-blocks of 16 (mma.sync; K / V
   row-major [key][256] through shared memory by cp.async, double-buffered), then the 4 quarters merged in fixed order
   on the rank that owns the rows (warp w's rows -> rank w, st.async). Shared memory: Q [4 blocks] at 0, the K / V
   sub-blocks at ATT_KV, the 3 remote partials at ATT_RECV (all inside the activation region: every qkv unit has
   published before any attention unit starts, and o's activations end below ATT_RECV). */
#define ATT_KV (4 * A_BLOCK)
#define ATT_SB 16                                  /* keys per sub-block */
#define ATT_SBB (ATT_SB * 512)                     /* bytes of one K (or V) sub-block */
#define ATT_STAGES 3                               /* sub-blocks in flight */
#define ATT_VALID (ATT_KV + ATT_STAGES * 2 * ATT_SBB)  /* [stage][16] int: key validity */
#define ATT_RECV (ATT_VALID + ATT_STAGES * 64)     /* 3 remote partials + my own (slot 3) */
#define ATT_PART (16 * 256 * 2 + 16 * 2 * 4)       /* one source's partial: O / l [16][256] bf16, then m, l [16] fp32 */

__device__ __forceinline__ void load_kv_sub(const Args& g, unsigned a_u32, int stage, int k0, int tid) {
    /* keys k0..k0+15 of K and V (rows past TK read row 0: masked) -> [16][256] each, 16-byte groups ^ (key & 7),
       and their validity (key_valid has >= TK + 16 entries: 1 for the suffix keys, 0 past TK) */
    const unsigned dst = a_u32 + ATT_KV + stage * 2 * ATT_SBB;
    for (int i = tid; i < 2 * ATT_SB * 32; i += NC) {
        const int kv = i / (ATT_SB * 32), r = (i / 32) % ATT_SB, c = i % 32, key = k0 + r;
        const bf16* src = (kv ? g.vc : g.kc) + (size_t)(key < g.TK ? key : 0) * 256 + c * 8;
        cp_async16(dst + kv * ATT_SBB + r * 512 + ((c ^ (r & 7)) * 16), src, 16);
    }
    if (tid < 4) cp_async16(a_u32 + ATT_VALID + stage * 64 + tid * 16, g.key_valid + k0 + tid * 4, 16);
    asm volatile("cp.async.commit_group;" ::: "memory");
}

__device__ __forceinline__ void attention_unit(const Args& g, int l, int prog, unsigned char* smem, int& au) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, h = prog >> 2, c = prog & 3;
    const unsigned a_u32 = smem_u32(smem), bars = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) + NS * SLOT;
    const unsigned aparity = au & 1;
    ++au;
    const int CH = ((g.TK + 3) / 4 + 15) / 16 * 16, kb = c * CH, ke = min(g.TK, kb + CH);
    const unsigned rbar = bars + 8 * (2 * NS + 8);
    if (tid == 32 * c)  /* the owner warp of my rows expects the other three quarters' partials */
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(rbar), "r"(3 * ATT_PART) : "memory");
    const int nsb = kb < ke ? (ke - kb + ATT_SB - 1) / ATT_SB : 0;
    /* Q (the loader) arriving also means every qkv unit has published: the suffix rows of K / V are in */
    for (int q = 0; q < 4; ++q) while (!mbar_try(bars + 8 * (2 * NS + 2 + q), aparity)) {}
    for (int i = 0; i < 2 && i < nsb; ++i) load_kv_sub(g, a_u32, i, kb + i * ATT_SB, tid);
    unsigned long long* ts = g.ts + ((size_t)(prog * g.L + l) * 4 + 1) * 8;  /* o's slots 4..7: the attention unit */
    if (STAMPS && tid == 0) ts[4] = globaltimer();

    /* Q fragments of my warp's 16 rows: 16 k16 steps (A operand of S = Q K^T) */
    unsigned qf[16][4];
    const unsigned q_base = pinned_u32(a_u32);  /* after the wait: the ldmatrix below are not volatile */
    #pragma unroll
    for (int ks = 0; ks < 16; ++ks) {
        const int r = 16 * warp + (lane & 15), cc = ks * 2 + (lane >> 4);  /* 16-byte group of the 256-wide row */
        asm("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(qf[ks][0]), "=r"(qf[ks][1]), "=r"(qf[ks][2]), "=r"(qf[ks][3])
                     : "r"(q_base + (cc >> 3) * A_BLOCK + r * 128 + (((cc & 7) ^ (r & 7)) * 16)));
    }
    float o[32][4], m[2] = {-1e30f, -1e30f}, lsum[2] = {0.f, 0.f};
    #pragma unroll
    for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    const int gq = lane >> 2, q4 = lane & 3;
    for (int i = 0; i < nsb; ++i) {
        const int k0 = kb + i * ATT_SB, stage = i % ATT_STAGES;
        if (i + 1 < nsb) asm volatile("cp.async.wait_group 1;" ::: "memory");
        else asm volatile("cp.async.wait_group 0;" ::: "memory");
        bar_consumers();
        if (i + 2 < nsb) load_kv_sub(g, a_u32, (i + 2) % ATT_STAGES, k0 + 2 * ATT_SB, tid);
        const unsigned kbase = pinned_u32(a_u32 + ATT_KV + stage * 2 * ATT_SBB), vbase = kbase + ATT_SBB;
        const int* valid = (const int*)(smem + ATT_VALID + stage * 64);
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        #pragma unroll
        for (int ks = 0; ks < 16; ++ks)
            #pragma unroll
            for (int n = 0; n < 2; ++n) {
                unsigned b0, b1;
                const int r = n * 8 + (lane & 7), cc = ks * 2 + ((lane >> 3) & 1);
                asm("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                             : "=r"(b0), "=r"(b1) : "r"(kbase + r * 512 + ((cc ^ (r & 7)) * 16)));
                asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                             : "+f"(s[n][0]), "+f"(s[n][1]), "+f"(s[n][2]), "+f"(s[n][3])
                             : "r"(qf[ks][0]), "r"(qf[ks][1]), "r"(qf[ks][2]), "r"(qf[ks][3]), "r"(b0), "r"(b1));
            }
        /* mask (prefix padding, keys past the quarter) and the online softmax of rows gq, gq + 8 */
        float mx[2] = {m[0], m[1]};
        #pragma unroll
        for (int n = 0; n < 2; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + n * 8 + 2 * q4 + (e & 1);
                const bool ok = key < ke && valid[key - k0] != 0;
                s[n][e] = ok ? s[n][e] : -1e30f;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        softmax_step(s, mx, m, lsum, o);
        /* P (bf16) as the A operand of O += P V: the two n8 tiles of S are one m16 x k16 fragment */
        const unsigned p0 = to_bf16(s[0][0]) | ((unsigned)to_bf16(s[0][1]) << 16), p1 = to_bf16(s[0][2]) | ((unsigned)to_bf16(s[0][3]) << 16);
        const unsigned p2 = to_bf16(s[1][0]) | ((unsigned)to_bf16(s[1][1]) << 16), p3 = to_bf16(s[1][2]) | ((unsigned)to_bf16(s[1][3]) << 16);
        #pragma unroll
        for (int j = 0; j < 32; ++j) {  /* V [16 keys][256]: B fragment of dims 8j.. by ldmatrix.trans */
            unsigned b0, b1;
            const int r = lane & 15, cc = j;
            asm("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                         : "=r"(b0), "=r"(b1) : "r"(vbase + r * 512 + ((cc ^ (r & 7)) * 16)));
            asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(o[j][0]), "+f"(o[j][1]), "+f"(o[j][2]), "+f"(o[j][3])
                         : "r"(p0), "r"(p1), "r"(p2), "r"(p3), "r"(b0), "r"(b1));
        }
        bar_consumers();  /* the buffer may be refilled */
    }

    if (STAMPS && tid == 0) ts[5] = globaltimer();
    /* merge: warp w's rows belong to rank w. Partials of the other ranks arrive by st.async into ATT_RECV slots
       ordered by source rank (mine excluded) */
    const unsigned recv = a_u32 + ATT_RECV;
    const float inv_l[2] = {lsum[0] > 0.f ? 1.f / lsum[0] : 0.f, lsum[1] > 0.f ? 1.f / lsum[1] : 0.f};
    {  /* O / l in bf16 (the precision of the output), m and l in fp32, staged in shared memory (the K / V stages are
          free now; the owner's own partial goes straight to its slot 3), then one bulk copy into the owner's slot */
        unsigned char* stage = warp == c ? smem + ATT_RECV + 3 * ATT_PART : smem + ATT_KV + (warp < c ? warp : warp - 1) * ATT_PART;
        #pragma unroll
        for (int j = 0; j < 32; ++j)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh)
                *(unsigned*)(stage + 2 * ((gq + 8 * hh) * 256 + 8 * j + 2 * q4)) =
                    to_bf16(o[j][2 * hh] * inv_l[hh]) | ((unsigned)to_bf16(o[j][2 * hh + 1] * inv_l[hh]) << 16);
        if (q4 == 0)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh)
                *(float2*)(stage + 16 * 256 * 2 + 8 * (gq + 8 * hh)) = make_float2(m[hh], lsum[hh]);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  /* generic writes -> the bulk copy reads them */
        __syncwarp();
        if (lane == 0 && warp != c)
            asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(mapa(recv + (c < warp ? c : c - 1) * ATT_PART, warp)), "r"(smem_u32(stage)), "r"(ATT_PART),
                            "r"(mapa(rbar, warp)) : "memory");
    }
    if (warp == c) {  /* a rolled loop over shared memory: the kernel's code is past the instruction cache, so straight-line
                         code that runs once per layer is fetched cold every time */
        while (!mbar_try_cluster(rbar, l & 1)) {}
        unsigned long long* ts0 = g.ts + ((size_t)(prog * g.L + l) * 4 + 0) * 8;  /* qkv's spare slots 4, 5 */
        if (STAMPS && lane == 0) ts0[4] = globaltimer();
        const unsigned char* rv = smem + ATT_RECV;
        #pragma unroll 1
        for (int hh = 0; hh < 2; ++hh) {
            const int row = 16 * c + gq + 8 * hh;
            float w[4], mm = -1e30f, wsum = 0.f;
            #pragma unroll
            for (int src = 0; src < 4; ++src) {
                const float* pm = (const float*)(rv + (src == c ? 3 : src < c ? src : src - 1) * ATT_PART + 16 * 256 * 2) + 2 * (gq + 8 * hh);
                w[src] = pm[0];
                mm = fmaxf(mm, pm[0]);
            }
            #pragma unroll
            for (int src = 0; src < 4; ++src) {  /* the weight of a source's O / l: exp(m - max) l */
                const float* pm = (const float*)(rv + (src == c ? 3 : src < c ? src : src - 1) * ATT_PART + 16 * 256 * 2) + 2 * (gq + 8 * hh);
                w[src] = fexp(w[src] - mm) * pm[1];
                wsum += w[src];
            }
            const float inv = 1.f / wsum;
            #pragma unroll 1
            for (int j = 0; j < 32; ++j) {
                float v0 = 0.f, v1 = 0.f;
                #pragma unroll
                for (int src = 0; src < 4; ++src) {  /* fixed order: deterministic */
                    const unsigned pv = *(const unsigned*)(rv + (src == c ? 3 : src < c ? src : src - 1) * ATT_PART
                                                           + 2 * ((gq + 8 * hh) * 256 + 8 * j + 2 * q4));
                    v0 += w[src] * __uint_as_float(pv << 16);
                    v1 += w[src] * __uint_as_float(pv & 0xffff0000u);
                }
                if (row < R)
                    *(unsigned*)(g.att + blocked(row, 256 * h + 8 * j + 2 * q4)) = to_bf16(v0 * inv) | ((unsigned)to_bf16(v1 * inv) << 16);
            }
        }
        if (STAMPS && lane == 0) ts0[5] = globaltimer();
    }
    asm volatile("fence.proxy.async.global;" ::: "memory");
    bar_consumers();
    mbar_arrive(bars + 8 * (2 * NS + 6));  /* the loader may overwrite the activation region */
    if (tid == 0) {
        if (STAMPS) ts[6] = globaltimer();
        pub_fence();
        pub_add(g.ctr + (l * 4 + 0) * 32 + 20 + h);
        if (STAMPS) ts[7] = globaltimer();
    }
}

/* the loader's part of an attention unit: this head's Q (4 blocks of q) once every qkv unit has published */
__device__ __forceinline__ void load_attention_q(const Args& g, int l, int prog, unsigned char* smem, int& au) {
    const unsigned a_u32 = smem_u32(smem), bars = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) + NS * SLOT;
    if (au > 0) while (!mbar_try(bars + 8 * (2 * NS + 6), (au - 1) & 1)) {}
    ++au;
    const unsigned* c = g.ctr + (l * 4 + 0) * 32 + 31;
    while (ld_acquire(c) < g.wait[1][31]) {}
    asm volatile("fence.proxy.async.global;" ::: "memory");
    for (int q = 0; q < 4; ++q) {  /* one block per activation mbarrier: every unit completes all four phases */
        const unsigned abar = bars + 8 * (2 * NS + 2 + q);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(abar), "r"(A_BLOCK) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(a_u32 + q * A_BLOCK), "l"(g.act[1] + (size_t)(4 * (prog >> 2) + q) * (A_BLOCK / 2)), "r"(A_BLOCK),
                        "r"(abar) : "memory");
    }
}

/* ATTN 2: the attention link on 100 programs (104 with STATE). The 8 heads share one K / V head, so the query rows of
   every head are packed (row i = head * R + r: 400 rows, 25 tiles of 16, as the engine's Triton kernel packs them;
   STATE: 408 rows, 26 tiles). Cluster t < ATILES
   takes tile t, its rank c a quarter of the keys, and the 4 warps of the rank every 4th 16-key sub-block of that
   quarter: a 16-way key split per tile (~22 keys per warp at 1 camera, against 89 per warp with ATTN 1). The loader
   lane streams the K / V sub-blocks into a ring (one bulk copy per key row, rows padded to 528 B so that ldmatrix is
   free of bank conflicts): the prefix ones before the qkv units have published (they do not depend on them), then Q
   and the suffix ones. Merge in fixed order (bitwise deterministic): the 4 warps through shared memory, then the 4
   ranks (rank c owns rows 4c..4c+3 of the tile; the other ranks send theirs by one bulk copy each). Shared memory:
   all of it inside the activation region (free from the qkv unit's last MMA to the end of this unit). */
#define A2_Q 0                                    /* Q: [4 blocks of 64 columns][16 rows][128 B], swizzled by source row */
#define A2_KV 8192                                /* K / V ring: [slot][K, V][16 keys][512 B] (the cache's swizzle) */
#define A2_ROW 528                                /* a merged row: 256 bf16, then m, l fp32 (+ 8 B) */
#define A2_SB (16 * 512)
#define A2_SLOTS 6                                /* a 1-camera key quarter (<= 6 sub-blocks) is requested at once */
#define A2_RECV (A2_KV + A2_SLOTS * 2 * A2_SB)    /* [3 other ranks][4 rows][A2_ROW]: O / l bf16, then m, l fp32 */
#define A2_SLICE (4 * A2_ROW)
#define A2_SROW 260                               /* floats per staged partial row (padded: fewer bank conflicts) */
#define A2_STAGE A2_KV                            /* after the keys: the warps' partials O [4][16][A2_SROW] fp32 */
#define A2_ML (A2_STAGE + 4 * 16 * A2_SROW * 4)   /* and their (m, l) [4][16] */
#define A2_SEND (A2_ML + 4 * 16 * 8)              /* the rank's merged tile [16][A2_ROW] */
#if ATTN == 2 && (A2_SEND < 8 * A_BLOCK || A2_SEND + 16 * A2_ROW > A2_RECV || A2_RECV + 3 * A2_SLICE > A_BYTES)
#error "ATTN 2's shared memory: A2_SEND past o's activations (the loader refills them while other ranks may copy A2_SEND), inside the ring, and all of it inside the activation region"
#endif
#define A2_BAR (2 * NS + 9)                       /* ring mbarriers: full [A2_SLOTS], then empty [A2_SLOTS] */

__device__ __forceinline__ void attention_quarter2(const Args& g, int c, int& kb, int& ke, int& nsb) {
    const int CH = ((g.TK + 3) / 4 + 15) / 16 * 16;
    kb = c * CH;
    ke = min(g.TK, kb + CH);
    nsb = kb < ke ? (ke - kb + 15) / 16 : 0;
}

/* sub-block idx of the loader's sequence (keys k0..k0+15 of layer l) into ring slot idx % slots at ring_u32 */
__device__ __forceinline__ void attention_kv_issue(const Args& g, int l, unsigned ring_u32, unsigned bars, int idx, int k0,
                                                   int slots) {
    const int slot = idx % slots, use = idx / slots;
    const unsigned full = bars + 8 * (A2_BAR + slot), empty = bars + 8 * (A2_BAR + A2_SLOTS + slot);
    if (use > 0) while (!mbar_try(empty, (use - 1) & 1)) {}
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(full), "r"(2 * A2_SB) : "memory");
    const unsigned dst = ring_u32 + slot * 2 * A2_SB;
    /* 16 key rows of K and of V, one bulk copy each: the cache holds >= TK + 16 rows (zeros past TK, masked) and its
       16-byte groups are already XOR-swizzled by key (kv_swizzle), so ldmatrix reads them without bank conflicts */
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(g.kc + (size_t)l * g.kv_layer + (size_t)k0 * 256), "r"(A2_SB), "r"(full) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst + A2_SB), "l"(g.vc + (size_t)l * g.kv_layer + (size_t)k0 * 256), "r"(A2_SB), "r"(full) : "memory");
}

/* the end of an attention unit (ATTN 2 / 3), after its rows of att are stored: att ordered before o's bulk-copy reads,
   the activation region handed back to the loader (o's activations, the first 8 blocks, stop short of the outgoing
   slices that other ranks may still be copying; gate|up's reach them, but they wait for every o unit, hence for every
   attention owner, hence for every slice sent), then the publish on the counters of heads h0 and h1 (h1 == h0: one;
   >= 8: rows past the heads, the last tile's padding) */
__device__ __forceinline__ void attention_unit_end(const Args& g, int l, unsigned bars, unsigned long long* ts, int h0,
                                                   int h1) {
    asm volatile("fence.proxy.async.global;" ::: "memory");
    bar_consumers();
    mbar_arrive(bars + 8 * (2 * NS + 6));
    if (threadIdx.x == 0) {
        if (STAMPS) ts[6] = globaltimer();
        pub_fence();
        if (h0 < 8) pub_add(g.ctr + (l * 4 + 0) * 32 + 20 + h0);
        if (h1 != h0 && h1 < 8) pub_add(g.ctr + (l * 4 + 0) * 32 + 20 + h1);
        if (STAMPS) ts[7] = globaltimer();
    }
}

/* the loader's start of an attention unit (ATTN 2 / 3): once the qkv unit's activations are consumed, the key quarter's
   prefix sub-blocks (fixed keys: they do not wait for this layer's qkv) into the ring at ring_u32, then the wait for
   every qkv unit's publish; returns how many sub-blocks are requested */
__device__ __forceinline__ int attention_loader_begin(const Args& g, int l, int c, unsigned ring_u32, unsigned bars,
                                                      int slots, int& au, int kvi, int& kb, int& ke, int& nsb) {
    attention_quarter2(g, c, kb, ke, nsb);
    if (au > 0) while (!mbar_try(bars + 8 * (2 * NS + 6), (au - 1) & 1)) {}  /* the qkv unit's activations are consumed */
    ++au;
    int j = 0;
    for (; j < nsb && j < slots && kb + 16 * j + 16 <= g.T; ++j)  /* prefix keys: fixed, requested right away */
        attention_kv_issue(g, l, ring_u32, bars, kvi + j, kb + 16 * j, slots);
    while (ld_acquire(g.ctr + (l * 4 + 0) * 32 + 31) < g.wait[1][31]) {}  /* every qkv unit has published */
    asm volatile("fence.proxy.async.global;" ::: "memory");
    return j;
}

/* the consumers' start of an attention unit (ATTN 2 / 3): the activation parity, the key quarter, and the bytes the
   other ranks' slices of this rank's rows will bring to the partials' mbarrier */
__device__ __forceinline__ unsigned attention_unit_begin(const Args& g, int c, unsigned bars, unsigned slices_bytes,
                                                         int& au, int& kb, int& ke, int& nsb) {
    const unsigned aparity = au & 1;
    ++au;
    attention_quarter2(g, c, kb, ke, nsb);
    if (threadIdx.x == 0)  /* my rows' slices from the other three ranks */
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bars + 8 * (2 * NS + 8)),
                     "r"(slices_bytes) : "memory");
    return aparity;
}

/* the loader's part of an attention unit */
__device__ __forceinline__ void attention_loader2(const Args& g, int l, int prog, unsigned char* smem, int& au, int& kvi) {
    const unsigned a_u32 = smem_u32(smem), bars = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) + NS * SLOT;
    const int t = prog >> 2, c = prog & 3;
    int kb, ke, nsb;
    int j = attention_loader_begin(g, l, c, a_u32 + A2_KV, bars, A2_SLOTS, au, kvi, kb, ke, nsb);
    /* Q: one 64-column block per activation mbarrier (each unit completes all four); the tile's rows are one or two
       runs of consecutive rows of one head, each run one bulk copy per block */
    const int i0 = 16 * t, split = min(16, R * (i0 / R + 1) - i0);  /* rows 0..split-1: head i0 / R, the rest: the next */
    #pragma unroll 1
    for (int b = 0; b < 4; ++b) {
        const unsigned abar = bars + 8 * (2 * NS + 2 + b);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(abar), "r"(16 * 128) : "memory");
        #pragma unroll 1
        for (int s = 0; s < 16; s = split) {
            const int n = s == 0 ? split : 16 - split, i = i0 + s;
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(a_u32 + A2_Q + b * 2048 + s * 128),
                            "l"(g.act[1] + (size_t)(4 * (i / R) + b) * (A_BLOCK / 2) + (i % R) * 64), "r"(n * 128), "r"(abar) : "memory");
            if (s == split) break;
        }
    }
    for (; j < nsb; ++j) attention_kv_issue(g, l, a_u32 + A2_KV, bars, kvi + j, kb + 16 * j, A2_SLOTS);
    kvi += nsb;
}

__device__ __forceinline__ void attention_unit2(const Args& g, int l, int prog, unsigned char* smem, int& au, int& kvi) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t = prog >> 2, c = prog & 3;
    const unsigned a_u32 = smem_u32(smem), bars = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) + NS * SLOT;
    int kb, ke, nsb;
    const unsigned aparity = attention_unit_begin(g, c, bars, 3 * A2_SLICE, au, kb, ke, nsb);
    const unsigned rbar = bars + 8 * (2 * NS + 8);
    /* key validity of this thread's keys in every iteration (fixed during the kernel: read before Q arrives, off the
       keys loop's critical path) */
    const int gq = lane >> 2, q4 = lane & 3;
    unsigned vbits = 0;
    #pragma unroll
    for (int it = 0; it < 4; ++it)  /* nsb <= 16 (TK <= 1024, asserted by the host) */
        #pragma unroll
        for (int n = 0; n < 2; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int sb = 4 * it + warp, key = kb + 16 * sb + n * 8 + 2 * q4 + (e & 1);
                /* STATE: the state token's rows (packed row head * R + R - 1) see the prefix and their own key only */
                const bool state_row = STATE && (16 * t + gq + 8 * (e >> 1)) % R == R - 1;
                if (sb < nsb && key < ke && __ldg(g.key_valid + key) != 0 && !(state_row && key > g.T))
                    vbits |= 1u << (8 * it + 4 * n + e);
            }
    for (int q = 0; q < 4; ++q) while (!mbar_try(bars + 8 * (2 * NS + 2 + q), aparity)) {}
    unsigned long long* ts = g.ts + ((size_t)(prog * g.L + l) * 4 + 1) * 8;  /* o's slots 4..7: the attention unit */
    unsigned long long* ts0 = g.ts + ((size_t)(prog * g.L + l) * 4 + 0) * 8;  /* qkv's spare slots 4, 5 */
    if (STAMPS && tid == 0) ts[4] = globaltimer();

    /* Q fragments (A operand of S = Q K^T) are read from shared memory at each k16 step rather than held: 64 fewer
       registers (at 255, ptxas serialised the other ops' wgmma) */
    const unsigned q_base = pinned_u32(a_u32 + A2_Q);
    const int q_row = lane & 15, q_swz = (16 * t + q_row) % R & 7;
    float o[32][4], m[2] = {-1e30f, -1e30f}, lsum[2] = {0.f, 0.f};
    #pragma unroll
    for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    /* every warp runs the same number of iterations (a warp past the quarter's last sub-block reads Q's finite bytes
       with every key masked): ptxas serialises the other ops' wgmma when the warpgroup has warp-dependent trip counts */
    #pragma unroll 1
    for (int sb0 = 0; sb0 < nsb; sb0 += 4) {
        const int sb = sb0 + warp, idx = kvi + sb, slot = idx % A2_SLOTS;
        const bool real = sb < nsb;
        while (real && !mbar_try(bars + 8 * (A2_BAR + slot), (idx / A2_SLOTS) & 1)) {}
        const unsigned kbase = pinned_u32(real ? a_u32 + A2_KV + slot * 2 * A2_SB : a_u32 + A2_Q), vbase = kbase + (real ? A2_SB : 0);
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}}, s2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        #pragma unroll
        for (int ks = 0; ks < 16; ++ks) {  /* even / odd k16 steps into two accumulators: two independent mma chains */
            float (*acc)[4] = ks & 1 ? s2 : s;
            unsigned qf[4];
            const int qc = ks * 2 + (lane >> 4);
            asm("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                : "=r"(qf[0]), "=r"(qf[1]), "=r"(qf[2]), "=r"(qf[3])
                : "r"(q_base + (qc >> 3) * 2048 + q_row * 128 + (((qc & 7) ^ q_swz) * 16)));
            #pragma unroll
            for (int n = 0; n < 2; ++n) {
                unsigned b0, b1;
                const int r = n * 8 + (lane & 7), cc = ks * 2 + ((lane >> 3) & 1);
                asm("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                    : "=r"(b0), "=r"(b1) : "r"(kbase + r * 512 + (((cc & ~7) | ((cc ^ r) & 7)) * 16)));
                asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                    : "+f"(acc[n][0]), "+f"(acc[n][1]), "+f"(acc[n][2]), "+f"(acc[n][3])
                    : "r"(qf[0]), "r"(qf[1]), "r"(qf[2]), "r"(qf[3]), "r"(b0), "r"(b1));
            }
        }
        #pragma unroll
        for (int n = 0; n < 2; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] += s2[n][e];
        float mx[2] = {m[0], m[1]};
        #pragma unroll
        for (int n = 0; n < 2; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool ok = (vbits >> (8 * (sb0 / 4) + 4 * n + e)) & 1;
                s[n][e] = ok ? s[n][e] : -1e30f;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        softmax_step(s, mx, m, lsum, o);
        const unsigned p0 = to_bf16(s[0][0]) | ((unsigned)to_bf16(s[0][1]) << 16), p1 = to_bf16(s[0][2]) | ((unsigned)to_bf16(s[0][3]) << 16);
        const unsigned p2 = to_bf16(s[1][0]) | ((unsigned)to_bf16(s[1][1]) << 16), p3 = to_bf16(s[1][2]) | ((unsigned)to_bf16(s[1][3]) << 16);
        #pragma unroll
        for (int j = 0; j < 32; ++j) {
            unsigned b0, b1;
            asm("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                : "=r"(b0), "=r"(b1) : "r"(vbase + (lane & 15) * 512 + (((j & ~7) | ((j ^ lane) & 7)) * 16)));
            asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                : "+f"(o[j][0]), "+f"(o[j][1]), "+f"(o[j][2]), "+f"(o[j][3])
                : "r"(p0), "r"(p1), "r"(p2), "r"(p3), "r"(b0), "r"(b1));
        }
        __syncwarp();
        if (real && lane == 0) mbar_arrive(bars + 8 * (A2_BAR + A2_SLOTS + slot));  /* the loader may refill the slot */
    }
    kvi += nsb;
    if (STAMPS && tid == 0) ts[5] = globaltimer();

    /* the 4 warps' partials (unnormalised O, m, l) into shared memory; the ring is free: every sub-block is consumed */
    bar_consumers();
    {
        float* stage = (float*)(smem + A2_STAGE) + warp * 16 * A2_SROW;
        #pragma unroll
        for (int j = 0; j < 32; ++j)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh)
                *(float2*)(stage + (gq + 8 * hh) * A2_SROW + 8 * j + 2 * q4) = make_float2(o[j][2 * hh], o[j][2 * hh + 1]);
        if (q4 == 0)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh)
                *(float2*)(smem + A2_ML + (warp * 16 + gq + 8 * hh) * 8) = make_float2(m[hh], lsum[hh]);
    }
    bar_consumers();
    {   /* warp w merges columns 64w..64w+63 of the 16 rows in fixed order; lane: row lane / 2, 32 columns */
        const int row = lane >> 1, col0 = 64 * warp + 32 * (lane & 1);
        float e[4], mm = -1e30f, lw = 0.f;
        #pragma unroll
        for (int w = 0; w < 4; ++w) mm = fmaxf(mm, ((const float*)(smem + A2_ML + (w * 16 + row) * 8))[0]);
        #pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float2 ml = *(const float2*)(smem + A2_ML + (w * 16 + row) * 8);
            e[w] = ml.y > 0.f ? fexp(ml.x - mm) : 0.f;
            lw += e[w] * ml.y;
        }
        const float inv = lw > 0.f ? (RCP ? __fdividef(1.f, lw) : 1.f / lw) : 0.f;
        unsigned char* send = smem + A2_SEND + row * A2_ROW;
        #pragma unroll 1
        for (int cg = 0; cg < 32; cg += 8) {
            unsigned pk[4];
            #pragma unroll
            for (int u = 0; u < 8; u += 2) {
                float v0 = 0.f, v1 = 0.f;
                #pragma unroll
                for (int w = 0; w < 4; ++w) {
                    const float2 pv = *(const float2*)((const float*)(smem + A2_STAGE) + (w * 16 + row) * A2_SROW + col0 + cg + u);
                    v0 += e[w] * pv.x;
                    v1 += e[w] * pv.y;
                }
                pk[u / 2] = to_bf16(v0 * inv) | ((unsigned)to_bf16(v1 * inv) << 16);
            }
            *(uint4*)(send + 2 * (col0 + cg)) = make_uint4(pk[0], pk[1], pk[2], pk[3]);
        }
        if (warp == 0 && (lane & 1) == 0) *(float2*)(send + 512) = make_float2(mm, lw);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  /* generic writes -> the bulk copies read them */
    bar_consumers();
    if (STAMPS && tid == 0) ts0[6] = globaltimer();  /* the rank's tile merged (qkv's spare slot 6) */
    const unsigned recv = a_u32 + A2_RECV;
    if (tid == 0)
        #pragma unroll 1
        for (int d = 0; d < 4; ++d)
            if (d != c)
                asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             :: "r"(mapa(recv + (c < d ? c : c - 1) * A2_SLICE, d)), "r"(a_u32 + A2_SEND + 4 * d * A2_ROW), "r"(A2_SLICE),
                                "r"(mapa(rbar, d)) : "memory");
    while (!mbar_try_cluster(rbar, l & 1)) {}
    if (STAMPS && tid == 0) ts0[4] = globaltimer();
    {   /* rows 4c..4c+3 of the tile from the 4 ranks in fixed order; thread: row tid / 32, 8 columns */
        const int row = tid >> 5, col = 8 * (tid & 31), i = 16 * t + 4 * c + row;
        const unsigned char* src[4];
        #pragma unroll
        for (int s = 0; s < 4; ++s)
            src[s] = s == c ? smem + A2_SEND + (4 * c + row) * A2_ROW : smem + A2_RECV + (s < c ? s : s - 1) * A2_SLICE + row * A2_ROW;
        float w[4], mm = -1e30f, wsum = 0.f;
        #pragma unroll
        for (int s = 0; s < 4; ++s) mm = fmaxf(mm, ((const float*)(src[s] + 512))[0]);
        #pragma unroll
        for (int s = 0; s < 4; ++s) {
            const float2 ml = *(const float2*)(src[s] + 512);
            w[s] = ml.y > 0.f ? fexp(ml.x - mm) * ml.y : 0.f;
            wsum += w[s];
        }
        const float inv = wsum > 0.f ? (RCP ? __fdividef(1.f, wsum) : 1.f / wsum) : 0.f;
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        #pragma unroll
        for (int s = 0; s < 4; ++s) {
            const uint4 pv = *(const uint4*)(src[s] + 2 * col);
            const unsigned pw[4] = {pv.x, pv.y, pv.z, pv.w};
            #pragma unroll
            for (int u = 0; u < 4; ++u) {
                acc[2 * u] += w[s] * __uint_as_float(pw[u] << 16);
                acc[2 * u + 1] += w[s] * __uint_as_float(pw[u] & 0xffff0000u);
            }
        }
        unsigned pk[4];
        #pragma unroll
        for (int u = 0; u < 4; ++u) pk[u] = to_bf16(acc[2 * u] * inv) | ((unsigned)to_bf16(acc[2 * u + 1] * inv) << 16);
        if (i < 8 * R) *(uint4*)(g.att + blocked(i % R, 256 * (i / R) + col)) = make_uint4(pk[0], pk[1], pk[2], pk[3]);
    }
    if (STAMPS && tid == 0) ts0[5] = globaltimer();
    const int i0 = 16 * t + 4 * c;  /* my rows' heads (rows past 8 R: the last tile's padding, STATE: no head) */
    attention_unit_end(g, l, bars, ts, i0 / R, (i0 + 3) / R);
}

/* ATTN 3: the attention link with wgmma. Cluster h < 8 takes head h whole (its R query rows as one m64 tile: the q
   activations' blocks 4h..4h+3 are already the A operand's K-major 128-byte-swizzled layout), rank c a quarter of the
   keys (attention_quarter2). Per 16-key sub-block: S = Q K^T as 16 wgmma m64n16k16 (K's sub-block is a K-major B
   operand: the cache is stored [key / 16][4 dim blocks][16 keys][128 B], 16-byte groups XOR key % 8, `kv_blocked`),
   the online softmax on the accumulator (warp w holds rows 16w.., the mma.sync layout), then O += P V as 4 wgmma
   m64n64k16 with P from registers and V's sub-block as an N-major B operand (the same layout read transposed). No
   in-rank merge: warp w's 16 rows go to rank w (normalised bf16 + m, l by one bulk copy each), and rank c's warp c
   merges rows 16c..16c+15 from the 4 quarters in fixed order (bitwise deterministic). Shared memory, inside the
   activation region: Q, a 3-slot K / V ring, after the keys the 3 outgoing slices (past o's activations, which the
   loader refills while other ranks may still copy them), and the 3 incoming ones (past the ring). */
#define A3_Q 0                                    /* Q: blocks 4h..4h+3 of q, [4][56 rows][128 B] */
#define A3_KV (4 * A_BLOCK)                       /* K / V ring: [slot][K, V][4 dim blocks][16 keys][128 B] */
#define A3_SLOTS 3
#define A3_SEND (8 * A_BLOCK)                     /* [3 other ranks][16 rows][A2_ROW]: O / l bf16, then m, l fp32 */
#define A3_SLICE (16 * A2_ROW)
#define A3_RECV (A3_SEND + 3 * A3_SLICE)          /* [3 other ranks][16 rows][A2_ROW] */
#if ATTN == 3 && (A3_KV + A3_SLOTS * 2 * A2_SB > A3_RECV || A3_RECV + 3 * A3_SLICE > A_BYTES || A3_KV % 1024)
#error "ATTN 3's shared memory: the ring must end before the incoming slices, all of it inside the activation region"
#endif

__device__ __forceinline__ void attention_loader3(const Args& g, int l, int prog, unsigned char* smem, int& au, int& kvi) {
    const unsigned a_u32 = smem_u32(smem), bars = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) + NS * SLOT;
    const int h = prog >> 2, c = prog & 3;
    int kb, ke, nsb;
    int j = attention_loader_begin(g, l, c, a_u32 + A3_KV, bars, A3_SLOTS, au, kvi, kb, ke, nsb);
    #pragma unroll 1
    for (int b = 0; b < 4; ++b) {  /* Q: head h's four 64-column blocks, one per activation mbarrier */
        const unsigned abar = bars + 8 * (2 * NS + 2 + b);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(abar), "r"(A_BLOCK) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(a_u32 + A3_Q + b * A_BLOCK), "l"(g.act[1] + (size_t)(4 * h + b) * (A_BLOCK / 2)), "r"(A_BLOCK),
                        "r"(abar) : "memory");
    }
    for (; j < nsb; ++j) attention_kv_issue(g, l, a_u32 + A3_KV, bars, kvi + j, kb + 16 * j, A3_SLOTS);
    kvi += nsb;
}

__device__ __forceinline__ void attention_unit3(const Args& g, int l, int prog, unsigned char* smem, int& au, int& kvi) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, h = prog >> 2, c = prog & 3;
    const unsigned a_u32 = smem_u32(smem), bars = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES) + NS * SLOT;
    int kb, ke, nsb;
    const unsigned aparity = attention_unit_begin(g, c, bars, 3 * A3_SLICE, au, kb, ke, nsb);
    const unsigned rbar = bars + 8 * (2 * NS + 8);
    /* validity of this thread's 4 keys of every sub-block (columns 8n + 2 q4 + {0, 1}: two 8-byte loads), all requested
       at once before Q arrives (one after another they would cost an L2 round trip per sub-block) */
    const int gq = lane >> 2, q4 = lane & 3;
    unsigned long long vbits = 0;
    #pragma unroll
    for (int sb = 0; sb < 16; ++sb)  /* nsb <= 16 (TK <= 1024, asserted by the host) */
        #pragma unroll
        for (int n = 0; n < 2; ++n) {
            const int key = kb + 16 * sb + 8 * n + 2 * q4;
            if (sb < nsb) {
                const int2 v = __ldg((const int2*)(g.key_valid + key));
                vbits |= (unsigned long long)((key < ke && v.x != 0) | ((key + 1 < ke && v.y != 0) << 1)) << (4 * sb + 2 * n);
            }
        }
    /* STATE: the state token's row (R - 1) sees the prefix and its own key only */
    const bool srow0 = STATE && 16 * warp + gq == R - 1, srow1 = STATE && 16 * warp + gq + 8 == R - 1;
    for (int q = 0; q < 4; ++q) while (!mbar_try(bars + 8 * (2 * NS + 2 + q), aparity)) {}
    unsigned long long* ts = g.ts + ((size_t)(prog * g.L + l) * 4 + 1) * 8;  /* o's slots 4..7: the attention unit */
    unsigned long long* ts0 = g.ts + ((size_t)(prog * g.L + l) * 4 + 0) * 8;  /* qkv's spare slots 4..6 */
    if (STAMPS && tid == 0) ts[4] = globaltimer();

    const unsigned q_base = pinned_u32(a_u32 + A3_Q);
    float o[32][4], m[2] = {-1e30f, -1e30f}, lsum[2] = {0.f, 0.f};
    #pragma unroll
    for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    #pragma unroll 1
    for (int sb = 0; sb < nsb; ++sb) {
        const int idx = kvi + sb, slot = idx % A3_SLOTS;
        while (!mbar_try(bars + 8 * (A2_BAR + slot), (idx / A3_SLOTS) & 1)) {}
        const unsigned kbase = pinned_u32(a_u32 + A3_KV + slot * 2 * A2_SB), vbase = kbase + A2_SB;
        float s[2][4];
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        #pragma unroll 1
        for (int i = 0; i < 16; ++i)  /* S = Q K^T: dim block i / 4, its k16 step i % 4 (a rolled loop: less code) */
            wgmma_n<16>(&s[0][0], sw128_desc(q_base + (i >> 2) * A_BLOCK + 32 * (i & 3)),
                        sw128_desc(kbase + (i >> 2) * 2048 + 32 * (i & 3)), i);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        float mx[2] = {m[0], m[1]};
        #pragma unroll
        for (int n = 0; n < 2; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kb + 16 * sb + 8 * n + 2 * q4 + (e & 1);
                const bool ok = ((vbits >> (4 * sb + 2 * n + (e & 1))) & 1) && !((e >> 1 ? srow1 : srow0) && key > g.T);
                s[n][e] = ok ? s[n][e] : -1e30f;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        softmax_step(s, mx, m, lsum, o);
        const unsigned p0 = to_bf16(s[0][0]) | ((unsigned)to_bf16(s[0][1]) << 16), p1 = to_bf16(s[0][2]) | ((unsigned)to_bf16(s[0][3]) << 16);
        const unsigned p2 = to_bf16(s[1][0]) | ((unsigned)to_bf16(s[1][1]) << 16), p3 = to_bf16(s[1][2]) | ((unsigned)to_bf16(s[1][3]) << 16);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        #pragma unroll
        for (int q = 0; q < 4; ++q) wgmma_pv64(&o[8 * q][0], p0, p1, p2, p3, sw128_desc_mn(vbase + q * 2048));
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        bar_consumers();  /* every warp's share of the MMAs has read the slot */
        if (tid == 0) mbar_arrive(bars + 8 * (A2_BAR + A2_SLOTS + slot));  /* the loader may refill it */
    }
    kvi += nsb;
    if (STAMPS && tid == 0) ts[5] = globaltimer();

    /* warp w's rows 16w.. (normalised, bf16, with m and l) to rank w by one bulk copy; rank c's own rows into the
       ring (free now: every sub-block is consumed) */
    {
        const float inv0 = lsum[0] > 0.f ? 1.f / lsum[0] : 0.f, inv1 = lsum[1] > 0.f ? 1.f / lsum[1] : 0.f;
        unsigned char* stage = warp == c ? smem + A3_KV : smem + A3_SEND + (warp < c ? warp : warp - 1) * A3_SLICE;
        #pragma unroll
        for (int j = 0; j < 32; ++j) {
            *(unsigned*)(stage + gq * A2_ROW + 2 * (8 * j + 2 * q4)) = to_bf16(o[j][0] * inv0) | ((unsigned)to_bf16(o[j][1] * inv0) << 16);
            *(unsigned*)(stage + (gq + 8) * A2_ROW + 2 * (8 * j + 2 * q4)) = to_bf16(o[j][2] * inv1) | ((unsigned)to_bf16(o[j][3] * inv1) << 16);
        }
        if (q4 == 0) {
            *(float2*)(stage + gq * A2_ROW + 512) = make_float2(m[0], lsum[0]);
            *(float2*)(stage + (gq + 8) * A2_ROW + 512) = make_float2(m[1], lsum[1]);
        }
        if (warp != c) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  /* generic writes -> the bulk copy reads them */
            __syncwarp();
            if (lane == 0)
                asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             :: "r"(mapa(a_u32 + A3_RECV + (c < warp ? c : c - 1) * A3_SLICE, warp)), "r"(smem_u32(stage)),
                                "r"(A3_SLICE), "r"(mapa(rbar, warp)) : "memory");
        }
    }
    bar_consumers();  /* the own rows are staged */
    while (!mbar_try_cluster(rbar, l & 1)) {}
    if (STAMPS && tid == 0) ts0[4] = globaltimer();
    {   /* rows 16c..16c+15 from the 4 quarters in fixed order; thread: row tid / 8, 32 columns in 4 groups of 8 */
        const int row = tid >> 3, r = 16 * c + row, col0 = 32 * (tid & 7);
        const unsigned char* src[4];
        #pragma unroll
        for (int s = 0; s < 4; ++s)
            src[s] = s == c ? smem + A3_KV + row * A2_ROW : smem + A3_RECV + (s < c ? s : s - 1) * A3_SLICE + row * A2_ROW;
        float w[4], mm = -1e30f, wsum = 0.f;
        #pragma unroll
        for (int s = 0; s < 4; ++s) mm = fmaxf(mm, ((const float*)(src[s] + 512))[0]);
        #pragma unroll
        for (int s = 0; s < 4; ++s) {
            const float2 ml = *(const float2*)(src[s] + 512);
            w[s] = ml.y > 0.f ? fexp(ml.x - mm) * ml.y : 0.f;
            wsum += w[s];
        }
        const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
        if (r < R)
            #pragma unroll 1
            for (int cg = 0; cg < 32; cg += 8) {
                float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                #pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const uint4 pv = *(const uint4*)(src[s] + 2 * (col0 + cg));
                    const unsigned pw[4] = {pv.x, pv.y, pv.z, pv.w};
                    #pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        acc[2 * u] += w[s] * __uint_as_float(pw[u] << 16);
                        acc[2 * u + 1] += w[s] * __uint_as_float(pw[u] & 0xffff0000u);
                    }
                }
                unsigned pk[4];
                #pragma unroll
                for (int u = 0; u < 4; ++u) pk[u] = to_bf16(acc[2 * u] * inv) | ((unsigned)to_bf16(acc[2 * u + 1] * inv) << 16);
                *(uint4*)(g.att + blocked(r, 256 * h + col0 + cg)) = make_uint4(pk[0], pk[1], pk[2], pk[3]);
            }
    }
    if (STAMPS && tid == 0) ts0[5] = globaltimer();
    attention_unit_end(g, l, bars, ts, h, h);
}

extern "C" __global__ void __cluster_dims__(4, 1, 1) __launch_bounds__(192, 1) mega_chain_kernel(const Args g)
{
    extern __shared__ __align__(1024) unsigned char smem[];
    const int tid = threadIdx.x, prog = blockIdx.x;
    const unsigned ring = smem_u32(smem + A_BYTES + RECV_BYTES + ROWSQ_BYTES + SS_BYTES), bars = ring + NS * SLOT;
    if (smem_u32(smem) & 1023) asm volatile("trap;");  /* the swizzle atoms assume a 1024-aligned window */
    if (tid == 0) {
        for (int s = 0; s < NS; ++s) { mbar_init(bars + 8 * s, 1); mbar_init(bars + 8 * (NS + s), NC); }
        mbar_init(bars + 8 * (2 * NS), 1);      /* the owner's expect_tx; the partials' bytes complete it */
        mbar_init(bars + 8 * (2 * NS + 1), 1);
        for (int part = 0; part < 4; ++part) mbar_init(bars + 8 * (2 * NS + 2 + part), 1);  /* activations */
        mbar_init(bars + 8 * (2 * NS + 6), NC);  /* activations consumed (LOADER) */
        mbar_init(bars + 8 * (2 * NS + 7), 1);   /* LAYER: sums of squares in shared memory (qkv: phase 0, gu: 1) */
        mbar_init(bars + 8 * (2 * NS + 8), 1);   /* ATTN: the other key quarters' partials of my rows */
        mbar_init(bars + 8 * A_FREE, 4);          /* MCAST: every rank's activation region is free */
        for (int s = 0; s < 2 * A2_SLOTS; ++s) mbar_init(bars + 8 * (A2_BAR + s), 1);  /* ATTN 2: K / V ring */
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    cluster_sync();  /* every rank's mbarriers exist before anyone arrives on them */
    /* launched with programmatic dependent launch (the engine): the producer streams the weights (constants) into the
       ring at once, every other thread first waits for the previous kernel's writes (a no-op without PDL) */
    if (tid < NC || tid >= NC + 32) asm volatile("griddepcontrol.wait;" ::: "memory");
    /* the role as a warp-uniform value (shfl): ptxas then knows the consumer warpgroup's wgmma path is not divergent */
    const int producer = __shfl_sync(0xffffffff, tid >= NC, 0);
    if (producer) {
        if (tid == NC) {
            int ci = 0, pf = 0;
            for (int t = 0; t < AHEAD; ++t) prefetch_op(g, t, prog);
            for (int l = 0; l < g.L; ++l) {
                if (AHEAD) prefetch_op(g, l * 4 + 0 + AHEAD, prog);
                produce<0>(g, l, prog, ring, bars, ci, pf);
                if (AHEAD) prefetch_op(g, l * 4 + 1 + AHEAD, prog);
                produce<1>(g, l, prog, ring, bars, ci, pf);
                if (AHEAD) prefetch_op(g, l * 4 + 2 + AHEAD, prog);
                produce<2>(g, l, prog, ring, bars, ci, pf);
                if (AHEAD) prefetch_op(g, l * 4 + 3 + AHEAD, prog);
                produce<3>(g, l, prog, ring, bars, ci, pf);
            }
        }
        if (LOADER && tid == NC + 32) {
            int au = 0, kvi = 0;
            for (int l = 0; l < g.L; ++l) {
                load_activations<0>(g, l, prog, smem, au);
                if (ATTN == 1 && prog < 32) load_attention_q(g, l, prog, smem, au);
                if (ATTN == 2 && prog < 4 * ATILES) attention_loader2(g, l, prog, smem, au, kvi);
                if (ATTN == 3 && prog < 32) attention_loader3(g, l, prog, smem, au, kvi);
                load_activations<1>(g, l, prog, smem, au);
                load_activations<2>(g, l, prog, smem, au);
                load_activations<3>(g, l, prog, smem, au);
            }
        }
        __syncwarp();
    } else {
        int ci = 0, su = 0, au = 0, kvi = 0;
        for (int l = 0; l < g.L; ++l) {
            if (l == g.L - 1 && tid == 0) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  /* the next
                kernel (PDL) may get ready during the last layer; it waits for this grid's end before reading */
            consume<0>(g, l, prog, smem, ci, su, au);
            if (ATTN == 1 && prog < 32) attention_unit(g, l, prog, smem, au);
            if (ATTN == 2 && prog < 4 * ATILES) attention_unit2(g, l, prog, smem, au, kvi);
            if (ATTN == 3 && prog < 32) attention_unit3(g, l, prog, smem, au, kvi);
            consume<1>(g, l, prog, smem, ci, su, au);
            consume<2>(g, l, prog, smem, ci, su, au);
            consume<3>(g, l, prog, smem, ci, su, au);
        }
    }
    cluster_sync();  /* no rank leaves while another may still write its shared memory */
}
"""


A_PIPE = 1  # default: activations in four bulk copies, the MMAs start on the first (0: one copy; measured slower)
PUB = 3  # default publish variant (unit_body's comment; 3 vs 0: NOTES.md session 10)
WGD = 1  # default wgmma groups in flight before a ring slot is released
LOADER = 1  # default: a loader lane waits for the activations and copies them (0: the consumers do; measured slower with per-quarter counters)
ATTN_MODE = 2  # the attention link (LAYER probe with kc / vc): 1 session 7's unit (32 programs), 2 the packed-row one
AHEAD = 0  # default L2 prefetch distance in ops (0: off; 1-8 measured slower, benchmarks/NOTES.md)
MCAST = 0  # default: each rank copies the qkv / gate|up activations itself (1: multicast; measured slower, NOTES.md)
GELU = 1  # gate|up's GELU variant (gelu_tanh_f; 1 vs 0: NOTES.md session 10); the engine's is Tuning.mega_gelu
PF = 0  # default lazy L2 prefetch lookahead in ring chunks (produce; 0: off)
ROLL = 0  # default: qkv's / gate|up's epilogues unrolled (1: rolled over staged accumulators; measured slower, NOTES.md)
RCP = 0  # default ATTN 2 softmax normalisers: 0 IEEE reciprocal, 1 fast (__fdividef)
EXP = 2  # default exponentials (fexp): 1 ex2.approx.ftz, 0 __expf (probe -0.1..-0.6 us per layer, engine -0.1 ms: NOTES.md
# s13); 2: also the row scales' rsqrt as rsqrt.approx.ftz (frsqrt)
PAIR = 8  # default LAYER unit half-width (see PAIRED)
SPACK = 0  # default: one weight chunk per ring slot (1: two narrow chunks share a slot, Pack)
TAIL = 0  # default: no L2 prefetch of an op's chunks past the ring (1: gate|up's, 2: every op's)


def _wgmma_functions() -> str:
    """wgmma_n<N> for the tile widths the plan deals."""
    return wgmma_n_source({8 * nj for (_, _, _, _, njmax) in OPS.values() for nj in (njmax, njmax - 1)}
                          | {8 * nj for by_op in PAIRED.values() for pair in by_op.values() for nj in pair})


def source(ahead: int = AHEAD, a_pipe: int = A_PIPE, pub: int = PUB, wgd: int = WGD, loader: int = LOADER,
           layer: int = 0, attn: int = 0, mcast: int = MCAST, gelu: int = GELU, pf: int = PF, rcp: int = RCP,
           pair: int = PAIR, spack: int = SPACK, ns: int = NS, tail: int = TAIL, state: int = 0, ts: int = 1,
           roll: int = ROLL, exp: int = EXP) -> str:
    assert pair in PAIRED, pair
    assert not (pf and spack), "PF counts chunks, SPACK's producer counts slots"
    assert not state or (layer and attn in (2, 3)), "STATE: flow step 0 of the real layer with ATTN 2 or 3"
    assert smem_bytes(ns) <= 227 * 1024, f"a ring of {ns} slots does not fit in shared memory"
    assert a_pipe or not loader, "the loader copies the activations in quarters"
    assert loader or not mcast, "MCAST: the loader multicasts"
    assert loader or not layer, "LAYER: the loader copies the sums of squares"
    text = _SOURCE
    assert layer or not attn, "ATTN is part of the LAYER probe"
    consts = dict(EXP=exp, ROLL=roll, TS=ts, ROWS=R + state, RS=ss_stride(R + state), STATE=state, AHEAD=ahead, MCAST=mcast, GELU=gelu, PF=pf, RCP=rcp, PAIR=pair, SPACK=spack, TAIL=tail, A_PIPE=a_pipe, PUB=pub, WGD=wgd, LOADER=loader, LAYER=layer, ATTN=attn, ROWSQ_BYTES=ROWSQ_BYTES,
                  SS_BYTES=SS_BYTES, A_BLOCK=A_BLOCK, WGMMA=_wgmma_functions(), NS=ns, SLOT=SLOT, A_BYTES=A_BYTES, RECV_BYTES=RECV_BYTES, BN_SPLIT_MAX=BN_SPLIT_MAX,
                  HELPERS=CUDA_HELPERS % {}, HOPPER=HOPPER_HELPERS)
    for k, v in consts.items():
        text = text.replace(f"@{k}@", str(v))
    return text


class _Args(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p * 4), ("act", ctypes.c_void_p * 4), ("meta", ctypes.c_void_p),
                ("ctr", ctypes.c_void_p), ("ts", ctypes.c_void_p), ("L", ctypes.c_int), ("use_ts", ctypes.c_int),
                ("programs", ctypes.c_int), ("pad", ctypes.c_int), ("xs", ctypes.c_void_p), ("ss", ctypes.c_void_p),
                ("pos", ctypes.c_void_p), ("cos_t", ctypes.c_void_p), ("sin_t", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("pad2", ctypes.c_int), ("att", ctypes.c_void_p), ("kc", ctypes.c_void_p),
                ("vc", ctypes.c_void_p), ("key_valid", ctypes.c_void_p), ("T", ctypes.c_int), ("TK", ctypes.c_int),
                ("kv_layer", ctypes.c_longlong),
                ("wait", (ctypes.c_uint * 32) * 4)]


def deal(groups: int, parts: int) -> list[int]:
    """groups of 8 columns dealt to parts as evenly as possible (the first ones get one more)."""
    base, extra = divmod(groups, parts)
    return [base + (i < extra) for i in range(parts)]


class MegaPlan:
    """Who computes which columns: per op and program (first column, columns, weight block offset), and how many
    arrivals every unit waits for. `programs` = 4 x the clusters of 4 that can be resident at once."""

    def __init__(self, programs: int, layer: bool = False, pair: int = PAIR):
        assert programs % CLUSTER == 0 and programs <= 4 * 32 and pair in PAIRED, (programs, pair)
        self.programs, self.layer, self.pair = programs, layer, pair
        self.meta = {}  # op -> [(n0, bn, offset)] per program
        for op, (n, k, split, ck, njmax) in OPS.items():
            owners = programs if split == 1 else programs // CLUSTER
            if layer and op in PAIRED[pair]:  # units (RoPE partners / gate and up) stay in one program
                widths = [2 * pair * g for g in deal(n // (2 * pair), owners)]
                allowed = {8 * nj for nj in PAIRED[pair][op]}
            else:
                widths = [8 * g for g in deal(n // 8, owners)]
                allowed = {8 * njmax, 8 * njmax - 8}
            assert set(widths) <= allowed and max(widths) * ck * 2 <= SLOT, (op, set(widths))
            assert split == 1 or max(widths) <= BN_SPLIT_MAX
            starts = [sum(widths[:i]) for i in range(owners)]
            rows = []
            for p in range(programs):
                o = p if split == 1 else p // CLUSTER
                rank = 0 if split == 1 else p % CLUSTER
                # the block of (owner o, rank) follows every earlier owner's columns x full K and this owner's
                # earlier ranks (widths[o] x K / split each)
                rows.append((starts[o], widths[o], starts[o] * k + rank * widths[o] * (k // split)))
            self.meta[op] = rows
        # a unit publishes once on every counter its columns touch (the 4 ranks of a split unit each publish their
        # rows); the quarter r of the next op's K range is complete when all of them have
        self.wait = [[0] * 32 for _ in range(4)]
        for p_next, (prev, nxt) in enumerate([("down", "qkv"), ("qkv", "o"), ("o", "gu"), ("gu", "down")]):
            rng = RANGE[prev]
            assert rng * 4 * OPS[nxt][2] == OPS[nxt][1] and OPS[prev][0] // rng <= 32, (prev, nxt)
            for p in range(self.programs):
                n0, bn, _ = self.meta[prev][p]
                for r in self.published_ranges(prev, n0, bn):
                    self.wait[p_next][r] += 1
        self.meta_tensor = None

    def published_ranges(self, op: str, n0: int, bn: int) -> list[int]:
        """The counters a unit of `op` with weight columns [n0, n0 + bn) adds to (the kernel's publish)."""
        rng = RANGE[op]
        if self.layer and op == "qkv":  # unit (head, g) writes head*256 + PAIR g.. and + 128: ranges 2 head, 2 head + 1;
            uc = 2 * self.pair  # 31: every unit (o's wait)
            heads = sorted({u // (256 // uc) for u in range(n0 // uc, (n0 + bn) // uc)})
            return [q for h in heads for q in (2 * h, 2 * h + 1)] + [31]
        if self.layer and op == "gu":  # h columns
            n0, bn = n0 // 2, bn // 2
        return list(range(n0 // rng, (n0 + bn - 1) // rng + 1))

    def paired_columns(self, op: str) -> torch.Tensor:
        """LAYER: weight column order -> original column, in units of 2 x PAIR: qkv (head, g) = [head*256 + PAIR g..,
        head*256 + 128 + PAIR g..]; gate|up p = [gate PAIR p.., up PAIR p..] (up = column 4096 + PAIR p..)."""
        w = self.pair
        if op == "qkv":
            u = torch.arange(2560 // (2 * w)).view(-1, 1, 1)
            return ((u // (128 // w)) * 256 + torch.tensor([0, 128]).view(1, 2, 1) + w * (u % (128 // w))
                    + torch.arange(w).view(1, 1, w)).reshape(-1)
        u = torch.arange(4096 // w).view(-1, 1, 1)
        return (torch.tensor([0, 4096]).view(1, 2, 1) + w * u + torch.arange(w).view(1, 1, w)).reshape(-1)

    def prepare(self, wt: torch.Tensor, op: str) -> torch.Tensor:
        """W^T [L, N, K] -> [L, N * K]: per program, its columns' K range (rank) as KC / CK chunks of [bn][CK]
        contiguous, the 16-byte groups of each row XOR-swizzled by row (the 128-byte swizzle wgmma reads).
        LAYER: qkv / gate|up columns first put in pair order (`paired_columns`)."""
        n, k, split, ck, _ = OPS[op]
        L = wt.shape[0]
        assert wt.shape[1:] == (n, k), (wt.shape, op)
        if self.layer and op in PAIRED[self.pair]:
            wt = wt[:, self.paired_columns(op).to(wt.device)]
        kc = k // split
        out = torch.empty(L, n * k, dtype=wt.dtype, device=wt.device)
        done = set()
        for p in range(self.programs):
            n0, bn, off = self.meta[op][p]
            rank = 0 if split == 1 else p % CLUSTER
            if (n0, rank) in done:
                continue
            done.add((n0, rank))
            blk = wt[:, n0:n0 + bn, rank * kc:(rank + 1) * kc].reshape(L, bn, kc // ck, ck // 8, 8).permute(0, 2, 1, 3, 4)
            rows = torch.arange(bn, device=wt.device).view(bn, 1)
            src = (torch.arange(ck // 8, device=wt.device).view(1, -1) ^ (rows % 8))  # physical group g holds g ^ (row & 7)
            idx = src.view(1, 1, bn, ck // 8, 1).expand(*blk.shape)
            out[:, off:off + bn * kc] = torch.gather(blk, 3, idx).reshape(L, bn * kc)
        return out

    def meta_on(self, device) -> torch.Tensor:
        if self.meta_tensor is None or self.meta_tensor.device != torch.device(device):
            m = [[(n0, bn, off, 0) for (n0, bn, off) in self.meta[op]] for op in NAMES]
            self.meta_tensor = torch.tensor(m, dtype=torch.int32, device=device).contiguous()
        return self.meta_tensor


@functools.lru_cache(maxsize=None)
def _kernel_and_programs(ahead: int = AHEAD, a_pipe: int = A_PIPE, pub: int = PUB, wgd: int = WGD,
                         loader: int = LOADER, layer: int = 0, attn: int = 0, mcast: int = MCAST, gelu: int = GELU,
                         pf: int = PF, rcp: int = RCP, pair: int = PAIR, spack: int = SPACK, ns: int = NS,
                         tail: int = TAIL, state: int = 0, ts: int = 1, roll: int = ROLL, exp: int = EXP):
    func = compile_cuda(source(ahead, a_pipe, pub, wgd, loader, layer, attn, mcast, gelu, pf, rcp, pair, spack, ns, tail,
                               state, ts, roll, exp),
                        "mega_chain_kernel", smem_bytes(ns),
                        arch_suffix="a")
    cfg = _LaunchConfig(128, 1, 1, THREADS, 1, 1, smem_bytes(ns), None, None, 0)
    n = ctypes.c_int()
    err = _libcuda().cuOccupancyMaxActiveClusters(ctypes.byref(n), func, ctypes.byref(cfg))
    if err != 0 or n.value < 16:
        raise RuntimeError(f"mega_chain needs >= 16 resident clusters of {CLUSTER}; this GPU holds {n.value} "
                           f"(CUresult {err})")
    return func, CLUSTER * min(n.value, 32)


def attention_available(device) -> bool:
    """Whether this GPU runs the LAYER + ATTN 2 kernel: sm_90a (wgmma) and >= 25 resident clusters of 4."""
    try:
        dev = torch.device(device)
        if dev.type != "cuda" or torch.cuda.get_device_capability(dev) != (9, 0):
            return False
        return _kernel_and_programs(AHEAD, A_PIPE, PUB, WGD, LOADER, 1, 2, MCAST, GELU, PF, RCP, ts=0)[1] >= 100
    except Exception:  # no NVRTC / driver entry points: the engine keeps its per-kernel path
        return False


def plan_for_this_gpu(layer: bool = False, pair: int = PAIR) -> MegaPlan:
    # every variant has the same shared memory and threads, hence the same resident clusters: ask the one that will run
    # (LAYER: the engine's LAYER + ATTN 2 kernel), so no other variant is compiled just to count them
    return MegaPlan(_kernel_and_programs(AHEAD, A_PIPE, PUB, WGD, LOADER, 1, ATTN_MODE, MCAST, GELU, PF, RCP, ts=0)[1]
                    if layer else _kernel_and_programs(ts=0)[1], layer, pair)


def mega_chain(plan: MegaPlan, prepared: dict, acts: dict, counters: torch.Tensor, layers: int,
               timestamps: torch.Tensor | None = None, ahead: int = AHEAD, a_pipe: int = A_PIPE, pub: int = PUB,
               wgd: int = WGD, loader: int = LOADER, layer_state: dict | None = None, pdl: bool = False,
               zero_counters: bool = True, mcast: int = MCAST, gelu: int = GELU, pf: int = PF, rcp: int = RCP,
               spack: int = SPACK, ns: int = NS, tail: int = TAIL, ts_code: int | None = None, roll: int = ROLL,
               exp: int = EXP):
    """Run `layers` layers of the chain on acts = {x, q, x2, h8}: [50, 1024 / 2560 / 1024 / 8192] bf16 in the blocked
    layout (`to_blocked` / `from_blocked`); counters: >= layers * 128 int32 (zeroed here, inside the stream).
    layer_state (a plan made with layer=True): the real layer's epilogues; acts x / x2 are then the bf16 copies of
    the residual after down / o, h8 is h [50, 4096], and layer_state holds xs (fp32 [50, 1024] residual),
    ss ([2, clusters, 50] sums of squares; ss[0] of the input must be set), pos (int32 [50]), cos, sin
    ([positions, 128] fp32), eps. With state=True (ATTN 2 only) the rows are 51, the last one the state token
    (flow step 0: kernel STATE; xs [51, 1024], ss [2, clusters, 51], pos [51]): T is then the prefix alone, the
    state token's key goes to T and the actions' to T + 1..T + 50, as the later steps' fixed keys expect.
    ts_code: compile the %globaltimer stamps in (default: only when `timestamps` is given)."""
    layer = layer_state is not None
    attn = int(layer_state.get("attn_mode", ATTN_MODE)) if layer and "kc" in layer_state else 0
    state = int(bool(layer and layer_state.get("state", False)))
    assert layer == plan.layer and attn in (0, 1, 2, 3) and (not state or attn in (2, 3))
    rows = R + state
    # the stamps' code only in the kernels that stamp (ts_code forces it either way: the probe's A/B of its cost)
    ts_code = int(timestamps is not None) if ts_code is None else int(ts_code)
    assert ts_code or timestamps is None, "timestamps need the kernel with the stamps' code"
    func, programs = _kernel_and_programs(ahead, a_pipe, pub, wgd, loader, int(layer), attn, mcast, gelu, pf, rcp,
                                          plan.pair if layer else PAIR, spack, ns, tail, state, ts_code, roll, exp)
    rs = ss_stride(rows)
    assert programs // CLUSTER * rs * 4 <= SS_BYTES, "the clusters' sums of squares do not fit in SS_BYTES"
    assert plan.programs == programs, (plan.programs, programs)
    for name, cols in dict(x=1024, q=2560, x2=1024, h8=4096 if layer else 8192).items():
        t = acts[name]
        assert t.shape == (blocked_size(cols),) and t.dtype == torch.bfloat16, (name, t.shape)
    assert counters.numel() >= layers * 128
    if zero_counters:  # else the caller has (stage_step_input does, inside the previous kernel)
        counters.zero_()
    args = _Args()
    for i, op in enumerate(NAMES):
        args.w[i] = prepared[op].data_ptr()
    for i, name in enumerate(("x", "q", "x2", "h8")):
        args.act[i] = acts[name].data_ptr()
    args.meta = plan.meta_on(counters.device).data_ptr()
    args.ctr = counters.data_ptr()
    args.ts = timestamps.data_ptr() if timestamps is not None else counters.data_ptr()
    args.L, args.use_ts, args.programs = layers, int(timestamps is not None), programs
    if layer:
        st = layer_state
        assert st["xs"].shape == (rows, 1024) and st["xs"].dtype == torch.float32 and st["xs"].is_contiguous()
        assert st["ss"].shape == (2, programs // CLUSTER, rs) and st["ss"].dtype == torch.float32
        assert st["pos"].shape[0] >= rows
        assert st["pos"].dtype == torch.int32 and st["cos"].shape[1] == 128 and st["sin"].shape == st["cos"].shape
        args.xs, args.ss, args.pos = st["xs"].data_ptr(), st["ss"].data_ptr(), st["pos"].data_ptr()
        args.cos_t, args.sin_t, args.eps = st["cos"].data_ptr(), st["sin"].data_ptr(), float(st["eps"])
        if attn:  # att [blocked 50 x 2048], kc / vc [TK, 256] (rows >= T written by the kernel), key_valid
            # [TK + 16] (the prefix's padding mask, 1 for the suffix keys, 0 past TK)
            T = int(st["T"])
            # ATTN 2 / 3: kv_layout's layouts with the rows of kv_rows (a sub-block of 16 keys is one bulk copy), one
            # cache for every layer [rows, 256] or one per layer [layers, rows, 256]
            krows = kv_rows(T, rows, attn)
            assert attn == 1 or T + rows <= 1024, "ATTN 2 / 3: at most 16 sub-blocks of 16 keys per key quarter"
            kc = st["kc"]
            assert kc.shape == st["vc"].shape and kc.shape[-2:] == (krows, 256) and st["key_valid"].shape == (T + rows + 16,)
            assert kc.dim() == 2 or (attn >= 2 and kc.dim() == 3 and kc.shape[0] >= layers and kc.is_contiguous())
            args.kv_layer = krows * 256 if kc.dim() == 3 else 0
            assert st["att"].shape == (blocked_size(2048),) and programs >= (4 * attention_tiles(rows) if attn == 2 else 32)
            args.att, args.kc, args.vc = st["att"].data_ptr(), st["kc"].data_ptr(), st["vc"].data_ptr()
            args.key_valid, args.T, args.TK = st["key_valid"].data_ptr(), T, T + rows
    for p in range(4):
        for r in range(32):
            args.wait[p][r] = plan.wait[p][r] * (4 if pub == 2 else 1)  # PUB 2: every warp publishes
    if attn:  # o's quarter of head h waits on counter 20 + h for every attention unit that writes rows of h
        for h, n in enumerate(attention_arrivals(attn, rows)):
            args.wait[1][20 + h] = n
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(args), ctypes.c_void_p))
    attrs = (_LaunchAttr * 1)()  # pdl: programmatic stream serialization (see the kernel's griddepcontrol.wait)
    attrs[0].id = _ATTR_PROGRAMMATIC_STREAM_SERIALIZATION
    attrs[0].value.flag = 1
    cfg = _LaunchConfig(programs, 1, 1, THREADS, 1, 1, smem_bytes(ns), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                        attrs, 1 if pdl else 0)
    err = _libcuda().cuLaunchKernelEx(ctypes.byref(cfg), func, params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx(mega_chain) failed: CUresult {err}")


def kv_swizzle_groups(keys: int, device) -> torch.Tensor:
    """[keys, 32]: the 16-byte group of key k that position p of its row holds in kv_swizzle's layout (p ^ (k % 8))."""
    return torch.arange(32, device=device).view(1, 32) ^ (torch.arange(keys, device=device).view(keys, 1) % 8)


def kv_swizzle(kv: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """ATTN 2's K / V cache layout: [..., keys, 256] with the 16-byte groups of each 128-byte half XOR-swizzled by key
    (group g of key k at g ^ (k % 8) within its half), so a bulk copy of 16 key rows lands in shared memory ready for
    conflict-free ldmatrix. Its own inverse. groups: kv_swizzle_groups(keys) made beforehand (one gather, no index
    arithmetic in a CUDA graph)."""
    keys = kv.shape[-2]
    g = kv_swizzle_groups(keys, kv.device) if groups is None else groups
    v = kv.reshape(*kv.shape[:-1], 32, 8)
    idx = g.view(*([1] * (v.dim() - 3)), keys, 32, 1).expand(v.shape)
    return torch.gather(v, -2, idx).reshape(kv.shape)


def kv_rows(T: int, rows: int, attn: int) -> int:
    """Rows of a layer's K / V cache for T fixed keys and `rows` suffix keys: ATTN 2 16 zero rows past them (a 16-key
    sub-block is one bulk copy), ATTN 3 that rounded up to whole 16-key sub-blocks (kv_blocked's unit)."""
    return T + rows + 16 if attn == 2 else (T + rows + 31) // 16 * 16 if attn == 3 else T + rows


def _kv_blocked_index(keys: int, device) -> torch.Tensor:
    """[keys, 256]: the flat position (within the cache) of element (key, d) in kv_blocked's layout."""
    k = torch.arange(keys, device=device).view(keys, 1)
    d = torch.arange(256, device=device).view(1, 256)
    return (k // 16) * 4096 + (d // 64) * 1024 + (k % 16) * 64 + ((((d % 64) // 8) ^ (k % 8)) * 8) + d % 8


def kv_blocked(kv: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """ATTN 3's K / V cache layout: [..., keys, 256] (keys a multiple of 16) stored as [keys / 16][4 dim blocks of 64]
    [16 keys][64] with the 16-byte groups of each 128-byte row XOR-swizzled by key % 8: each 16-key sub-block is one
    8 KB bulk copy, and each of its dim blocks a wgmma operand in the 128-byte swizzle (K-major for S = Q K^T,
    N-major for O = P V). The same shape, the elements permuted; inverse=True undoes it."""
    keys = kv.shape[-2]
    assert keys % 16 == 0 and kv.shape[-1] == 256, kv.shape
    idx = _kv_blocked_index(keys, kv.device).reshape(-1)
    flat = kv.reshape(*kv.shape[:-2], keys * 256)
    out = torch.empty_like(flat)
    if inverse:
        out.copy_(flat[..., idx])
    else:
        out[..., idx] = flat
    return out.reshape(kv.shape)


def kv_layout(kv: torch.Tensor, attn: int) -> torch.Tensor:
    """Row-major K / V rows in the cache layout the attention link reads (ATTN 2 kv_swizzle, ATTN 3 kv_blocked)."""
    return kv_swizzle(kv) if attn == 2 else kv_blocked(kv) if attn == 3 else kv


def kv_unlayout(kv: torch.Tensor, attn: int) -> torch.Tensor:
    return kv_swizzle(kv) if attn == 2 else kv_blocked(kv, inverse=True) if attn == 3 else kv


def attention_tiles(rows: int = R) -> int:
    """ATTN 2's tiles of 16 packed (head, row) query rows (the kernel's ATILES): 25 for 50 rows, 26 for 51."""
    return (8 * rows + 15) // 16


def attention_arrivals(attn: int, rows: int = R) -> list[int]:
    """Per head, how many attention units publish rows of it: ATTN 1, the 4 key quarters of the head's cluster;
    ATTN 2, the (tile, rank) row slices of the packed rows (row i = head * rows + r, rank c of tile t owns rows
    16 t + 4 c .. + 3), one arrival per head a slice touches (rows past 8 x rows, the last tile's padding, none)."""
    if attn in (1, 3):  # ATTN 3: head h's 4 ranks, each owner of 16 of its rows
        return [4] * 8
    n = [0] * 8
    for t in range(attention_tiles(rows)):
        for c in range(4):
            for h in {(16 * t + 4 * c) // rows, (16 * t + 4 * c + 3) // rows}:
                if h < 8:
                    n[h] += 1
    return n


@triton.jit
def _stage_step_input_kernel(xs_ptr, xb_ptr, ss_ptr, ctr_ptr, CLUSTERS, NCTR, ROWS, D: tl.constexpr,
                             A_BLOCK_ELEMS: tl.constexpr, CL: tl.constexpr, PDL: tl.constexpr):
    """One row of the residual: its bf16 copy into the blocked, swizzled layout (`to_blocked`), its sum of squares into
    cluster 0 of the norm sums (parity 0, read by the first qkv) and zeros into the other clusters; and a 64-slot slice
    of the chain's arrival counters zeroed."""
    if PDL:  # launched early: the residual is the previous kernel's output
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)
    k = row * 64 + tl.arange(0, 64)
    tl.store(ctr_ptr + k, tl.zeros((64,), dtype=tl.int32), mask=k < NCTR)
    col = tl.arange(0, D)
    x = tl.load(xs_ptr + row * D + col)
    dst = (col // 64) * A_BLOCK_ELEMS + row * 64 + ((((col % 64) // 8) ^ (row % 8)) * 8) + col % 8
    tl.store(xb_ptr + dst, x.to(xb_ptr.dtype.element_ty))
    c = tl.arange(0, CL)
    tl.store(ss_ptr + c * ROWS + row, tl.where(c == 0, tl.sum(x * x, 0), 0.0), mask=c < CLUSTERS)


def stage_step_input(xs: torch.Tensor, x_blocked: torch.Tensor, ss: torch.Tensor, counters: torch.Tensor,
                     pdl: bool = False):
    """The engine's residual after the time MLP (xs [50, 1024] fp32) -> LAYER mode's inputs: acts["x"] (bf16,
    blocked) and ss[0] (the first qkv's row norms: the whole sum in cluster 0); the chain's counters (<= 50 * 64)
    zeroed, so mega_chain(..., zero_counters=False) needs no memset. One launch (pdl: programmatic dependent launch)."""
    rows = xs.shape[0]  # 50, or 51 (flow step 0: the state token last, mega_chain's state)
    assert rows in (R, R + 1) and xs.shape[1] == 1024 and xs.is_contiguous() and x_blocked.shape == (blocked_size(1024),)
    assert counters.numel() <= rows * 64 and counters.dtype == torch.int32 and ss.shape[2] == ss_stride(rows)
    pdl = bool(pdl) and HAS_PDL and xs.is_cuda
    clusters = ss.shape[1]
    _stage_step_input_kernel[(rows,)](xs, x_blocked, ss, counters, clusters, counters.numel(), ss.shape[2], D=1024,
                                   A_BLOCK_ELEMS=A_BLOCK // 2, CL=triton.next_power_of_2(clusters), PDL=pdl,
                                   num_warps=4, **pdl_kwargs(pdl))


@triton.jit
def _stage_fixed_keys_kernel(ks_ptr, vs_ptr, kd_ptr, vd_ptr, valid_src_ptr, valid_dst_ptr, T, NV, src_layer, dst_layer,
                             BT: tl.constexpr, HD: tl.constexpr, BLOCKED: tl.constexpr = False):
    """Keys k0..k0+BT of layer l, K and V: the row-major rows into kv_swizzle's layout (the 16-byte group g of key k
    at g ^ (k % 8)), or with BLOCKED kv_blocked's; the first layer's programs also copy the validity of the first NV
    keys."""
    kb, l = tl.program_id(0), tl.program_id(1)
    k = kb * BT + tl.arange(0, BT)
    p = tl.arange(0, HD)
    if BLOCKED:
        src = l * src_layer + k[:, None] * HD + p[None, :]
        dst = (l * dst_layer + (k // 16)[:, None] * (16 * HD) + (p // 64)[None, :] * 1024 + (k % 16)[:, None] * 64
               + ((((p % 64) // 8)[None, :] ^ (k % 8)[:, None]) * 8) + (p % 8)[None, :])
    else:
        src = l * src_layer + k[:, None] * HD + ((((p // 8)[None, :] ^ (k % 8)[:, None]) * 8) + (p % 8)[None, :])
        dst = l * dst_layer + k[:, None] * HD + p[None, :]
    m = (k < T)[:, None]
    tl.store(kd_ptr + dst, tl.load(ks_ptr + src, mask=m), mask=m)
    tl.store(vd_ptr + dst, tl.load(vs_ptr + src, mask=m), mask=m)
    if l == 0:
        tl.store(valid_dst_ptr + k, tl.load(valid_src_ptr + k, mask=k < NV), mask=k < NV)


def stage_fixed_keys(kc: torch.Tensor, vc: torch.Tensor, key_valid: torch.Tensor, kc_dst: torch.Tensor,
                     vc_dst: torch.Tensor, key_valid_dst: torch.Tensor, T: int, valid: int | None = None, attn: int = 2):
    """The fixed keys 0..T-1 of every layer's row-major cache kc / vc [L, >= T, HD] into the attention link's caches
    kc_dst / vc_dst [L, >= T, HD] (ATTN 2 `kv_swizzle`, ATTN 3 `kv_blocked`: HD 256, rows a multiple of 16), and
    key_valid[:valid] (default T - 1: the prefix's mask when the keys end with the state token, whose validity is
    fixed) into key_valid_dst: one launch (was a torch gather + copy per cache)."""
    assert attn in (2, 3) and (attn == 2 or (kc_dst.shape[-1] == 256 and kc_dst.shape[1] % 16 == 0))
    valid = T - 1 if valid is None else valid
    L, HD = kc.shape[0], kc.shape[-1]
    assert kc.shape == vc.shape and kc_dst.shape == vc_dst.shape and kc_dst.shape[0] == L and kc_dst.shape[-1] == HD
    assert kc.shape[1] >= T and kc_dst.shape[1] >= T and HD % 64 == 0 and kc.dtype == kc_dst.dtype
    assert all(t.is_contiguous() for t in (kc, vc, kc_dst, vc_dst)) and key_valid_dst.dtype == key_valid.dtype
    BT = 16
    assert 0 <= valid <= T
    _stage_fixed_keys_kernel[(triton.cdiv(T, BT), L)](kc, vc, kc_dst, vc_dst, key_valid, key_valid_dst, T, valid,
                                                      kc.stride(0), kc_dst.stride(0), BT=BT, HD=HD, BLOCKED=attn == 3,
                                                      num_warps=4)


def blocked_size(cols: int) -> int:
    """bf16 elements of a [50, cols] activation in the kernel's global layout."""
    return cols // 64 * A_BLOCK // 2


def _blocked_index(cols: int, device, rows: int = R) -> torch.Tensor:
    row = torch.arange(rows, device=device).view(rows, 1)
    col = torch.arange(cols, device=device).view(1, cols)
    return (col // 64) * (A_BLOCK // 2) + row * 64 + ((((col % 64) // 8) ^ (row % 8)) * 8) + col % 8


def to_blocked(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[50 (or 51), cols] -> the kernel's blocked, swizzled global layout (the rows past them zero)."""
    rows, cols = t.shape
    assert rows <= 56
    out = torch.zeros(blocked_size(cols), dtype=t.dtype, device=t.device) if out is None else out
    out.view(-1)[_blocked_index(cols, t.device, rows).view(-1)] = t.reshape(-1)
    return out


def from_blocked(buf: torch.Tensor, cols: int, rows: int = R) -> torch.Tensor:
    return buf.view(-1)[_blocked_index(cols, buf.device, rows)]


def mega_layer_reference(xs: torch.Tensor, weights: dict, layers: int, pos, cos, sin, eps, kv_prefix=None,
                         state: bool = False) -> dict:
    """The real layer without attention (o reads the RoPE'd q, as the kernel's LAYER mode), in float32 with the
    engine's bf16 points (kernels/skinny_matmul.py): RMSNorm as a row scale after the matmul of bf16(x), RoPE
    (split halves) on q and k, h = gelu_tanh(g) * u, fp32 residual adds. weights: W^T [L, N, K] in the original
    column order. kv_prefix = (kc, vc, key_valid) of the T prefix keys: o reads attention over the prefix + the
    layer's 50 suffix keys instead (ATTN); kc / vc [T, 256] for every layer or [layers, T, 256] one per layer.
    state: xs has 51 rows, the last the state token (mega_chain's state): its key comes first among the suffix keys
    and it attends to the prefix and itself only."""
    bf = torch.bfloat16
    x = xs.float().clone()
    R = x.shape[0]
    assert R == 50 + int(state)
    order = torch.cat([torch.tensor([R - 1]), torch.arange(R - 1)]) if state else torch.arange(R)  # suffix key order
    c, s = cos[pos.long()], sin[pos.long()]
    for i in range(layers):
        rs = torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)
        qkv = (x.to(bf).float() @ weights["qkv"][i].float().t()) * rs
        heads = qkv.view(R, 10, 2, 128)
        a, b = heads[:, :9, 0], heads[:, :9, 1]
        rot = torch.stack([a * c[:, None] - b * s[:, None], b * c[:, None] + a * s[:, None]], 2)
        qkv = torch.cat([rot, heads[:, 9:]], 1).reshape(R, 2560).to(bf)
        o_in = qkv[:, :2048]
        if kv_prefix is not None:
            kp, vp, valid = kv_prefix
            if kp.dim() == 3:
                kp, vp = kp[i], vp[i]
            k = torch.cat([kp.float(), qkv[order, 2048:2304].float()])
            v = torch.cat([vp.float(), qkv[order, 2304:].float()])
            logits = torch.einsum("rhd,kd->hrk", qkv[:, :2048].float().view(R, 8, 256), k)
            ok = torch.cat([valid.bool(), torch.ones(R, dtype=torch.bool, device=valid.device)])[None].repeat(R, 1)
            if state:  # the state token sees the prefix and its own key (the first suffix key)
                ok[R - 1, kp.shape[0] + 1:] = False
            p = torch.softmax(logits.masked_fill(~ok, float("-inf")), -1)
            o_in = torch.einsum("hrk,kd->rhd", p, v).reshape(R, 2048).to(bf)
        x = x + o_in.float() @ weights["o"][i].float().t()
        rs = torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)
        gu = (x.to(bf).float() @ weights["gu"][i].float().t()) * rs
        h = (torch.nn.functional.gelu(gu[:, :4096], approximate="tanh") * gu[:, 4096:]).to(bf)
        x = x + h.float() @ weights["down"][i].float().t()
    return dict(xs=x, q=qkv, h=h)


def mega_chain_reference(x: torch.Tensor, weights: dict, layers: int) -> dict:
    """The chain in float32 with every op's output rounded to bf16 (as the kernel stores it); weights: W^T [L, N, K]."""
    bf = torch.bfloat16
    x = x.to(bf)
    for i in range(layers):
        q = (x.float() @ weights["qkv"][i].float().t()).to(bf)
        x2 = (q[:, :2048].float() @ weights["o"][i].float().t()).to(bf)
        h8 = (x2.float() @ weights["gu"][i].float().t()).to(bf)
        x = (h8[:, :4096].float() @ weights["down"][i].float().t()).to(bf)
    return dict(x=x, q=q, x2=x2, h8=h8)
