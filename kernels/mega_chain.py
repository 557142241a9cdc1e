"""The action expert's four matmuls over all layers of a flow step in ONE persistent kernel (CUDA C++ via NVRTC,
Hopper; experimental).

Chain (the same one slab_probe/cluster_probe time kernel by kernel; plain bf16 outputs, no epilogues):
    q = x @ Wqkv^T (2560 cols) -> x2 = q[:, :2048] @ Wo^T -> h8 = x2 @ Wgu^T (8192) -> x = h8[:, :4096] @ Wd^T -> ...

Why: sessions 4-6 measured every dependent link of the kernel-per-op chain at ~5.5 us (wait + activations + MMA +
split-K tail), whatever generated the kernel, and the weight stream stops at every link. Here the weight stream never
stops: 128 resident programs (32 clusters of 4), each with a producer warp that walks the program's whole schedule
(every layer, every op) and keeps a ring of shared-memory slots full with 1-D bulk copies (cp.async.bulk, completion
on an mbarrier), independent of the data dependencies. The 4 consumer warps of a program wait only for the
activations of their unit: a per-(layer, op, column range) arrival counter in global memory, so a split-K unit of o /
down waits only for the producing op's tiles of its own K range. Split-K partials are reduced inside the cluster:
each rank pushes the rows another rank owns into that rank's shared memory with st.async, whose bytes complete
the owner's mbarrier;
the owner sums the 4 slots in fixed order (bitwise deterministic).

Work units: as many programs as clusters of 4 fit at once (30 on an H100 SXM: its GPCs hold 120 programs in
clusters of 4, not 132), rank = program % 4. Columns are dealt in groups of 8 as evenly as possible:
    qkv  N 2560 K 1024: every program its own 16-24 columns x full K
    o    N 1024 K 2048: every cluster its own 32-40 columns, its 4 ranks a K range of 512 each
    gu   N 8192 K 1024: every program its own 64-72 columns x full K
    down N 1024 K 4096: every cluster its own 32-40 columns, its 4 ranks a K range of 1024 each
A unit publishes on the counter of every K range of the next op its columns touch; the host counts how many
arrivals each range waits for. Weights are re-laid out once (`MegaPlan.prepare`) so every chunk a slot receives is one
contiguous block, already in the XOR-swizzled order ldmatrix reads without bank conflicts. All programs must be
resident at once (they spin on each other): the plan sizes itself with cuOccupancyMaxActiveClusters.

`mega_chain_reference` is the plain PyTorch math (bf16 rounding after every op, like the kernel's stores).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pi0_triton_policy.kernels.cluster_matmul import CUDA_HELPERS, _LaunchConfig, _libcuda, compile_cuda

R = 50  # activation rows (the action tokens)
CLUSTER, THREADS = 4, 160  # 4 consumer warps + 1 producer warp
NS, SLOT = 10, 10240  # weight ring: slots x bytes
A_BYTES = 51 * 1024 * 2  # activations [50 rows + a zero row][KC <= 1024] bf16 (also the warps' partial sums)
BN_SPLIT_MAX = 40  # widest column tile of a split op (o, down)
RECV_BYTES = 2 * 4 * 16 * BN_SPLIT_MAX * 4  # [parity][source rank][16 owned rows][BN] fp32
SMEM = A_BYTES + RECV_BYTES + NS * SLOT + 8 * (2 * NS + 2)
NAMES = ("qkv", "o", "gu", "down")
# op: (N, K, SPLIT, CK, NJMAX); CK = K columns per ring chunk, NJMAX = most n8 column groups a program gets (with 120
# programs); the widest chunk (gu: 72 x 64, o / down: 40 x 128) stays <= SLOT
OPS = dict(qkv=(2560, 1024, 1, 128, 3), o=(1024, 2048, 4, 128, 5), gu=(8192, 1024, 1, 64, 9), down=(1024, 4096, 4, 128, 5))
RANGE = dict(qkv=512, o=0, gu=1024, down=0)  # columns per arrival counter of the op's output (the next op's K range)

_SOURCE = r"""
#define R 50
#define NS @NS@
#define SLOT @SLOT@
#define A_BYTES @A_BYTES@
#define RECV_BYTES @RECV_BYTES@
#define BNS @BN_SPLIT_MAX@
#define NC 128                       /* consumer threads */
#define AHEAD @AHEAD@                  /* ops of L2 prefetch ahead of the ring (0: none) */
@HELPERS@
typedef unsigned short bf16;

