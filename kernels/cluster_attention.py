"""Action-expert attention with a cluster merge (CUDA C++ via NVRTC, Hopper; experimental).

Same math and interface as kernels/action_attention.py (suffix queries over the cached prefix keys/values plus the
suffix, OpenPI's prefix-padding + suffix ar mask, all NQ heads on one K/V head packed head-major into the row
dimension), different schedule:
- one program = 16 or 32 packed query rows x one chunk of KC keys; the SPLIT = ceil(TK / KC) chunks of a row block
  form a thread block cluster;
- the chunk's prefix keys/values are fixed during the action expert, so they are requested (cp.async) before
  `griddepcontrol.wait`; the queries and the suffix keys/values (written by the qkv kernel just before) after it;
- the partial (max, sum, unnormalised output) of every rank is pushed into the shared memory of the rank that owns
  those rows (DSMEM stores), one cluster barrier, and each rank merges its rows in fixed order (deterministic), instead
  of a last-arriving program reloading every partial from L2 (the 3-camera attention link was 14.5 us, mostly that).
mma.sync m16n8k16 (bf16 in, fp32 accumulate); the warps of an m16 tile split the head dim (partial scores summed
through shared memory in fixed order, then each computes its slice of the output). The first version gave each warp 16
rows x the whole head dim (64 rows per program): 15-20 us per call against Triton's 8.8-12.3, the per-program
mma.sync work (commit 3f12641).

`action_attention_ref` (action_attention.py) is the reference; tests/test_kernels.py checks it on the GPU.
"""

from __future__ import annotations

import functools

import torch

from pi0_triton_policy.kernels.cluster_matmul import CUDA_HELPERS, compile_cuda, launch

THREADS = 128

