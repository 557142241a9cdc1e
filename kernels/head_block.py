"""The attention half of an action-expert layer-step with one thread block cluster per head (CUDA C++ via NVRTC,
sm_90a): a probe of a layer-step design (benchmarks/NOTES.md session 15), not used by the engine.

Why: the persistent kernel (kernels/mega_chain.py) runs a layer-step as five links that each go through global
memory (qkv -> attention -> o -> gate|up -> down), ~4-7 us apiece; qkv, attention and o take ~18.5 of its ~29 us.
Attention, though, is per head, and o is a sum over heads of attn_h @ Wo_h. So a cluster of 8 programs per head can
run q = x Wq_h, attention over all keys and o_h = attn_h Wo_h with only cluster-local exchanges (DSMEM), and the one
global step left is summing the 8 heads' partials (which the residual-add owners do while reading them). The shared
K / V head's suffix rows (k, v = x Wkv: 512 columns) come from 8 more clusters in the same launch through one
global counter, which the head clusters wait for only before their suffix keys (the prefix ones are in shared
memory before x arrives).

One launch = one layer: grid 16 clusters x 8 programs (all resident at once: the head clusters spin on the counter
the kv clusters publish), 160 threads (a consumer warpgroup + a loader warp).
  head cluster h, rank r: q columns 32r..32r+31 of head h over the full K (x: 112 KB, Wq slice 64 KB), the q slices
      all-gathered into every rank's Q tile (DSMEM stores); rank r's keys are the 16-key sub-blocks r, r + 8, ... of
      the K / V cache (kv_blocked layout: one 8 KB bulk copy each), S = Q K^T and O = P V on wgmma with the whole
      share at once (no online softmax: <= NSB sub-blocks); the 8 partial (m, l, O) reduce-scattered by head dims
      (rank s owns dims 32s..), merged in fixed order, the normalised bf16 rows all-gathered into the A tile of
      o_h, and rank r writes o_h's columns 128r..128r+127 (fp32, K = 256) to out[h].
  kv cluster c, rank r (program i = 8c + r): columns 8i..8i+7 of [Wk | Wv] -> the suffix keys' rows of the caches
      (bf16, kv_blocked), then one release add on the layer's counter.
  then the kv programs own the residual's columns: x += the 8 heads' o in fixed order, and the rows' sums of squares
      over their columns (the next RMSNorm's), after one counter the head programs add to.
Not here (the probe measures the exchange pattern): RMSNorm row scale and RoPE (elementwise in the epilogues), the
state row of flow step 0, more than 3 sub-blocks per rank (2-3 cameras: chunks with an online softmax).

Measured (benchmarks/NOTES.md session 15): x landed -> residual updated in 13.75 us at 1 camera against the persistent
kernel's ~15.25 for the same span; the cluster exchanges run at ~15-20 GB/s per receiving SM (H100's SM-to-SM
network), a third of what an SM takes in from L2, and through L2 instead (XCHG 4) each costs as much again (~2 us of
synchronisation and round trips), so they cost about what the global links they replace did. Kept as a tested probe,
not used by the engine.

Reference: `head_block_ref`. Timed and stamped in benchmarks/head_block_probe.py.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pi0_triton_policy.kernels.cluster_matmul import _LaunchConfig, _libcuda, compile_cuda, launch_raw, wgmma_n_source
from pi0_triton_policy.kernels.mega_chain import A_BLOCK, R, kv_blocked
from pi0_triton_policy.kernels.wgmma_geglu import device_helpers

HEADS, CS, HEAD_DIM, WIDTH = 8, 8, 256, 1024
THREADS = 160

_SOURCE = r"""
#define R @R@
#define NSB @NSB@                     /* key sub-blocks per rank, at most */
#define KVW @KVW@                     /* k | v columns per kv program */
#define KV_PROGRAMS (512 / KVW)
#define XCHG @XCHG@                   /* cluster exchanges: 0 stores into the other ranks' shared memory + cluster
                                         barriers, 1 staged locally + one bulk copy per destination (mbarriers),
                                         2 written locally, a cluster barrier, 16-byte loads from the others,
                                         3 as 1 with the partials normalised to bf16, 4 through global memory
                                         (written to L2, a cluster barrier, one bulk copy per exchange) */
#define A_BLOCK @A_BLOCK@             /* 56 rows x 128 B: one 64-column block of an activation (mega_chain's layout) */
#define X_BYTES (16 * A_BLOCK)        /* x [56 rows][1024] */
#define WQ_OFF X_BYTES                /* Wq slice [16 k blocks][32 rows][128 B]; later Wo slice [4][128 rows][128 B] */
#define KV_OFF (WQ_OFF + 65536)       /* [NSB][K, V][4 dim blocks][16 keys][128 B] */
#define KV_SLOTS (NSB > 3 ? NSB : 3)  /* >= 3: the region also stages XCHG 1's partials */
#define BAR_OFF (KV_OFF + KV_SLOTS * 16384)
#define Q_OFF 0                       /* after every rank's q MMA (barrier A), in x's region: Q [8 slices][64 rows][64 B]
                                         (32 dims each, the 64-byte swizzle), later the o tile attn_h the same way */
#define SLICE 4096
#define PBF (XCHG == 3 || XCHG == 4)  /* XCHG 3 / 4: the partials normalised to bf16 (half the bytes) */
#define ROWB (PBF ? 64 : 128)         /* bytes per row of a partial */
#define PART (R * ROWB + R * 8)       /* one source's partial for 32 dims: O [R][32] (fp32, or O / l bf16), (m, l) [R] */
#define RECV_OFF (8 * SLICE)          /* [8 sources][PART] */
#define STAGE_OFF KV_OFF              /* XCHG 1: my partials for the 7 other ranks, staged (the keys are done) */
/* XCHG 4: the exchanges through global memory, per head: Q slices [8][SLICE], o tile slices [8][SLICE], partials
   [8 destinations][8 sources][PART]; each rank reads its 8 pieces of an exchange with one bulk copy */
#define GX_Q 0
#define GX_ATT (8 * SLICE)
#define GX_PART (16 * SLICE)
#define GX_HEAD (GX_PART + 64 * PART)
#define SMEM_BYTES (BAR_OFF + 64)
#if RECV_OFF + 8 * PART > X_BYTES || 7 * PART > KV_SLOTS * 16384 || PART % 16
#error "the exchange buffers must fit in x's region, the staged partials in the keys' region"
#endif
@DEVICE@
@WGMMA@