/* per op: columns, K, K split (1, or the cluster's 4 ranks), K columns per ring chunk, most n8 column groups per
   program, activation and output row strides, and the column width of one arrival counter of its output (0: one
   counter for the whole op) */
template <int P> struct Op;
template <> struct Op<0> { enum { N = 2560, K = 1024, SPLIT = 1, CK = 128, NJMAX = 3, LDA = 1024, LDO = 2560, RANGE = 512 }; };
template <> struct Op<1> { enum { N = 1024, K = 2048, SPLIT = 4, CK = 128, NJMAX = 5, LDA = 2560, LDO = 1024, RANGE = 0 }; };
template <> struct Op<2> { enum { N = 8192, K = 1024, SPLIT = 1, CK = 64,  NJMAX = 9, LDA = 1024, LDO = 8192, RANGE = 1024 }; };
template <> struct Op<3> { enum { N = 1024, K = 4096, SPLIT = 4, CK = 128, NJMAX = 5, LDA = 8192, LDO = 1024, RANGE = 0 }; };

struct Args {
    const bf16* w[4];      /* prepared weights per op: [L][N * K], program p's block at meta.z: [KC / CK][bn][CK] */
    bf16* act[4];          /* x, q, x2, h8: op P reads act[P] and writes act[(P + 1) % 4] */
    const int4* meta;      /* [4 ops][programs]: first column, columns, weight block offset (elements), - */
    unsigned* ctr;         /* [L][4 ops][8 ranges] arrival counters, zero before the launch */
    unsigned long long* ts;/* [programs][L][4][8] stamps (use_ts) */
    int L, use_ts, programs, pad;
    unsigned wait[4][8];   /* op P's unit of K range r waits until the producing op's counter r reaches wait[P][r] */
};