_SOURCE = r"""
#define HD 256
#define KC %(KC)d
#define CS %(CS)d
#define ROWS %(ROWS)d                /* packed query rows per program: 16 or 32 (one m16 tile per warp group) */
#define NT 128
#define WPR (4 / (ROWS / 16))        /* warps per m16 tile: they split the head dim (QK^T's K, PV's N) */
#define DW (HD / WPR)                /* head dims per warp */
#define RPR ((ROWS + CS - 1) / CS)   /* rows merged by each rank */
#define ROWB (HD * 2)                /* bytes per bf16 row */

%(HELPERS)s__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)to_bf16(lo) | ((unsigned)to_bf16(hi) << 16);
}
/* byte offset of 16-byte chunk c of row r in a [rows][HD] bf16 tile, chunks XOR-swizzled by row (no ldmatrix bank
   conflicts) */
__device__ __forceinline__ unsigned sw(int r, int c) { return r * ROWB + ((c ^ (r & 7)) << 4); }
__device__ __forceinline__ void mma16816(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%%0,%%1,%%2,%%3}, {%%4,%%5,%%6,%%7}, {%%8,%%9}, {%%0,%%1,%%2,%%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

extern "C" __global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(NT)
cluster_attention_kernel(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                         const unsigned short* __restrict__ v, const int* __restrict__ valid,
                         unsigned short* __restrict__ out, unsigned long long* __restrict__ ts,
                         int R, int NQ, int T_PRE, int TK, int row_start, int sq, int skv, int so, int use_ts)
{
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* q_s = smem;                               /* [ROWS][HD] */
    unsigned char* k_s = q_s + ROWS * ROWB;                  /* [KC][HD] */
    unsigned char* v_s = k_s + KC * ROWB;                    /* [KC][HD] */
    float* sx = (float*)(v_s + KC * ROWB);                   /* [4 warps][16][64]: partial scores over head dims */
    float* recv = (float*)smem;                              /* after the compute: [CS][RPR][HD] partial outputs */
    float* recv_ml = sx;                                     /* [CS][RPR][2] (max, sum) */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
    const int mt = warp / WPR, dpart = warp %% WPR;          /* this warp: m16 tile, slice of the head dim */
    const int d0 = dpart * DW;
    unsigned rank = 0;
    if (CS > 1) asm volatile("mov.u32 %%0, %%%%cluster_ctarank;" : "=r"(rank));
    const int rb = blockIdx.x / CS;
    const int key0 = (int)rank * KC;
    const int rows = NQ * R;
    unsigned long long* my_ts = ts + (size_t)blockIdx.x * 5;
    if (use_ts && tid == 0) my_ts[0] = globaltimer();

    /* prefix keys/values of this chunk: fixed during the action expert -> requested before the PDL wait */
    for (int i = tid; i < KC * 32; i += NT) {
        int r = i >> 5, c = i & 31, key = key0 + r;
        int ok = key < T_PRE && key < TK;
        size_t off = (size_t)(ok ? key : 0) * skv + c * 8;
        cp_async16(smem_u32(k_s + sw(r, c)), k + off, ok ? 16 : 0);
        cp_async16(smem_u32(v_s + sw(r, c)), v + off, ok ? 16 : 0);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
    if (use_ts && tid == 0) my_ts[1] = globaltimer();
    /* suffix keys/values (written by the qkv kernel) and the queries */
    for (int i = tid; i < KC * 32; i += NT) {
        int r = i >> 5, c = i & 31, key = key0 + r;
        if (key >= T_PRE && key < TK) {
            size_t off = (size_t)key * skv + c * 8;
            cp_async16(smem_u32(k_s + sw(r, c)), k + off, 16);
            cp_async16(smem_u32(v_s + sw(r, c)), v + off, 16);
        }
    }
    for (int i = tid; i < ROWS * 32; i += NT) {
        int r = i >> 5, c = i & 31, p = rb * ROWS + r;
        int ok = p < rows;
        int head = ok ? p / R : 0, qr = ok ? p %% R : 0;
        cp_async16(smem_u32(q_s + sw(r, c)), q + (size_t)qr * sq + head * HD + c * 8, ok ? 16 : 0);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if (use_ts && tid == 0) my_ts[2] = globaltimer();

    const unsigned qb = pinned_u32(smem_u32(q_s)), kb_ = pinned_u32(smem_u32(k_s)), vb = pinned_u32(smem_u32(v_s));
    int rg[2];
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        int p = rb * ROWS + mt * 16 + g + 8 * h;
        rg[h] = (p < rows ? p %% R : 0) + row_start;
    }
    float o[DW / 8][4];
    #pragma unroll
    for (int t = 0; t < DW / 8; ++t)
        #pragma unroll
        for (int e = 0; e < 4; ++e) o[t][e] = 0.f;
    float m[2] = {-1e30f, -1e30f}, l[2] = {0.f, 0.f};
    const float LOG2E = 1.4426950408889634f;

    for (int blk = 0; blk < KC / 64; ++blk) {
        const int kbase = blk * 64;
        if (key0 + kbase >= TK) break;
        /* partial scores of the 16 rows x 64 keys over this warp's head dims */
        float s[8][4];
        #pragma unroll
        for (int t = 0; t < 8; ++t)
            #pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] = 0.f;
        #pragma unroll
        for (int ks = 0; ks < DW / 16; ++ks) {
            const int kc16 = d0 / 16 + ks;
            unsigned a0, a1, a2, a3;
            {
                int r = mt * 16 + (lane & 15), c = kc16 * 2 + (lane >> 4);
                asm("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%%0,%%1,%%2,%%3}, [%%4];"
                    : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3) : "r"(qb + sw(r, c)));
            }
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                unsigned b0, b1, b2, b3;
                int r = kbase + np * 16 + (lane & 7) + ((lane >> 4) << 3), c = kc16 * 2 + ((lane >> 3) & 1);
                asm("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%%0,%%1,%%2,%%3}, [%%4];"
                    : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(kb_ + sw(r, c)));
                mma16816(s[2 * np], a0, a1, a2, a3, b0, b1);
                mma16816(s[2 * np + 1], a0, a1, a2, a3, b2, b3);
            }
        }
        /* sum the WPR partials of this m16 tile in fixed order (every warp of the tile gets the same scores) */
        if (WPR > 1) {
            __syncthreads();  /* the previous block's partials have been read */
            #pragma unroll
            for (int t = 0; t < 8; ++t) {
                *(float2*)(sx + (warp * 16 + g) * 64 + t * 8 + 2 * qd) = make_float2(s[t][0], s[t][1]);
                *(float2*)(sx + (warp * 16 + g + 8) * 64 + t * 8 + 2 * qd) = make_float2(s[t][2], s[t][3]);
            }
            __syncthreads();
            #pragma unroll
            for (int t = 0; t < 8; ++t) {
                float2 x0 = make_float2(0.f, 0.f), x1 = make_float2(0.f, 0.f);
                #pragma unroll
                for (int w = 0; w < WPR; ++w) {
                    float2 y0 = *(float2*)(sx + ((mt * WPR + w) * 16 + g) * 64 + t * 8 + 2 * qd);
                    float2 y1 = *(float2*)(sx + ((mt * WPR + w) * 16 + g + 8) * 64 + t * 8 + 2 * qd);
                    x0.x += y0.x; x0.y += y0.y; x1.x += y1.x; x1.y += y1.y;
                }
                s[t][0] = x0.x; s[t][1] = x0.y; s[t][2] = x1.x; s[t][3] = x1.y;
            }
        }
        /* mask (prefix padding, keys past the end, the state token sees no action key) + online softmax */
        float mx[2] = {-1e30f, -1e30f};
        #pragma unroll
        for (int t = 0; t < 8; ++t)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int key = key0 + kbase + t * 8 + 2 * qd + (e & 1), h = e >> 1;
                bool vis = key < TK && (key >= T_PRE || valid[key] != 0) && (key <= T_PRE || rg[h] > 0);
                s[t][e] = vis ? s[t][e] : __int_as_float(0xff800000);
                mx[h] = fmaxf(mx[h], s[t][e]);
            }
        float alpha[2];
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
            float mn = fmaxf(m[h], mx[h]);
            alpha[h] = exp2f((m[h] - mn) * LOG2E);
            m[h] = mn;
            l[h] *= alpha[h];
        }
        #pragma unroll
        for (int t = 0; t < 8; ++t)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                float pv = exp2f((s[t][e] - m[e >> 1]) * LOG2E);
                s[t][e] = pv;
                l[e >> 1] += pv;
            }
        #pragma unroll
        for (int t = 0; t < DW / 8; ++t) {
            o[t][0] *= alpha[0]; o[t][1] *= alpha[0];
            o[t][2] *= alpha[1]; o[t][3] *= alpha[1];
        }
        /* o[:, d0:d0+DW] += p @ v[:, d0:d0+DW]: p from the score registers (m16n8k16 A layout), v via ldmatrix.trans */
        #pragma unroll
        for (int kt = 0; kt < 4; ++kt) {
            unsigned a0 = pack_bf16(s[2 * kt][0], s[2 * kt][1]), a1 = pack_bf16(s[2 * kt][2], s[2 * kt][3]);
            unsigned a2 = pack_bf16(s[2 * kt + 1][0], s[2 * kt + 1][1]), a3 = pack_bf16(s[2 * kt + 1][2], s[2 * kt + 1][3]);
            #pragma unroll
            for (int dp = 0; dp < DW / 16; ++dp) {
                unsigned b0, b1, b2, b3;
                int r = kbase + kt * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), c = d0 / 8 + dp * 2 + (lane >> 4);
                asm("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%%0,%%1,%%2,%%3}, [%%4];"
                    : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(vb + sw(r, c)));
                mma16816(o[2 * dp], a0, a1, a2, a3, b0, b1);
                mma16816(o[2 * dp + 1], a0, a1, a2, a3, b2, b3);
            }
        }
    }
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
    }
    if (use_ts && tid == 0) my_ts[3] = globaltimer();

    if (CS == 1) {
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            int p = rb * ROWS + mt * 16 + g + 8 * h;
            if (p < rows) {
                float inv = 1.f / l[h];
                unsigned short* dst = out + (size_t)(p %% R) * so + (p / R) * HD + d0 + 2 * qd;
                #pragma unroll
                for (int t = 0; t < DW / 8; ++t)
                    *(unsigned*)(dst + t * 8) = pack_bf16(o[t][2 * h] * inv, o[t][2 * h + 1] * inv);
            }
        }
    } else {
        /* phase 1: every rank is done with its tiles (and has started), so partials may overwrite them */
        asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            int row = mt * 16 + g + 8 * h, dst_rank = row / RPR, slot = (int)rank * RPR + row %% RPR;
            unsigned la = smem_u32(recv + slot * HD + d0 + 2 * qd), ra;
            asm volatile("mapa.shared::cluster.u32 %%0, %%1, %%2;" : "=r"(ra) : "r"(la), "r"(dst_rank));
            #pragma unroll
            for (int t = 0; t < DW / 8; ++t)
                asm volatile("st.shared::cluster.v2.f32 [%%0], {%%1,%%2};" :: "r"(ra + t * 32), "f"(o[t][2 * h]), "f"(o[t][2 * h + 1]) : "memory");
            if (qd == 0 && dpart == 0) {
                unsigned lm = smem_u32(recv_ml + slot * 2), rm;
                asm volatile("mapa.shared::cluster.u32 %%0, %%1, %%2;" : "=r"(rm) : "r"(lm), "r"(dst_rank));
                asm volatile("st.shared::cluster.v2.f32 [%%0], {%%1,%%2};" :: "r"(rm), "f"(m[h]), "f"(l[h]) : "memory");
            }
        }
        /* phase 2: all partials of my rows are here; merge in fixed rank order */
        asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
        for (int i = tid; i < RPR * (HD / 4); i += NT) {
            int lr = i / (HD / 4), d = (i %% (HD / 4)) * 4, row = (int)rank * RPR + lr;
            int p = rb * ROWS + row;
            if (row >= ROWS || p >= rows) continue;
            float mm = -1e30f;
            #pragma unroll
            for (int sr = 0; sr < CS; ++sr) mm = fmaxf(mm, recv_ml[(sr * RPR + lr) * 2]);
            float L = 0.f, a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            #pragma unroll
            for (int sr = 0; sr < CS; ++sr) {
                float f = exp2f((recv_ml[(sr * RPR + lr) * 2] - mm) * LOG2E);
                L += recv_ml[(sr * RPR + lr) * 2 + 1] * f;
                float4 x = *(float4*)(recv + (sr * RPR + lr) * HD + d);
                a0 += x.x * f; a1 += x.y * f; a2 += x.z * f; a3 += x.w * f;
            }
            float inv = 1.f / L;
            *(uint2*)(out + (size_t)(p %% R) * so + (p / R) * HD + d) = make_uint2(pack_bf16(a0 * inv, a1 * inv), pack_bf16(a2 * inv, a3 * inv));
        }
    }
    if (use_ts) {
        __syncthreads();
        if (tid == 0) my_ts[4] = globaltimer();
    }
}
"""