/* a K-major bf16 operand in the 64-byte swizzle: rows of 32 elements (64 B), 8-row atoms 512 B apart */
__device__ __forceinline__ unsigned long long sw64_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(512 >> 4) << 32) | (2ull << 62);
}
/* byte offset of (row, col) in a [rows][32] bf16 slice of 64-byte rows, 16-byte groups XOR-swizzled by (row / 2) % 4 */
__device__ __forceinline__ unsigned sw64_off(int row, int col) {
    return row * 64 + ((((col >> 3) ^ (row >> 1)) & 3) << 4) + (col & 7) * 2;
}
/* shared::cta -> another rank's shared memory, completing on its mbarrier (both cluster addresses) */
__device__ __forceinline__ void bulk_push(unsigned dst, unsigned src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "r"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_consumers() { asm volatile("bar.sync 1, 128;" ::: "memory"); }
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ unsigned mapa(unsigned addr, unsigned rank) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
__device__ __forceinline__ void st_cluster_u32(unsigned addr, unsigned v) {
    asm volatile("st.shared::cluster.u32 [%0], %1;" :: "r"(addr), "r"(v) : "memory");
}
/* XCHG 0: into another rank's shared memory; otherwise my own (st.shared: not through the cluster path) */
__device__ __forceinline__ void st_x_u32(unsigned addr, unsigned v) {
    if (XCHG == 0) asm volatile("st.shared::cluster.u32 [%0], %1;" :: "r"(addr), "r"(v) : "memory");
    else asm volatile("st.shared.u32 [%0], %1;" :: "r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_x_f2(unsigned addr, float a, float b) {
    if (XCHG == 0) asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};" :: "r"(addr), "f"(a), "f"(b) : "memory");
    else asm volatile("st.shared.v2.f32 [%0], {%1, %2};" :: "r"(addr), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void st_cluster_v4(unsigned addr, uint4 v) {
    asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};" :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
__device__ __forceinline__ float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
/* element index of (key, d) in a kv_blocked cache */
__device__ __forceinline__ size_t kv_index(int key, int d) {
    return (size_t)(key >> 4) * 4096 + (d >> 6) * 1024 + (key & 15) * 64 + (((((d & 63) >> 3) ^ key) & 7) << 3) + (d & 7);
}

__device__ __forceinline__ uint4 ld_cluster_v4(unsigned addr) {
    uint4 v;
    asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ float2 ld_cluster_f2(unsigned addr) {
    float2 v;
    asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ void st_shared_v4(unsigned addr, uint4 v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
/* XCHG 2: the 7 other ranks' slices (4 KB at the same offset of their tiles) into mine, 14 16-byte loads per thread
   in flight at once; the caller has passed a cluster barrier after every rank wrote its slice */
__device__ __forceinline__ void pull_slices(unsigned tile, unsigned rank, int tid) {
    uint4 v[14];
    #pragma unroll
    for (int k = 0; k < 14; ++k) {
        const unsigned src = (rank + 1 + (k >> 1)) & 7, off = src * SLICE + (tid + 128 * (k & 1)) * 16;
        v[k] = ld_cluster_v4(mapa(tile + off, src));
    }
    #pragma unroll
    for (int k = 0; k < 14; ++k) {
        const unsigned src = (rank + 1 + (k >> 1)) & 7, off = src * SLICE + (tid + 128 * (k & 1)) * 16;
        st_shared_v4(tile + off, v[k]);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  /* generic stores -> the wgmma reads */
    bar_consumers();
}
/* XCHG 4, after the cluster barrier: `bytes` of the head's exchange buffer (written by the 8 ranks) into my shared
   memory at dst, every consumer thread waiting for them */
__device__ __forceinline__ void bulk_all(unsigned dst, const unsigned char* src, unsigned bytes, unsigned bar, int tid) {
    if (tid == 0) {
        asm volatile("fence.proxy.async.global;" ::: "memory");  /* generic stores of other SMs -> bulk reads */
        expect_tx(bar, bytes);
        bulk_copy(dst, src, bytes, bar);
    }
    while (!mbar_try(bar, 0)) {}
}
/* a merged row's 16 dims, scaled by inv, as bf16 in two 16-byte pieces */
__device__ __forceinline__ void pack_row16(const float* acc, float inv, uint4 (&packed)[2]) {
    unsigned u[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) u[i] = to_bf16(acc[2 * i] * inv) | ((unsigned)to_bf16(acc[2 * i + 1] * inv) << 16);
    packed[0] = make_uint4(u[0], u[1], u[2], u[3]);
    packed[1] = make_uint4(u[4], u[5], u[6], u[7]);
}
/* my slice (`rank`) of a tile of 8 slices is written (XCHG 0: into every rank already; 4: into `gx`, the head's 8
   slices in global memory): complete every rank's copy of the tile. XCHG 0: a cluster barrier; 1 / 3: one bulk copy
   of my slice to each other rank, then wait for theirs on `bar`; 2: a cluster barrier, then pull the others' slices;
   4: a cluster barrier, then one bulk copy of all 8 slices from global memory */
__device__ __forceinline__ void gather_slices(unsigned tile, unsigned bar, unsigned rank, int tid, const unsigned char* gx) {
    asm volatile("fence.proxy.async;" ::: "memory");  /* my generic stores -> bulk copies / wgmma (async proxy) */
    if (XCHG == 0 || XCHG == 2 || XCHG == 4) {
        cluster_arrive(); cluster_wait();
        if (XCHG == 0) asm volatile("fence.proxy.async;" ::: "memory");
        else if (XCHG == 2) pull_slices(tile, rank, tid);
        else bulk_all(tile, gx, 8 * SLICE, bar, tid);
    } else {
        bar_consumers();
        const unsigned mine = tile + rank * SLICE;
        if (tid == 0)
            for (int d = 1; d < 8; ++d) {
                const unsigned dst = (rank + d) & 7;
                bulk_push(mapa(mine, dst), mine, SLICE, mapa(bar, dst));
            }
        while (!mbar_try(bar, 0)) {}
    }
}

struct Args {
    const bf16* x;           /* [16 blocks][56 rows][64] (mega_chain.to_blocked) */
    const bf16* wq;          /* [8 heads][8 ranks][16 k blocks][32 rows][64], swizzled (pack_rows) */
    const bf16* wkv;         /* [64 programs][16 k blocks][8 rows][64] */
    const bf16* wo;          /* [8 heads][8 ranks][4 k blocks][128 rows][64] */
    bf16* kc; bf16* vc;      /* this layer's caches, kv_blocked [keys][256] */
    const int* key_valid;    /* [keys]: 0 = masked */
    float* out;              /* [8 heads][R][1024] partial o */
    float* xres;             /* [R][1024] fp32 residual: += the 8 heads' o (by the kv programs, after the heads) */
    float* ss;               /* [kv programs][R]: sums of squares of the new residual over each program's columns */
    unsigned* counter;       /* this layer's 3: kv published, head partials stored, residual updated */
    unsigned char* xbuf;     /* XCHG 4: [8 heads][GX_HEAD] bytes of exchange buffers */
    unsigned long long* ts;  /* [128 programs][8] %globaltimer stamps, or null */
    int T;                   /* fixed keys (prefix + state); the suffix rows' keys are T + row */
    int nsb;                 /* 16-key sub-blocks of the cache: ceil((T + R) / 16) */
};

extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(160, 1)
head_block_kernel(const __grid_constant__ Args g)
{
    extern __shared__ __align__(1024) unsigned char smem[];
    const unsigned base = smem_u32(smem), bars = base + BAR_OFF;  /* x, wq, kv prefix, kv suffix, wo */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    unsigned rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const int cluster = blockIdx.x >> 3, prog = blockIdx.x;
    const bool head = cluster < 8;
    unsigned long long* ts = g.ts ? g.ts + (size_t)prog * 8 : nullptr;
    if (base & 1023) asm volatile("trap;");
    if (tid == 0) {
        if (ts) ts[0] = globaltimer();
        for (int b = 0; b < 8; ++b) mbar_init(bars + 8 * b, 1);  /* x, w, fixed keys, suffix keys, wo, Q, parts, o tile */
        if (XCHG == 1 || XCHG == 3) {  /* what the 7 other ranks will push (they push after cluster barrier A: initialised by then) */
            expect_tx(bars + 40, 7 * SLICE);
            expect_tx(bars + 48, 7 * PART);
            expect_tx(bars + 56, 7 * SLICE);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int nfix = g.T >> 4;  /* sub-blocks of fixed keys only: in the cache before this launch */
    int mine = 0, mine_fixed = 0;  /* this rank's sub-blocks rank, rank + 8, ...: the fixed ones first */
    for (int j = 0; j < NSB; ++j) { const int sb = (int)rank + 8 * j; mine += sb < g.nsb; mine_fixed += sb < nfix; }

    if (warp == 4) {  /* the loader */
        if (lane == 0) {
            if (head) {
                expect_tx(bars + 8, 65536);
                bulk_copy(base + WQ_OFF, g.wq + (size_t)(cluster * 8 + rank) * 32768, 65536, bars + 8);
                if (mine_fixed) {
                    expect_tx(bars + 16, mine_fixed * 16384);
                    for (int j = 0; j < mine_fixed; ++j) {
                        const int sb = (int)rank + 8 * j;
                        bulk_copy(base + KV_OFF + j * 16384, g.kc + (size_t)sb * 4096, 8192, bars + 16);
                        bulk_copy(base + KV_OFF + j * 16384 + 8192, g.vc + (size_t)sb * 4096, 8192, bars + 16);
                    }
                }
            } else {
                expect_tx(bars + 8, KVW * 2048);
                bulk_copy(base + WQ_OFF, g.wkv + (size_t)(cluster - 8) * 8 * 1024 * KVW + rank * 1024 * KVW, KVW * 2048, bars + 8);
            }
            asm volatile("griddepcontrol.wait;" ::: "memory");  /* x is written by the kernel before this one */
            expect_tx(bars, X_BYTES);
            bulk_copy(base, g.x, X_BYTES, bars);
        }
        if (!head) return;
        __syncwarp();
        /* the loader takes part in cluster barriers A and B only (exited threads do not hold a cluster barrier up):
           A (every program has read x) is arrived at at once, B waits until the suffix keys are requested */
        cluster_arrive();
        if (lane == 0 && mine > mine_fixed) {  /* the suffix keys: once every kv program has published */
            while (true) {
                unsigned v;
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(g.counter) : "memory");
                if (v >= KV_PROGRAMS) break;
            }
            asm volatile("fence.proxy.async.global;" ::: "memory");  /* generic stores of other SMs -> bulk reads */
            expect_tx(bars + 24, (mine - mine_fixed) * 16384);
            for (int j = mine_fixed; j < mine; ++j) {
                const int sb = (int)rank + 8 * j;
                bulk_copy(base + KV_OFF + j * 16384, g.kc + (size_t)sb * 4096, 8192, bars + 24);
                bulk_copy(base + KV_OFF + j * 16384 + 8192, g.vc + (size_t)sb * 4096, 8192, bars + 24);
            }
        }
        __syncwarp();
        cluster_wait();
        if (XCHG == 0) { cluster_arrive(); cluster_wait(); }  /* B */
        return;
    }

    /* the consumer warpgroup: thread holds accumulator rows r0, r0 + 8 and columns 8j + 2 q4 (+1) of each n8 tile */
    const int gq = lane >> 2, q4 = lane & 3, r0 = 16 * warp + gq;
    while (!mbar_try(bars + 8, 0)) {}
    while (!mbar_try(bars, 0)) {}
    if (ts && tid == 0) ts[1] = globaltimer();

    if (!head) {  /* k | v columns KVW i .. KVW i + KVW - 1 of the suffix rows */
        float d[KVW / 2];
        #pragma unroll
        for (int i = 0; i < KVW / 2; ++i) d[i] = 0.f;
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        #pragma unroll
        for (int kb = 0; kb < 16; ++kb)
            #pragma unroll
            for (int s = 0; s < 4; ++s)
                wgmma_n<KVW>(d, sw128_desc(base + kb * A_BLOCK + 32 * s), sw128_desc(base + WQ_OFF + kb * 128 * KVW + 32 * s), 1);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        #pragma unroll
        for (int i = 0; i < KVW / 2; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
        if (ts && tid == 0) ts[2] = globaltimer();
        const int i = (cluster - 8) * 8 + rank;
        #pragma unroll
        for (int j = 0; j < KVW / 8; ++j) {
            const int col = KVW * i + 8 * j + 2 * q4;
            bf16* cache = col < 256 ? g.kc : g.vc;
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h;
                if (row < R)
                    *(unsigned*)(cache + kv_index(g.T + row, col & 255)) = to_bf16(d[4 * j + 2 * h]) | ((unsigned)to_bf16(d[4 * j + 2 * h + 1]) << 16);
            }
        }
        asm volatile("bar.sync 1, 128;" ::: "memory");
        if (tid == 0) {
            asm volatile("fence.proxy.async.global;" ::: "memory");
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" :: "l"(g.counter) : "memory");
            if (ts) ts[7] = globaltimer();
        }
        /* then the owner of residual columns NC i ..: x += the 8 heads' o (fixed order), and the rows' sums of squares
           over these columns for the next RMSNorm; one release add when done (what the next layer would wait for) */
        constexpr int NCOL = 1024 / KV_PROGRAMS, GRP = NCOL / 4;  /* columns, float4 groups per row (8 or 16) */
        if (tid == 0) {
            while (true) {
                unsigned v;
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(g.counter + 1) : "memory");
                if (v >= 64) break;
            }
            if (ts) ts[3] = globaltimer();
        }
        asm volatile("bar.sync 1, 128;" ::: "memory");
        for (int base_idx = 0; base_idx < R * GRP; base_idx += 128) {
            const int idx = base_idx + tid, row = idx / GRP, c = NCOL * i + 4 * (idx % GRP);
            float sq = 0.f;
            if (idx < R * GRP) {
                float4 acc = *(const float4*)(g.xres + (size_t)row * 1024 + c);
                float4 p[8];
                #pragma unroll
                for (int h = 0; h < 8; ++h) p[h] = __ldcg((const float4*)(g.out + ((size_t)h * R + row) * 1024 + c));
                #pragma unroll
                for (int h = 0; h < 8; ++h) { acc.x += p[h].x; acc.y += p[h].y; acc.z += p[h].z; acc.w += p[h].w; }
                *(float4*)(g.xres + (size_t)row * 1024 + c) = acc;
                sq = acc.x * acc.x + acc.y * acc.y + acc.z * acc.z + acc.w * acc.w;
            }
            #pragma unroll
            for (int k = 1; k < GRP; k <<= 1) sq += __shfl_xor_sync(0xffffffff, sq, k);
            if (idx < R * GRP && idx % GRP == 0) g.ss[(size_t)i * R + row] = sq;
        }
        asm volatile("bar.sync 1, 128;" ::: "memory");
        if (tid == 0) {
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" :: "l"(g.counter + 2) : "memory");
            if (ts) ts[4] = globaltimer();
        }
        return;
    }

    /* ---- head cluster: q columns 32 rank .. 32 rank + 31 of head `cluster` */
    unsigned char* const gx = g.xbuf + (size_t)cluster * GX_HEAD;  /* XCHG 4 */
    float qd[16];
    #pragma unroll
    for (int i = 0; i < 16; ++i) qd[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    #pragma unroll
    for (int kb = 0; kb < 16; ++kb)
        #pragma unroll
        for (int s = 0; s < 4; ++s)
            wgmma_n<32>(qd, sw128_desc(base + kb * A_BLOCK + 32 * s), sw128_desc(base + WQ_OFF + kb * 4096 + 32 * s), 1);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    #pragma unroll
    for (int i = 0; i < 16; ++i) asm volatile("" : "+f"(qd[i]) :: "memory");
    if (XCHG != 2 && XCHG != 4) cluster_arrive();  /* A: this program no longer reads x (others' stores land there) */
    if (ts && tid == 0) ts[2] = globaltimer();
    unsigned qp[8];
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
        qp[2 * j] = to_bf16(qd[4 * j]) | ((unsigned)to_bf16(qd[4 * j + 1]) << 16);
        qp[2 * j + 1] = to_bf16(qd[4 * j + 2]) | ((unsigned)to_bf16(qd[4 * j + 3]) << 16);
    }
    /* key validity of this thread's keys (sub-block j: keys 16 sb + 8 n + 2 q4 + {0, 1}) */
    unsigned vbits = 0;
    #pragma unroll
    for (int j = 0; j < NSB; ++j)
        #pragma unroll
        for (int n = 0; n < 2; ++n) {
            const int key = 16 * ((int)rank + 8 * j) + 8 * n + 2 * q4;
            if (j < mine) {
                const int2 v = __ldg((const int2*)(g.key_valid + key));
                vbits |= (unsigned)((v.x != 0) | ((v.y != 0) << 1)) << (4 * j + 2 * n);
            }
        }
    if (XCHG != 2 && XCHG != 4) cluster_wait();
    else bar_consumers();
    if (tid == 0) {  /* Wo's slice into Wq's region (every thread of this program is past its q MMA) */
        expect_tx(bars + 32, 65536);
        bulk_copy(base + WQ_OFF, g.wo + (size_t)(cluster * 8 + rank) * 32768, 65536, bars + 32);
    }
    /* all-gather: my q columns (slice `rank` of the Q tile, 64-byte swizzle) into every rank */
    {
        const unsigned mine_slice = base + Q_OFF + rank * SLICE;
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const unsigned at = mine_slice + sw64_off(r0 + 8 * h, 8 * j + 2 * q4);
                if (XCHG == 0) {
                    #pragma unroll
                    for (int dst = 0; dst < 8; ++dst) st_cluster_u32(mapa(at, dst), qp[2 * j + h]);
                } else if (XCHG == 4) {
                    *(unsigned*)(gx + GX_Q + rank * SLICE + sw64_off(r0 + 8 * h, 8 * j + 2 * q4)) = qp[2 * j + h];
                } else {
                    asm volatile("st.shared.u32 [%0], %1;" :: "r"(at), "r"(qp[2 * j + h]) : "memory");
                }
            }
        gather_slices(base + Q_OFF, bars + 40, rank, tid, gx + GX_Q);  /* (XCHG 0: barrier B) */
    }
    if (ts && tid == 0) ts[3] = globaltimer();

    /* ---- S = Q K^T for this rank's sub-blocks, all at once (fixed keys first, then the suffix's) */
    float s[NSB][8];  /* no zero fill: the first wgmma of a sub-block overwrites (a register write between the wgmma
                         would serialise them, ptxas C7515); the sub-blocks a rank does not have are masked below */
    if (mine_fixed) while (!mbar_try(bars + 16, 0)) {}
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    #pragma unroll
    for (int j = 0; j < NSB; ++j) {
        if (j < mine_fixed) {
            const unsigned kb = base + KV_OFF + j * 16384;
            #pragma unroll
            for (int i = 0; i < 16; ++i)
                wgmma_n<16>(s[j], sw64_desc(base + Q_OFF + (i >> 1) * SLICE + 32 * (i & 1)), sw128_desc(kb + (i >> 2) * 2048 + 32 * (i & 3)), i);
        }
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    if (mine > mine_fixed) {
        while (!mbar_try(bars + 24, 0)) {}
        #pragma unroll
        for (int j = 0; j < NSB; ++j) {
            if (j >= mine_fixed && j < mine) {
                const unsigned kb = base + KV_OFF + j * 16384;
                #pragma unroll
                for (int i = 0; i < 16; ++i)
                    wgmma_n<16>(s[j], sw64_desc(base + Q_OFF + (i >> 1) * SLICE + 32 * (i & 1)), sw128_desc(kb + (i >> 2) * 2048 + 32 * (i & 3)), i);
            }
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    #pragma unroll
    for (int j = 0; j < NSB; ++j)
        #pragma unroll
        for (int e = 0; e < 8; ++e) asm volatile("" : "+f"(s[j][e]) :: "memory");

    /* softmax over this rank's keys (base 2: Wq carries log2(e) / sqrt(256)); rows r0 (e < 2), r0 + 8 (e >= 2) */
    float m[2] = {-1e30f, -1e30f}, l[2] = {0.f, 0.f};
    #pragma unroll
    for (int j = 0; j < NSB; ++j)
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            const bool ok = j < mine && ((vbits >> (4 * j + 2 * (e >> 2) + (e & 1))) & 1);
            s[j][e] = ok ? s[j][e] : -1e30f;
            m[(e >> 1) & 1] = fmaxf(m[(e >> 1) & 1], s[j][e]);
        }
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffff, m[h], 1));
        m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffff, m[h], 2));
    }
    #pragma unroll
    for (int j = 0; j < NSB; ++j)
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float p = s[j][e] > -1e29f ? ex2(s[j][e] - m[(e >> 1) & 1]) : 0.f;
            s[j][e] = p;
            l[(e >> 1) & 1] += p;
        }
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
    }
    /* O = P V: sub-block j is one k16 step; P's A fragment from the S accumulators (n8 tile 0: keys 0-7, 1: 8-15) */
    float o[32][4];
    #pragma unroll
    for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    #pragma unroll
    for (int j = 0; j < NSB; ++j) {
        if (j < mine) {
            const unsigned p0 = to_bf16(s[j][0]) | ((unsigned)to_bf16(s[j][1]) << 16);
            const unsigned p1 = to_bf16(s[j][2]) | ((unsigned)to_bf16(s[j][3]) << 16);
            const unsigned p2 = to_bf16(s[j][4]) | ((unsigned)to_bf16(s[j][5]) << 16);
            const unsigned p3 = to_bf16(s[j][6]) | ((unsigned)to_bf16(s[j][7]) << 16);
            const unsigned vb = base + KV_OFF + j * 16384 + 8192;
            #pragma unroll
            for (int q = 0; q < 4; ++q) wgmma_pv64(&o[8 * q][0], p0, p1, p2, p3, sw128_desc_mn(vb + q * 2048));
        }
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    #pragma unroll
    for (int j = 0; j < 32; ++j)
        #pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(o[j][e]) :: "memory");
    if (ts && tid == 0) ts[4] = globaltimer();

#if XCHG == 2
    /* my partial, normalised (O / l, bf16) [R][256] and (m, l) [R], staged in the keys' region (PV is done); after a
       cluster barrier every rank pulls its 32 dims of every source's rows and merges them in fixed source order;
       thread: row tid / 2, dims 32 rank + 16 (tid % 2) .. +15 */
    {
        const float inv0 = l[0] > 0.f ? __fdividef(1.f, l[0]) : 0.f, inv1 = l[1] > 0.f ? __fdividef(1.f, l[1]) : 0.f;
        #pragma unroll
        for (int j = 0; j < 32; ++j)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h, dim = 64 * (j >> 3) + 8 * (j & 7) + 2 * q4;
                const float inv = h ? inv1 : inv0;
                if (row < R)
                    asm volatile("st.shared.u32 [%0], %1;" :: "r"(base + STAGE_OFF + row * 512 + dim * 2),
                                 "r"(to_bf16(o[j][2 * h] * inv) | ((unsigned)to_bf16(o[j][2 * h + 1] * inv) << 16)) : "memory");
            }
        if (q4 == 0) {
            if (r0 < R) *(float2*)(smem + STAGE_OFF + R * 512 + r0 * 8) = make_float2(m[0], l[0]);
            if (r0 + 8 < R) *(float2*)(smem + STAGE_OFF + R * 512 + (r0 + 8) * 8) = make_float2(m[1], l[1]);
        }
    }
    cluster_arrive(); cluster_wait();  /* every rank's partial is staged */
    if (ts && tid == 0) ts[5] = globaltimer();
    {
        const int row = tid >> 1, half = tid & 1;
        uint4 packed[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if (row < R) {
            uint4 pv[8][2];
            float2 ml[8];
            #pragma unroll
            for (int src = 0; src < 8; ++src) {
                const unsigned rb = base + STAGE_OFF + row * 512 + (32 * rank + 16 * half) * 2;
                pv[src][0] = ld_cluster_v4(mapa(rb, src));
                pv[src][1] = ld_cluster_v4(mapa(rb + 16, src));
                ml[src] = ld_cluster_f2(mapa(base + STAGE_OFF + R * 512 + row * 8, src));
            }
            float mm = -1e30f;
            #pragma unroll
            for (int src = 0; src < 8; ++src) if (ml[src].y > 0.f) mm = fmaxf(mm, ml[src].x);
            float acc[16], wsum = 0.f;
            #pragma unroll
            for (int i = 0; i < 16; ++i) acc[i] = 0.f;
            #pragma unroll
            for (int src = 0; src < 8; ++src) {
                const float w = ml[src].y > 0.f ? ex2(ml[src].x - mm) * ml[src].y : 0.f;
                wsum += w;
                const unsigned u[8] = {pv[src][0].x, pv[src][0].y, pv[src][0].z, pv[src][0].w,
                                       pv[src][1].x, pv[src][1].y, pv[src][1].z, pv[src][1].w};
                #pragma unroll
                for (int i = 0; i < 8; ++i) {
                    acc[2 * i] += w * __uint_as_float(u[i] << 16);
                    acc[2 * i + 1] += w * __uint_as_float(u[i] & 0xffff0000u);
                }
            }
            pack_row16(acc, wsum > 0.f ? __fdividef(1.f, wsum) : 0.f, packed);
        }
        const unsigned mine_slice = base + Q_OFF + rank * SLICE;
        #pragma unroll
        for (int c = 0; c < 2; ++c) st_shared_v4(mine_slice + sw64_off(row, 16 * half + 8 * c), packed[c]);
        gather_slices(base + Q_OFF, bars + 56, rank, tid, gx + GX_ATT);
    }
#else
    /* reduce-scatter: dims 32 d .. 32 d + 31 (o block d / 2, n8 tiles 4 (d % 2) ..) and (m, l) to rank d, into its
       slot `rank` of the partials; XCHG 1 stages the 7 others' in the keys' region (free: PV is done) */
    const float linv[2] = {l[0] > 0.f ? __fdividef(1.f, l[0]) : 0.f, l[1] > 0.f ? __fdividef(1.f, l[1]) : 0.f};  /* PBF */
    #pragma unroll
    for (int d = 0; d < 8; ++d) {
        const unsigned buf = d == (int)rank ? base + RECV_OFF + rank * PART
                                            : base + STAGE_OFF + ((d - (int)rank - 1) & 7) * PART;
        const unsigned rv = XCHG == 0 ? mapa(base + RECV_OFF + rank * PART, d) : buf;
        unsigned char* const gv = gx + GX_PART + (d * 8 + rank) * PART;  /* XCHG 4: my piece for rank d */
        #pragma unroll
        for (int t = 0; t < 4; ++t)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h;
                const float* v = o[8 * (d >> 1) + 4 * (d & 1) + t];
                if (row >= R) continue;
                if (PBF) {
                    const float inv = h ? linv[1] : linv[0];
                    const unsigned u = to_bf16(v[2 * h] * inv) | ((unsigned)to_bf16(v[2 * h + 1] * inv) << 16);
                    if (XCHG == 4) *(unsigned*)(gv + row * ROWB + (8 * t + 2 * q4) * 2) = u;
                    else st_x_u32(rv + row * ROWB + (8 * t + 2 * q4) * 2, u);
                } else {
                    st_x_f2(rv + row * ROWB + (8 * t + 2 * q4) * 4, v[2 * h], v[2 * h + 1]);
                }
            }
        if (q4 == 0) {
            if (XCHG == 4) {
                if (r0 < R) *(float2*)(gv + R * ROWB + r0 * 8) = make_float2(m[0], l[0]);
                if (r0 + 8 < R) *(float2*)(gv + R * ROWB + (r0 + 8) * 8) = make_float2(m[1], l[1]);
            } else {
                if (r0 < R) st_x_f2(rv + R * ROWB + r0 * 8, m[0], l[0]);
                if (r0 + 8 < R) st_x_f2(rv + R * ROWB + (r0 + 8) * 8, m[1], l[1]);
            }
        }
    }
    asm volatile("fence.proxy.async;" ::: "memory");
    if (XCHG == 0) {
        cluster_arrive(); cluster_wait();  /* C: every rank's partial of my dims is here */
    } else if (XCHG == 4) {
        cluster_arrive(); cluster_wait();
        bulk_all(base + RECV_OFF, gx + GX_PART + rank * 8 * PART, 8 * PART, bars + 48, tid);
    } else {
        bar_consumers();
        if (tid == 0)
            for (int d = 1; d < 8; ++d) {
                const unsigned dst = (rank + d) & 7;
                bulk_push(mapa(base + RECV_OFF + rank * PART, dst), base + STAGE_OFF + (d - 1) * PART, PART,
                          mapa(bars + 48, dst));
            }
        while (!mbar_try(bars + 48, 0)) {}
    }
    if (ts && tid == 0) ts[5] = globaltimer();

    /* merge my 32 dims in fixed source order; thread: row tid / 2, dims 16 (tid % 2) .. +15; the bf16 result is slice
       `rank` of every rank's o tile (in the Q tile's place: every S is done once my partials have arrived) */
    {
        const int row = tid >> 1, half = tid & 1;
        uint4 packed[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if (row < R) {
            float mm = -1e30f;
            #pragma unroll
            for (int src = 0; src < 8; ++src) {
                const float2 ml = *(const float2*)(smem + RECV_OFF + src * PART + R * ROWB + row * 8);
                if (ml.y > 0.f) mm = fmaxf(mm, ml.x);
            }
            float acc[16], wsum = 0.f;
            #pragma unroll
            for (int i = 0; i < 16; ++i) acc[i] = 0.f;
            #pragma unroll
            for (int src = 0; src < 8; ++src) {
                const float2 ml = *(const float2*)(smem + RECV_OFF + src * PART + R * ROWB + row * 8);
                const float e = ml.y > 0.f ? ex2(ml.x - mm) : 0.f;
                if (PBF) {  /* O / l: weight e l */
                    const float w = e * ml.y;
                    wsum += w;
                    const uint4* p = (const uint4*)(smem + RECV_OFF + src * PART + row * ROWB + half * 32);
                    #pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const uint4 v = p[i];
                        const unsigned u[4] = {v.x, v.y, v.z, v.w};
                        #pragma unroll
                        for (int k = 0; k < 4; ++k) {
                            acc[8 * i + 2 * k] += w * __uint_as_float(u[k] << 16);
                            acc[8 * i + 2 * k + 1] += w * __uint_as_float(u[k] & 0xffff0000u);
                        }
                    }
                } else {
                    wsum += e * ml.y;
                    const float4* p = (const float4*)(smem + RECV_OFF + src * PART + row * ROWB + half * 64);
                    #pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float4 v = p[i];
                        acc[4 * i] += e * v.x; acc[4 * i + 1] += e * v.y; acc[4 * i + 2] += e * v.z; acc[4 * i + 3] += e * v.w;
                    }
                }
            }
            pack_row16(acc, wsum > 0.f ? __fdividef(1.f, wsum) : 0.f, packed);
        }
        const unsigned mine_slice = base + Q_OFF + rank * SLICE;
        #pragma unroll
        for (int c = 0; c < 2; ++c) {
            const unsigned at = mine_slice + sw64_off(row, 16 * half + 8 * c);
            if (XCHG == 0) {
                #pragma unroll
                for (int dst = 0; dst < 8; ++dst) st_cluster_v4(mapa(at, dst), packed[c]);
            } else if (XCHG == 4) {
                *(uint4*)(gx + GX_ATT + rank * SLICE + sw64_off(row, 16 * half + 8 * c)) = packed[c];
            } else {
                st_shared_v4(at, packed[c]);
            }
        }
        gather_slices(base + Q_OFF, bars + 56, rank, tid, gx + GX_ATT);  /* (XCHG 0: barrier D) */
    }
#endif
    if (ts && tid == 0) ts[6] = globaltimer();

    /* ---- o_h columns 128 rank .. + 127 = attn_h [56 x 256] @ Wo[256 h .., 128 rank ..] */
    while (!mbar_try(bars + 32, 0)) {}
    float od[64];
    #pragma unroll
    for (int i = 0; i < 64; ++i) od[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    #pragma unroll
    for (int kb = 0; kb < 4; ++kb)
        #pragma unroll
        for (int s2 = 0; s2 < 4; ++s2)
            wgmma_n<128>(od, sw64_desc(base + Q_OFF + (2 * kb + (s2 >> 1)) * SLICE + 32 * (s2 & 1)), sw128_desc(base + WQ_OFF + kb * 16384 + 32 * s2), 1);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    #pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(od[i]) :: "memory");
    float* out = g.out + (size_t)cluster * R * 1024 + 128 * rank;
    #pragma unroll
    for (int j = 0; j < 16; ++j)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = r0 + 8 * h;
            if (row < R) *(float2*)(out + (size_t)row * 1024 + 8 * j + 2 * q4) = make_float2(od[4 * j + 2 * h], od[4 * j + 2 * h + 1]);
        }
    bar_consumers();
    if (tid == 0) {  /* the residual's owners (the kv programs) wait for all 64 */
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
        asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" :: "l"(g.counter + 1) : "memory");
        if (ts) ts[7] = globaltimer();
    }
    cluster_arrive(); cluster_wait();  /* E: no rank exits while another's bulk copies may still read its slices */
}
"""


def nsb_for(T: int) -> tuple[int, int]:
    """(16-key sub-blocks of a cache of T fixed keys + R suffix keys, the most any of the 8 ranks gets)."""
    n = -(-(T + R) // 16)
    return n, -(-n // CS)


def source(nsb: int, kvw: int, xchg: int = 1) -> str:
    text = _SOURCE
    for k, v in dict(R=R, NSB=nsb, KVW=kvw, XCHG=xchg, A_BLOCK=A_BLOCK, DEVICE=device_helpers(),
                     WGMMA=wgmma_n_source((kvw, 16, 32, 128))).items():
        text = text.replace(f"@{k}@", str(v))
    return text


def smem_bytes(nsb: int) -> int:
    return 16 * A_BLOCK + 65536 + max(nsb, 3) * 16384 + 64


@functools.lru_cache(maxsize=None)
def _kernel(nsb: int, kvw: int, xchg: int = 1):
    """(CUfunction, clusters of 8 that can be resident at once with this kernel's shared memory)."""
    if smem_bytes(nsb) > 232448:
        raise ValueError(f"{nsb} key sub-blocks per rank do not fit in shared memory: at most "
                         f"{(232448 - smem_bytes(0)) // 16384} (one camera's keys)")
    func = compile_cuda(source(nsb, kvw, xchg), "head_block_kernel", smem_bytes(nsb), arch_suffix="a")
    cfg = _LaunchConfig(grid(kvw), 1, 1, THREADS, 1, 1, smem_bytes(nsb), None, None, 0)
    n = ctypes.c_int()
    err = _libcuda().cuOccupancyMaxActiveClusters(ctypes.byref(n), func, ctypes.byref(cfg))
    if err != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveClusters failed: CUresult {err}")
    return func, n.value


def grid(kvw: int) -> int:
    """Programs: 8 head clusters of 8, then 512 / kvw kv programs (clusters of 8 too)."""
    assert kvw in (8, 16, 32, 64), kvw
    return HEADS * CS + 512 // kvw


def resident_clusters(T: int, kvw: int = 16) -> int:
    return _kernel(nsb_for(T)[1], kvw)[1]


def pack_rows(w: torch.Tensor) -> torch.Tensor:
    """w [rows, K] (K a multiple of 64) -> [K / 64 blocks][rows][64], each 128-byte row's 16-byte groups XOR-swizzled by
    row % 8: a K-major wgmma operand in the 128-byte swizzle, one bulk copy."""
    rows, K = w.shape
    blocks = w.reshape(rows, K // 64, 8, 8).permute(1, 0, 2, 3)  # [kb][row][group][8]
    r = torch.arange(rows, device=w.device).view(1, rows, 1)
    g = torch.arange(8, device=w.device).view(1, 1, 8)
    idx = (g ^ (r % 8)).expand(K // 64, rows, 8)
    out = torch.empty_like(blocks)
    out.scatter_(2, idx.unsqueeze(-1).expand(-1, -1, -1, 8), blocks)
    return out.contiguous()


def prepare(wq: torch.Tensor, wkv: torch.Tensor, wo: torch.Tensor, kvw: int = 16) -> dict:
    """Per layer: wq [1024, 2048] (the base-2 softmax scale log2(e) / 16 folded in by the caller), wkv [1024, 512], wo
    [2048, 1024] (all [K, N] bf16) -> every program's slice as one contiguous, swizzled block (one bulk copy)."""
    q = torch.stack([pack_rows(wq[:, 256 * h + 32 * r: 256 * h + 32 * r + 32].t().contiguous())
                     for h in range(HEADS) for r in range(CS)])
    kv = torch.stack([pack_rows(wkv[:, kvw * i: kvw * i + kvw].t().contiguous()) for i in range(512 // kvw)])
    o = torch.stack([pack_rows(wo[256 * h: 256 * h + 256, 128 * r: 128 * r + 128].t().contiguous())
                     for h in range(HEADS) for r in range(CS)])
    return {"wq": q.contiguous(), "wkv": kv.contiguous(), "wo": o.contiguous(), "kvw": kvw}


@functools.lru_cache(maxsize=None)
def _exchange_buffer(device) -> torch.Tensor:
    """XCHG 4's global exchange buffers, [8 heads][GX_HEAD] bytes (every launch overwrites before it reads)."""
    part = R * 64 + R * 8  # bf16 partials
    return torch.empty(HEADS * (16 * 4096 + 64 * part), dtype=torch.uint8, device=device)


class _Args(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("wq", ctypes.c_void_p), ("wkv", ctypes.c_void_p), ("wo", ctypes.c_void_p),
                ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p), ("key_valid", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("xres", ctypes.c_void_p), ("ss", ctypes.c_void_p), ("counter", ctypes.c_void_p), ("xbuf", ctypes.c_void_p), ("ts", ctypes.c_void_p), ("T", ctypes.c_int), ("nsb", ctypes.c_int)]


def head_block(x_blocked: torch.Tensor, prepared: dict, kc: torch.Tensor, vc: torch.Tensor, key_valid: torch.Tensor,
               T: int, out: torch.Tensor, xres: torch.Tensor, ss: torch.Tensor, counter: torch.Tensor,
               timestamps: torch.Tensor | None = None, pdl: bool = False, xchg: int = 3) -> torch.Tensor:
    """One layer's attention half: out [8, R, 1024] fp32, per head h: softmax2(q_h K^T) V @ Wo[256 h ..] with q = x Wq,
    the suffix rows' k, v = x Wkv written into the caches at keys T + row, then xres [R, 1024] fp32 += the 8 heads' o
    (fixed order) and ss [512 / kvw, R] = the new rows' sums of squares per owner's 1024 kvw / 512 columns.
    x_blocked: `mega_chain.to_blocked(x)` of x [R, 1024] bf16; kc / vc: this layer's kv_blocked [keys, 256] caches
    (keys >= 16 nsb, `caches`); key_valid int32 [>= 16 nsb] (0 past T + R); counter: 3 zeroed int32 for this launch;
    timestamps: int64 [grid, 8] or None; xchg: the cluster exchanges (the kernel's XCHG 0-4, see its source)."""
    nsb_total, nsb = nsb_for(T)
    kvw = prepared["kvw"]
    assert kc.shape[0] >= 16 * nsb_total and vc.shape == kc.shape and key_valid.numel() >= 16 * nsb_total
    assert key_valid.dtype == torch.int32 and counter.dtype == torch.int32 and counter.numel() >= 3
    assert xres.shape == (R, WIDTH) and xres.dtype == torch.float32 and xres.is_contiguous()
    assert ss.shape == (512 // kvw, R) and ss.dtype == torch.float32 and ss.is_contiguous()
    assert out.shape == (HEADS, R, WIDTH) and out.dtype == torch.float32 and out.is_contiguous()
    func, resident = _kernel(nsb, kvw, xchg)
    if resident < grid(kvw) // CS:
        raise RuntimeError(f"head_block needs {grid(kvw) // CS} resident clusters of 8; this GPU holds {resident}")
    ts = timestamps.data_ptr() if timestamps is not None else 0
    args = _Args(x_blocked.data_ptr(), prepared["wq"].data_ptr(), prepared["wkv"].data_ptr(), prepared["wo"].data_ptr(),
                 kc.data_ptr(), vc.data_ptr(), key_valid.data_ptr(), out.data_ptr(), xres.data_ptr(), ss.data_ptr(),
                 counter.data_ptr(), _exchange_buffer(out.device).data_ptr() if xchg == 4 else 0, ts, T, nsb_total)
    launch_raw(func, grid(kvw), THREADS, smem_bytes(nsb), [args], pdl)
    return out


def head_block_ref(x: torch.Tensor, wq: torch.Tensor, wkv: torch.Tensor, wo: torch.Tensor, k_fixed: torch.Tensor,
                   v_fixed: torch.Tensor, key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 math with the kernel's bf16 roundings (q, the suffix k / v, attn_h): x [R, 1024] bf16, wq with the base-2
    softmax scale folded in, k_fixed / v_fixed [T, 256], key_valid [>= T + R] -> (out [8, R, 1024], k_suffix,
    v_suffix)."""
    xf = x.float()
    q = (xf @ wq.float()).bfloat16().float()
    kv = (xf @ wkv.float()).bfloat16()
    k = torch.cat([k_fixed, kv[:, :256]]).float()
    v = torch.cat([v_fixed, kv[:, 256:]]).float()
    ok = key_valid[: k.shape[0]].bool()
    out = []
    for h in range(HEADS):
        s = (q[:, 256 * h: 256 * h + 256] @ k.t()).masked_fill(~ok, float("-inf"))
        p = torch.exp2(s - s.amax(-1, keepdim=True))
        att = ((p @ v) / p.sum(-1, keepdim=True)).bfloat16().float()
        out.append(att @ wo[256 * h: 256 * h + 256].float())
    return torch.stack(out), kv[:, :256], kv[:, 256:]


def caches(k_fixed: torch.Tensor, v_fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_blocked caches with room for the R suffix keys, the fixed keys [T, 256] in place."""
    n, _ = nsb_for(k_fixed.shape[0])
    out = []
    for f in (k_fixed, v_fixed):
        full = torch.zeros(16 * n, 256, dtype=torch.bfloat16, device=f.device)
        full[: f.shape[0]] = f
        out.append(kv_blocked(full))
    return out[0], out[1]
