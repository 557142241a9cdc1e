"""The prefix's gate/up matmul + GeGLU with the weights as the MMA's M side and the tokens as its N side (CUDA C++ via
NVRTC, Hopper wgmma; the same math and weight layout as kernels/gemm_geglu.py).

Why: the prefix has 256 * views + 48 tokens (304 / 560 / 816). As the M side of 128-row tiles they are 384 / 640 /
896 rows of MMA (26 / 14 / 10 % padding: gemm_geglu at 1 camera runs 3 tiles of 23.5 us per SM). wgmma's N can be
any multiple of 8 up to 256, so with the tokens on the N side a tile covers them exactly: a program takes 128 weight
rows (64 interleaved gate/up pairs, `interleave_gate_up`) x TN tokens, TN = M / tiles_t (304, 280, 272 for 1 / 2
/ 3 cameras: multiples of 8), as two wgmma of N = NH and TN - NH per 16-column K step. At 1 camera that
is 256 tiles of 128 x 304 on 132 SMs (2 per SM) instead of 384 of 128 x 256 (3 per SM on most). Session 12's Triton
version of the idea (`gemm_geglu_t`) lost because Triton only tiles in powers of two (256 + a 64-token tail, which
it split into n32 MMAs); here the N of each instruction is exact.

Layout: one producer warp (in a warpgroup that gives its registers away: setmaxnreg) loads per 64-column K step the
[128, 64] weight box and two [NH, 64] token boxes by TMA in the 128-byte swizzle (tensor maps made on the host with
cuTensorMapEncodeTiled), into a ring of STAGES slots; two consumer warpgroups each multiply their 64 weight rows by
all TN tokens (152 accumulator registers at TN = 304) straight from the slot. One program per SM walks the tiles
(persistent): the producer runs on into the next tile while the consumers do this one's epilogue. Epilogue: in the
accumulator layout a thread holds weight rows r and r + 8 of its warp's 16; with the gate/up rows interleaved (2j
gate, 2j + 1 up) the partner of row r is in lane ^ 4, so one shuffle pair per 4 values gives each thread a gate and
its up; h goes through two 4 KB staging buffers (32 tokens each) to 128-byte row segments of h [M, F].

Measured against gemm_geglu in benchmarks/geglu_probe.py; NOTES.md session 14.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pi0_triton_policy.kernels.cluster_matmul import (CUDA_HELPERS, HOPPER_HELPERS, _libcuda, compile_cuda, launch_raw,
                                                      wgmma_n_source)

BW, BK = 128, 64  # weight rows per tile (2 consumer warpgroups x 64), K columns per ring slot
THREADS = 384  # warpgroup 0: the producer (one lane works), 1-2: consumers
MAX_TN = 304  # tokens per tile: 152 accumulator registers per consumer thread

# device code shared with kernels/wgmma_linear.py: TMA tensor maps and loads, GELU (+ cluster_matmul's helpers)
DEVICE_HELPERS = r"""
typedef unsigned short bf16;
struct __align__(64) TensorMap { unsigned long long d[16]; };
@HELPERS@
__device__ __forceinline__ void tma_load_2d(unsigned dst, const TensorMap* map, int c0, int c1, unsigned bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                 :: "r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
/* GELU, tanh form as x / (1 + exp(-2y)) with one ex2 and a fast division (kernels/mega_chain.py GELU 1, EXP 1) */
__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-2.f * 1.4426950408889634f * y));
    return __fdividef(x, 1.f + e);
}
"""

_SOURCE = r"""
#define NH @NH@
#define N2 @N2@
#define TN (NH + N2)
#define STAGES @STAGES@
#define BW 128
#define BK 64
#define W_BYTES (BW * BK * 2)
#define X_BYTES (2 * NH * BK * 2)
#define STAGE_BYTES (W_BYTES + X_BYTES)
#define STAGE_OUT (32 * 128)  /* one epilogue chunk: 32 tokens x 64 h columns bf16 */
@DEVICE@
@WGMMA@