def source(kc: int, cs: int, rows: int) -> str:
    return _SOURCE % dict(KC=kc, CS=cs, ROWS=rows, HELPERS=CUDA_HELPERS % {})


def smem_bytes(kc: int, cs: int, rows: int) -> int:
    """Query, key and value tiles (bf16) + the warps' partial scores; the partial outputs of the merge reuse the tiles,
    their (max, sum) pairs the score buffer."""
    rpr = -(-rows // cs)
    tiles = (rows + 2 * kc) * 256 * 2
    assert cs == 1 or cs * rpr * 256 * 4 <= tiles, "the partials must fit over the tiles"
    return tiles + 4 * 16 * 64 * 4


@functools.lru_cache(maxsize=None)
def _kernel(kc: int, cs: int, rows: int):
    assert kc % 64 == 0 and 1 <= cs <= 8 and rows in (16, 32), (kc, cs, rows)
    return compile_cuda(source(kc, cs, rows), "cluster_attention_kernel", smem_bytes(kc, cs, rows))


def plan(tk: int, kc: int) -> tuple[int, int]:
    """(keys per program, programs per cluster) for TK keys: chunks of kc keys (a multiple of 64), at most 8."""
    cs = -(-tk // kc)
    while cs > 8:
        kc += 64
        cs = -(-tk // kc)
    return kc, cs


def cluster_attention(q, k, v, key_valid, t_prefix: int, row_start: int, num_heads: int, out, kc: int = 64,
                      rows: int = 16, pdl: bool = True, timestamps=None):
    """q [R, NQ*256] bf16 (suffix rows row_start..), k/v cache [TK, 256], key_valid [>= T_pre] int32 -> out."""
    R, W = q.shape
    TK, HD = k.shape
    assert HD == 256 and W == num_heads * HD and k.stride() == v.stride() and k.stride(1) == 1
    assert q.dtype == k.dtype == torch.bfloat16 and key_valid.dtype == torch.int32 and out.dtype == torch.bfloat16
    kc, cs = plan(TK, kc)
    rb = -(-(num_heads * R) // rows)
    ts = timestamps if timestamps is not None else out
    launch(_kernel(kc, cs, rows), rb * cs, THREADS, smem_bytes(kc, cs, rows),
           [q, k, v, key_valid, out, ts, R, num_heads, t_prefix, TK, row_start, q.stride(0), k.stride(0),
            out.stride(0), int(timestamps is not None)], pdl)
    return out