__device__ __forceinline__ void bar_consumers() { asm volatile("bar.sync 1, 128;" ::: "memory"); }
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ bool mbar_try(unsigned bar, unsigned parity) {
    unsigned ok;
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    return ok;
}
__device__ __forceinline__ bool mbar_try_cluster(unsigned bar, unsigned parity) {
    unsigned ok;
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    return ok;
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ unsigned mapa(unsigned addr, unsigned rank) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* producer: one lane walks the program's whole schedule and keeps the ring full */
template <int P> __device__ __forceinline__ void produce(const Args& g, int l, int prog, unsigned ring, unsigned bars, int& ci) {
    typedef Op<P> O;
    const int4 m = g.meta[P * g.programs + prog];
    constexpr int NCH = O::K / O::SPLIT / O::CK;
    const unsigned bytes = m.y * O::CK * 2;
    const bf16* blk = g.w[P] + (size_t)l * O::N * O::K + m.z;
    for (int j = 0; j < NCH; ++j, ++ci) {
        const int slot = ci % NS, use = ci / NS;
        const unsigned full = bars + 8 * slot, empty = bars + 8 * (NS + slot);
        if (use > 0) while (!mbar_try(empty, (use - 1) & 1)) {}
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(full), "r"(bytes) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(ring + slot * SLOT), "l"(blk + (size_t)j * m.y * O::CK), "r"(bytes), "r"(full) : "memory");
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

template <int P> __device__ __forceinline__ void consume(const Args& g, int l, int prog, unsigned char* smem,
                                                         int& ci, int& su) {
    typedef Op<P> O;
    constexpr int KC = O::K / O::SPLIT, NCH = KC / O::CK, NJ = O::NJMAX, CPR = KC / 8;
    constexpr int BNR = O::SPLIT == 1 ? NJ * 8 : BNS;   /* row stride of the partial sums */
    const int4 m = g.meta[P * g.programs + prog];
    const int n0 = m.x, bn = m.y, nj = bn / 8;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int rank = O::SPLIT == 1 ? 0 : (prog & 3), k0 = rank * KC;
    unsigned long long* ts = g.ts + ((size_t)(prog * g.L + l) * 4 + P) * 8;
    const unsigned a_u32 = smem_u32(smem), recv_u32 = smem_u32(smem + A_BYTES);
    const unsigned ring = smem_u32(smem + A_BYTES + RECV_BYTES), bars = ring + NS * SLOT;
    float* red = (float*)smem;
    float* recv = (float*)(smem + A_BYTES);

    /* 1. the producing op's arrivals for this unit's K range */
    if (tid == 0) {
        if (P != 0 || l > 0) {
            const int r = O::SPLIT == 1 ? 0 : rank;
            const unsigned* c = g.ctr + ((P == 0 ? l - 1 : l) * 4 + (P + 3) % 4) * 8 + r;
            while (ld_acquire(c) < g.wait[P][r]) {}
        }
        if (g.use_ts) ts[0] = globaltimer();
    }
    bar_consumers();

    /* 2. activations [50][KC] (+ a zero row for the MMA's padding rows), swizzled in 16-byte chunks */
    const bf16* a = g.act[P];
    for (int i = tid; i < 51 * CPR; i += NC) {
        const int r = i / CPR, c = i % CPR, ok = r < R;
        cp_async16(a_u32 + 2 * (r * KC + ((c ^ (r & 7)) * 8)), a + (size_t)(ok ? r : 0) * O::LDA + k0 + c * 8, ok ? 16 : 0);
    }
    asm volatile("cp.async.commit_group;\n\tcp.async.wait_all;" ::: "memory");
    bar_consumers();
    if (tid == 0 && g.use_ts) ts[1] = globaltimer();

    /* 3. warp w takes chunks w, w + 4, ... (a K range each); rows >= 50 read the zero row */
    float acc[4][NJ][4];
    #pragma unroll
    for (int mt = 0; mt < 4; ++mt)
        #pragma unroll
        for (int j = 0; j < NJ; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;
    const unsigned a_base = pinned_u32(a_u32);
    const bool stamp = g.use_ts && tid == 0;
    unsigned long long waited = 0;
    for (int ch = warp; ch < NCH; ch += 4) {
        const int slot = (ci + ch) % NS, use = (ci + ch) / NS;
        const unsigned long long w0 = stamp ? globaltimer() : 0;
        while (!mbar_try(bars + 8 * slot, use & 1)) {}
        if (stamp) waited += globaltimer() - w0;
        const unsigned w_base = pinned_u32(ring + slot * SLOT);
        #pragma unroll
        for (int ks = 0; ks < O::CK / 16; ++ks) {
            unsigned af[4][4];
            #pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                int r = mt * 16 + (lane & 15);
                r = r < R ? r : R;
                const int c = ch * (O::CK / 8) + ks * 2 + (lane >> 4);
                asm("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                    : "=r"(af[mt][0]), "=r"(af[mt][1]), "=r"(af[mt][2]), "=r"(af[mt][3])
                    : "r"(a_base + 2 * (r * KC + ((c ^ (r & 7)) * 8))));
            }
            #pragma unroll
            for (int j = 0; j < NJ; ++j) {
                if (j < nj) {
                    unsigned b0, b1;
                    const int r = j * 8 + (lane & 7), c = ks * 2 + ((lane >> 3) & 1);
                    asm("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                        : "=r"(b0), "=r"(b1) : "r"(w_base + 2 * (r * O::CK + ((c ^ (r & 7)) * 8))));
                    #pragma unroll
                    for (int mt = 0; mt < 4; ++mt)
                        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                            : "+f"(acc[mt][j][0]), "+f"(acc[mt][j][1]), "+f"(acc[mt][j][2]), "+f"(acc[mt][j][3])
                            : "r"(af[mt][0]), "r"(af[mt][1]), "r"(af[mt][2]), "r"(af[mt][3]), "r"(b0), "r"(b1));
                }
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(bars + 8 * (NS + slot));  /* the slot may be refilled */
    }
    ci += NCH;
    if (stamp) { ts[4] = waited; ts[5] = globaltimer(); }  /* warp 0: time spent waiting for its chunks, its MMAs done */

    /* 4. the warps' K partials -> shared memory (over the activations) -> summed in fixed order */
    bar_consumers();
    const int gq = lane >> 2, q4 = lane & 3;
    #pragma unroll
    for (int mt = 0; mt < 4; ++mt)
        #pragma unroll
        for (int j = 0; j < NJ; ++j)
            if (j < nj)
                #pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = mt * 16 + gq + 8 * h, col = j * 8 + 2 * q4;
                    *(float2*)(red + (warp * 64 + row) * BNR + col) = make_float2(acc[mt][j][2 * h], acc[mt][j][2 * h + 1]);
                }
    bar_consumers();
    if (tid == 0 && g.use_ts) ts[2] = globaltimer();
    bf16* out = g.act[(P + 1) % 4];
    if (O::SPLIT == 1) {
        for (int i = tid * 4; i < R * BNR; i += NC * 4) {
            const int row = i / BNR, col = i % BNR;
            if (col >= bn) continue;
            float4 s = *(float4*)(red + i);
            #pragma unroll
            for (int w = 1; w < 4; ++w) {
                const float4 v = *(float4*)(red + w * 64 * BNR + i);
                s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
            }
            const unsigned lo = to_bf16(s.x) | ((unsigned)to_bf16(s.y) << 16), hi = to_bf16(s.z) | ((unsigned)to_bf16(s.w) << 16);
            *(uint2*)(out + (size_t)row * O::LDO + n0 + col) = make_uint2(lo, hi);
        }
    } else {
        /* push: row belongs to rank row / 16, which keeps one slot per source rank (two parities: a rank can be one
           unit ahead of the owner, never two, because every unit needs every rank's push). Remote rows go by
           st.async, which counts its bytes on the owner's mbarrier: the phase completes when all partials are in. */
        const int buf = su & 1;
        const unsigned parity = (su >> 1) & 1;
        ++su;
        const unsigned rbar = bars + 8 * (2 * NS + buf);
        if (tid == 0) {
            const int mine = (R - rank * 16) < 16 ? (R - rank * 16) : 16;
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(rbar), "r"(3 * mine * bn * 4) : "memory");
        }
        for (int i = tid * 4; i < R * BNR; i += NC * 4) {
            const int row = i / BNR, col = i % BNR, owner = row >> 4;
            if (col >= bn) continue;
            float4 s = *(float4*)(red + i);
            #pragma unroll
            for (int w = 1; w < 4; ++w) {
                const float4 v = *(float4*)(red + w * 64 * BNR + i);
                s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
            }
            const int slot_off = ((buf * 4 + rank) * 16 + (row & 15)) * BNR + col;
            if (owner == rank) *(float4*)(recv + slot_off) = s;
            else asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1,%2,%3,%4}, [%5];"
                              :: "r"(mapa(recv_u32 + 4 * slot_off, owner)), "f"(s.x), "f"(s.y), "f"(s.z), "f"(s.w),
                                 "r"(mapa(rbar, owner)) : "memory");
        }
        bar_consumers();  /* this rank's own partial is in shared memory */
        while (!mbar_try_cluster(rbar, parity)) {}
        for (int i = tid * 4; i < 16 * BNR; i += NC * 4) {
            const int rr = i / BNR, col = i % BNR, row = rank * 16 + rr;
            if (row >= R || col >= bn) continue;
            float4 s = *(float4*)(recv + (buf * 4 * 16) * BNR + i);
            #pragma unroll
            for (int src = 1; src < 4; ++src) {  /* fixed order: deterministic */
                const float4 v = *(float4*)(recv + ((buf * 4 + src) * 16) * BNR + i);
                s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
            }
            const unsigned lo = to_bf16(s.x) | ((unsigned)to_bf16(s.y) << 16), hi = to_bf16(s.z) | ((unsigned)to_bf16(s.w) << 16);
            *(uint2*)(out + (size_t)row * O::LDO + n0 + col) = make_uint2(lo, hi);
        }
    }
    /* 5. publish: every consumer's stores, then one release add on each counter the unit's columns touch */
    bar_consumers();
    if (tid == 0) {
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
        const int r0 = O::RANGE ? n0 / O::RANGE : 0, r1 = O::RANGE ? (n0 + bn - 1) / O::RANGE : 0;
        for (int r = r0; r <= r1; ++r)
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(g.ctr + (l * 4 + P) * 8 + r) : "memory");
        if (g.use_ts) ts[3] = globaltimer();
    }
}