extern "C" __global__ void __launch_bounds__(384, 1)
wgmma_geglu_kernel(const __grid_constant__ TensorMap wmap, const __grid_constant__ TensorMap xmap,
                   bf16* __restrict__ h, int M, int F, int K, int tiles_t, int tiles)
{
    extern __shared__ __align__(1024) unsigned char smem[];
    const unsigned base = smem_u32(smem), bars = base + STAGES * STAGE_BYTES;  /* full[s], then empty[s] */
    const int tid = threadIdx.x, wg = tid >> 7;
    const int nk = K / BK;
    if (base & 1023) asm volatile("trap;");  /* the swizzle atoms assume a 1024-aligned window */
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) { mbar_init(bars + 8 * s, 1); mbar_init(bars + 8 * (STAGES + s), 8); }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    /* tile = (weight tile, token tile), the token tiles of a weight tile consecutive: they run at the same time on
       neighbouring programs, so the weights come from DRAM once. A program walks tiles blockIdx.x + i * gridDim.x;
       the producer runs ahead into the next tile while the consumers finish this one (the ring never drains) */
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];" :: "l"(&wmap) : "memory");
            asm volatile("prefetch.tensormap [%0];" :: "l"(&xmap) : "memory");
            /* launched with programmatic dependent launch: the first tile's weight boxes (constants) are asked for
               before waiting for the previous kernel (which writes x), its token boxes after */
            const int pre = blockIdx.x < tiles ? (nk < STAGES ? nk : STAGES) : 0;
            const int w00 = (blockIdx.x / tiles_t) * BW;
            for (int k = 0; k < pre; ++k) {
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bars + 8 * k), "r"(STAGE_BYTES) : "memory");
                tma_load_2d(base + k * STAGE_BYTES, &wmap, k * BK, w00, bars + 8 * k);
            }
            asm volatile("griddepcontrol.wait;" ::: "memory");
            int step = 0;
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
                const int t0 = (tile % tiles_t) * TN, w0 = (tile / tiles_t) * BW;
                for (int k = 0; k < nk; ++k, ++step) {
                    const int s = step % STAGES, use = step / STAGES;
                    const unsigned full = bars + 8 * s, slot = base + s * STAGE_BYTES;
                    if (step >= pre) {
                        if (use > 0) while (!mbar_try(bars + 8 * (STAGES + s), (use - 1) & 1)) {}
                        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(full), "r"(STAGE_BYTES) : "memory");
                        tma_load_2d(slot, &wmap, k * BK, w0, full);
                    }
                    tma_load_2d(slot + W_BYTES, &xmap, k * BK, t0, full);
                    tma_load_2d(slot + W_BYTES + NH * 128, &xmap, k * BK, t0 + NH, full);
                }
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int cw = wg - 1, lane = tid & 31, q = ((tid - 128) >> 5) & 3;
    /* thread (q, i = lane / 4): weight rows 16q + i (+ 8) of this warpgroup's 64; i even: gate rows, i odd: up rows of
       the same h columns (lane ^ 4). The even lane finishes h column 8q + i/2, the odd one 8q + i/2 + 4 */
    const int i = lane >> 2;
    const bool even = !(i & 1);
    const int hc = 32 * cw + 8 * q + (i >> 1) + 4 * (i & 1);
    const int ct = tid - 128;
    unsigned char* stage = smem + STAGES * STAGE_BYTES + 128;  /* 2 x [32 tokens][64 h columns] bf16, 16-byte
                                                                  groups XOR-swizzled by token */
    int step = 0, chunk = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, step += nk) {
        const int t0 = (tile % tiles_t) * TN, w0 = (tile / tiles_t) * BW;
        float d1[NH / 2], d2[N2 / 2];
        #pragma unroll
        for (int j = 0; j < NH / 2; ++j) d1[j] = 0.f;
        #pragma unroll
        for (int j = 0; j < N2 / 2; ++j) d2[j] = 0.f;
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        for (int k = 0; k < nk; ++k) {
            const int s = (step + k) % STAGES;
            while (!mbar_try(bars + 8 * s, ((step + k) / STAGES) & 1)) {}
            const unsigned slot = base + s * STAGE_BYTES;
            const unsigned long long da = sw128_desc(slot + cw * 64 * 128);
            const unsigned long long db1 = sw128_desc(slot + W_BYTES), db2 = sw128_desc(slot + W_BYTES + NH * 128);
            #pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                wgmma_n<NH>(d1, da + 2 * kk, db1 + 2 * kk, 1);
                wgmma_n<N2>(d2, da + 2 * kk, db2 + 2 * kk, 1);
            }
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            if (k > 0) {  /* this warp's MMAs of step k - 1 are done: its slot may be refilled */
                asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
                __syncwarp();
                if (lane == 0) mbar_arrive(bars + 8 * (STAGES + (step + k - 1) % STAGES));
            }
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        /* the accumulators are read only from here on (the compiler does not see that the asm above writes them) */
        #pragma unroll
        for (int j = 0; j < NH / 2; ++j) asm volatile("" : "+f"(d1[j]) :: "memory");
        #pragma unroll
        for (int j = 0; j < N2 / 2; ++j) asm volatile("" : "+f"(d2[j]) :: "memory");
        __syncwarp();
        if (lane == 0) mbar_arrive(bars + 8 * (STAGES + (step + nk - 1) % STAGES));  /* the tile's last slot */
        /* h through a double-buffered staging area, 32 tokens at a time (the ring is refilled meanwhile): a thread
           writes its 2-byte values, then the 256 threads copy the chunk out as 128-byte row segments of h. One
           barrier per chunk: chunk c's copy-out and chunk c + 1's writes use different buffers, and everyone has
           finished copying chunk c - 1 before anyone passes barrier c */
        #pragma unroll
        for (int j = 0; j < TN / 8; ++j) {
            const float* d = j < NH / 8 ? d1 + 4 * j : d2 + 4 * (j - NH / 8);
            const float s0 = even ? d[2] : d[0], s1 = even ? d[3] : d[1];
            const float r0 = __shfl_xor_sync(0xffffffff, s0, 4), r1 = __shfl_xor_sync(0xffffffff, s1, 4);
            const float g0 = even ? d[0] : r0, g1 = even ? d[1] : r1;
            const float u0 = even ? r0 : d[2], u1 = even ? r1 : d[3];
            unsigned char* buf = stage + (chunk & 1) * STAGE_OUT;
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int t = 8 * (j % 4) + 2 * (lane & 3) + e;
                const float v = gelu_tanh_f(e ? g1 : g0) * (e ? u1 : u0);
                *(bf16*)(buf + t * 128 + ((((hc >> 3) ^ (t & 7)) << 4) | ((hc & 7) << 1))) = to_bf16(v);
            }
            if (j % 4 == 3 || j == TN / 8 - 1) {
                asm volatile("bar.sync 1, 256;" ::: "memory");
                const int tl = ct >> 3, c = ct & 7, t = t0 + 32 * (j / 4) + tl;
                if (tl < 8 * (j % 4 + 1) && t < M)
                    *(uint4*)(h + (size_t)t * F + w0 / 2 + 8 * c) = *(const uint4*)(buf + tl * 128 + ((c ^ (tl & 7)) << 4));
                ++chunk;
            }
        }
    }
}
"""


def device_helpers() -> str:
    return DEVICE_HELPERS.replace("@HELPERS@", CUDA_HELPERS % {} + HOPPER_HELPERS)


def token_split(M: int) -> tuple[int, int, int]:
    """(token tiles, NH, N2): the fewest tiles of at most MAX_TN tokens, TN = NH + N2 tokens each (multiples of 8, as
    wgmma's N; NH >= N2 >= 8). The engine's 256 * views + 48 tokens divide exactly; otherwise the last tile runs past
    M (rows zero-filled by the TMA, never stored)."""
    tiles = -(-M // MAX_TN)
    tn = max(16, 8 * -(-M // (8 * tiles)))
    nh = 8 * -(-tn // 16)
    return tiles, nh, tn - nh


def smem_bytes(nh: int, stages: int) -> int:  # the ring, its barriers (128 B), 2 epilogue chunks
    return stages * (BW * BK * 2 + 2 * nh * BK * 2) + 128 + 2 * 32 * 128


def source(nh: int, n2: int, stages: int) -> str:
    assert nh % 8 == 0 and n2 % 8 == 0 and 8 <= n2 <= nh <= 256, (nh, n2)
    text = _SOURCE
    for k, v in dict(NH=nh, N2=n2, STAGES=stages, WGMMA=wgmma_n_source((nh, n2)), DEVICE=device_helpers()).items():
        text = text.replace(f"@{k}@", str(v))
    return text


@functools.lru_cache(maxsize=None)
def _kernel(nh: int, n2: int, stages: int):
    return compile_cuda(source(nh, n2, stages), "wgmma_geglu_kernel", smem_bytes(nh, stages), arch_suffix="a")


class _TensorMap(ctypes.Structure):
    _fields_ = [("d", ctypes.c_uint64 * 16)]


_MAPS: dict = {}  # (pointer, rows, cols, box rows) -> its CUtensorMap: made once per buffer, captured by value


def tensor_map(t: torch.Tensor, box_rows: int) -> _TensorMap:
    """A 2-D TMA map of a row-major bf16 [rows, cols] tensor: boxes of [box_rows, 64] in the 128-byte swizzle, rows
    past the end zero-filled."""
    assert t.dim() == 2 and t.dtype == torch.bfloat16 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
    rows, cols = t.shape
    key = (t.data_ptr(), rows, cols, t.stride(0), box_rows)
    if key not in _MAPS:
        buf = ctypes.create_string_buffer(128 + 64)  # cuTensorMapEncodeTiled wants the map 64-byte aligned
        m = _TensorMap.from_address(ctypes.addressof(buf) + (-ctypes.addressof(buf)) % 64)
        err = _libcuda().cuTensorMapEncodeTiled(
            ctypes.byref(m), ctypes.c_int(9), ctypes.c_uint(2), ctypes.c_void_p(t.data_ptr()),  # 9: BFLOAT16
            (ctypes.c_uint64 * 2)(cols, rows), (ctypes.c_uint64 * 1)(t.stride(0) * 2), (ctypes.c_uint32 * 2)(BK, box_rows),
            (ctypes.c_uint32 * 2)(1, 1), ctypes.c_int(0), ctypes.c_int(3), ctypes.c_int(2), ctypes.c_int(0))  # swizzle 128B, L2 128B
        if err != 0:
            raise RuntimeError(f"cuTensorMapEncodeTiled({tuple(t.shape)}, box {box_rows}) failed: CUresult {err}")
        _MAPS[key] = (buf, m)
    return _MAPS[key][1]


@functools.lru_cache(maxsize=None)
def _toolchain_ok() -> bool:
    """The driver's tensor-map entry point and NVRTC with sm_90a are there (one kernel compiled, kept for later)."""
    try:
        _libcuda().cuTensorMapEncodeTiled
        _kernel(*token_split(304)[1:], 4)  # the engine's 1-camera variant
        return True
    except Exception:  # no NVRTC / an old driver: the callers keep their Triton / cuBLAS paths
        return False


def available(device) -> bool:
    """Whether this device runs the wgmma kernels here (wgmma_geglu, wgmma_linear): sm_90a and the toolchain."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) == (9, 0) and _toolchain_ok()


def wgmma_geglu(x: torch.Tensor, w_il: torch.Tensor, out: torch.Tensor | None = None, stages: int = 4,
                persistent: bool = True, pdl: bool = True) -> torch.Tensor:
    """x [M, K], w_il [2F, K] (gemm_geglu.interleave_gate_up) -> h [M, F] = gelu_tanh(x Wg) * (x Wu) (float32
    accumulation; reference gemm_geglu.gemm_geglu_ref). CUDA, sm_90a only. persistent: one program per SM walking
    the tiles (the next tile's loads overlap this one's epilogue); else one program per tile. pdl: launched with
    programmatic dependent launch (the kernel asks for its first weight boxes, then waits for the previous kernel)."""
    M, K = x.shape
    F2, K2 = w_il.shape
    assert K == K2 and K % BK == 0 and F2 % BW == 0, (x.shape, w_il.shape)
    assert x.is_contiguous() and w_il.is_contiguous() and x.dtype == w_il.dtype == torch.bfloat16
    F = F2 // 2
    if out is None:
        out = torch.empty(M, F, dtype=x.dtype, device=x.device)
    assert out.shape == (M, F) and out.is_contiguous() and out.dtype == torch.bfloat16
    tiles_t, nh, n2 = token_split(M)
    tiles = F2 // BW * tiles_t
    programs = min(tiles, torch.cuda.get_device_properties(x.device).multi_processor_count) if persistent else tiles
    launch_raw(_kernel(nh, n2, stages), programs, THREADS, smem_bytes(nh, stages),
               [tensor_map(w_il, BW), tensor_map(x, nh), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(M),
                ctypes.c_int(F), ctypes.c_int(K), ctypes.c_int(tiles_t), ctypes.c_int(tiles)], pdl)
    return out