extern "C" __global__ void __cluster_dims__(4, 1, 1) __launch_bounds__(160, 1) mega_chain_kernel(const Args g)
{
    extern __shared__ __align__(1024) unsigned char smem[];
    const int tid = threadIdx.x, prog = blockIdx.x;
    const unsigned ring = smem_u32(smem + A_BYTES + RECV_BYTES), bars = ring + NS * SLOT;
    if (tid == 0) {
        for (int s = 0; s < NS; ++s) { mbar_init(bars + 8 * s, 1); mbar_init(bars + 8 * (NS + s), 1); }
        mbar_init(bars + 8 * (2 * NS), 1);      /* the owner's expect_tx; the partials' bytes complete it */
        mbar_init(bars + 8 * (2 * NS + 1), 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    cluster_sync();  /* every rank's mbarriers exist before anyone arrives on them */
    if (tid >= NC) {
        if (tid == NC) {
            int ci = 0;
            for (int t = 0; t < AHEAD; ++t) prefetch_op(g, t, prog);
            for (int l = 0; l < g.L; ++l) {
                if (AHEAD) prefetch_op(g, l * 4 + 0 + AHEAD, prog);
                produce<0>(g, l, prog, ring, bars, ci);
                if (AHEAD) prefetch_op(g, l * 4 + 1 + AHEAD, prog);
                produce<1>(g, l, prog, ring, bars, ci);
                if (AHEAD) prefetch_op(g, l * 4 + 2 + AHEAD, prog);
                produce<2>(g, l, prog, ring, bars, ci);
                if (AHEAD) prefetch_op(g, l * 4 + 3 + AHEAD, prog);
                produce<3>(g, l, prog, ring, bars, ci);
            }
        }
        __syncwarp();
    } else {
        int ci = 0, su = 0;
        for (int l = 0; l < g.L; ++l) {
            consume<0>(g, l, prog, smem, ci, su);
            consume<1>(g, l, prog, smem, ci, su);
            consume<2>(g, l, prog, smem, ci, su);
            consume<3>(g, l, prog, smem, ci, su);
        }
    }
    cluster_sync();  /* no rank leaves while another may still write its shared memory */
}
"""


AHEAD = 2  # default L2 prefetch distance in ops


def source(ahead: int = AHEAD) -> str:
    text = _SOURCE
    consts = dict(AHEAD=ahead, NS=NS, SLOT=SLOT, A_BYTES=A_BYTES, RECV_BYTES=RECV_BYTES, BN_SPLIT_MAX=BN_SPLIT_MAX,
                  HELPERS=CUDA_HELPERS % {})
    for k, v in consts.items():
        text = text.replace(f"@{k}@", str(v))
    return text


class _Args(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p * 4), ("act", ctypes.c_void_p * 4), ("meta", ctypes.c_void_p),
                ("ctr", ctypes.c_void_p), ("ts", ctypes.c_void_p), ("L", ctypes.c_int), ("use_ts", ctypes.c_int),
                ("programs", ctypes.c_int), ("pad", ctypes.c_int), ("wait", (ctypes.c_uint * 8) * 4)]


def deal(groups: int, parts: int) -> list[int]:
    """groups of 8 columns dealt to parts as evenly as possible (the first ones get one more)."""
    base, extra = divmod(groups, parts)
    return [base + (i < extra) for i in range(parts)]


class MegaPlan:
    """Who computes which columns: per op and program (first column, columns, weight block offset), and how many
    arrivals every unit waits for. `programs` = 4 x the clusters of 4 that can be resident at once."""

    def __init__(self, programs: int):
        assert programs % CLUSTER == 0 and programs <= 4 * 32, programs
        self.programs = programs
        self.meta = {}  # op -> [(n0, bn, offset)] per program
        for op, (n, k, split, ck, njmax) in OPS.items():
            owners = programs if split == 1 else programs // CLUSTER
            widths = [8 * g for g in deal(n // 8, owners)]
            assert max(widths) <= 8 * njmax and max(widths) * ck * 2 <= SLOT, (op, max(widths))
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
        # waits: qkv / gu wait for every unit of down / o; o / down rank r for the qkv / gu units touching range r
        self.wait = [[0] * 8 for _ in range(4)]
        for p_next, (prev, nxt) in enumerate([("down", "qkv"), ("qkv", "o"), ("o", "gu"), ("gu", "down")]):
            rng = RANGE[prev]
            for p in range(self.programs):
                n0, bn, _ = self.meta[prev][p]
                for r in ({0} if not rng else set(range(n0 // rng, (n0 + bn - 1) // rng + 1))):
                    if r < 8:
                        self.wait[p_next][r] += 1
        self.meta_tensor = None

    def prepare(self, wt: torch.Tensor, op: str) -> torch.Tensor:
        """W^T [L, N, K] -> [L, N * K]: per program, its columns' K range (rank) as KC / CK chunks of [bn][CK]
        contiguous, the 16-byte groups of each row XOR-swizzled by row (the order ldmatrix reads)."""
        n, k, split, ck, _ = OPS[op]
        L = wt.shape[0]
        assert wt.shape[1:] == (n, k), (wt.shape, op)
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
def _kernel_and_programs(ahead: int = AHEAD):
    func = compile_cuda(source(ahead), "mega_chain_kernel", SMEM)
    cfg = _LaunchConfig(128, 1, 1, THREADS, 1, 1, SMEM, None, None, 0)
    n = ctypes.c_int()
    err = _libcuda().cuOccupancyMaxActiveClusters(ctypes.byref(n), func, ctypes.byref(cfg))
    if err != 0 or n.value < 16:
        raise RuntimeError(f"mega_chain needs >= 16 resident clusters of {CLUSTER}; this GPU holds {n.value} "
                           f"(CUresult {err})")
    return func, CLUSTER * min(n.value, 32)


def plan_for_this_gpu() -> MegaPlan:
    return MegaPlan(_kernel_and_programs()[1])


def mega_chain(plan: MegaPlan, prepared: dict, acts: dict, counters: torch.Tensor, layers: int,
               timestamps: torch.Tensor | None = None, ahead: int = AHEAD):
    """Run `layers` layers of the chain on acts = {x, q, x2, h8} (bf16, 50 rows, row strides 1024 / 2560 / 1024 /
    8192); counters: >= layers * 32 int32 (zeroed here, inside the stream)."""
    func, programs = _kernel_and_programs(ahead)
    assert plan.programs == programs, (plan.programs, programs)
    for name, cols in dict(x=1024, q=2560, x2=1024, h8=8192).items():
        t = acts[name]
        assert t.shape == (R, cols) and t.is_contiguous() and t.dtype == torch.bfloat16, (name, t.shape)
    assert counters.numel() >= layers * 32
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
    for p in range(4):
        for r in range(8):
            args.wait[p][r] = plan.wait[p][r]
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(args), ctypes.c_void_p))
    cfg = _LaunchConfig(programs, 1, 1, THREADS, 1, 1, SMEM, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                        None, 0)
    err = _libcuda().cuLaunchKernelEx(ctypes.byref(cfg), func, params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx(mega_chain) failed: CUresult {err}")


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
