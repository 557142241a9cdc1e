"""out = act(x @ W^T + b) with the output tile's width chosen so the whole product is ONE wave of programs (CUDA C++
via NVRTC, Hopper wgmma + TMA; the machinery of kernels/wgmma_geglu.py with the operands the usual way round).

Why: SigLIP's fc1 (N = 4304, K = 1152) at 256 / 512 / 768 tokens is 2 x 34 .. 4 x 34 = 68..136 output tiles of
cuBLAS's shapes, and 136 tiles on 132 SMs is two waves, the second with 4 tiles (the profile's 208 x 128 kernel at
3 cameras: 15.6 us for ~8 us of work per tile). wgmma's N is any multiple of 8 up to 256, so here a program takes
128 tokens (two consumer warpgroups x 64) x BN output columns with BN the smallest multiple of 8 that fits the
columns into floor(SMs / token tiles) tiles: 72 / 136 / 200 at 1 / 2 / 3 cameras (120 / 128 / 132 programs).

Layout as wgmma_geglu: a producer warp (its warpgroup's registers given away by setmaxnreg) loads per 64-column K
step the [128, 64] token box and the [BN, 64] weight box (w stored [N, K]) by TMA in the 128-byte swizzle; each
consumer warpgroup runs its 64 tokens x BN as one wgmma per 16-column K step. Epilogue: + bias (float32), GELU (tanh
form) if asked, bf16; the tile goes through shared memory (the ring is free by then) to 16-byte stores along rows.

Reference: `linear_ref`. Measured against cuBLAS in benchmarks/vision_gemm_probe.py (NOTES.md session 14).
"""

from __future__ import annotations

import functools

import ctypes
import torch

from pi0_triton_policy.kernels.cluster_matmul import compile_cuda, launch_raw, wgmma_n_source
from pi0_triton_policy.kernels.wgmma_geglu import available, device_helpers, tensor_map  # noqa: F401 (available)

BM, BK = 128, 64  # tokens per tile (2 consumer warpgroups x 64), K columns per ring slot
THREADS = 384

_SOURCE = r"""
#define BN @BN@
#define STAGES @STAGES@
#define GELU @GELU@
#define BM 128
#define BK 64
#define A_BYTES (BM * BK * 2)
#define B_BYTES (BN * BK * 2)
#define STAGE_BYTES (A_BYTES + B_BYTES)
#define OUT_F32 @OUT_F32@
#define OUT_BYTES (OUT_F32 ? 4 : 2)
#define OUT_PITCH (BN * OUT_BYTES + 16)  /* bytes per staged output row (+16: rows land on other banks) */
@DEVICE@
@WGMMA@

extern "C" __global__ void __launch_bounds__(384, 1)
wgmma_linear_kernel(const __grid_constant__ TensorMap xmap, const __grid_constant__ TensorMap wmap,
                    const float* __restrict__ bias, unsigned char* __restrict__ out, int M, int N, int K, int tiles_m,
                    int splits)
{
    extern __shared__ __align__(1024) unsigned char smem[];
    const unsigned base = smem_u32(smem), bars = base + STAGES * STAGE_BYTES;  /* full[s], then empty[s] */
    const int tid = threadIdx.x, wg = tid >> 7;
    /* program = (token tile, K part, column tile), the token tiles of a (column tile, K part) consecutive (its weights
       from DRAM once). K part z takes the 64-column steps [kb, kb + nk) and writes its partial product to out[z];
       a K tail past the last full box is zero-filled by the TMA (both operands) */
    const int nk_all = (K + BK - 1) / BK, rest = blockIdx.x / tiles_m, z = rest % splits;
    const int kb = z * nk_all / splits, nk = (z + 1) * nk_all / splits - kb;
    const int m0 = (blockIdx.x % tiles_m) * BM, n0 = (rest / splits) * BN;
    const bool add_bias = bias != nullptr && z == 0;  /* the bias once, in part 0 */
    out += (size_t)z * M * N * OUT_BYTES;
    if (base & 1023) asm volatile("trap;");
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) { mbar_init(bars + 8 * s, 1); mbar_init(bars + 8 * (STAGES + s), 8); }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];" :: "l"(&wmap) : "memory");
            asm volatile("prefetch.tensormap [%0];" :: "l"(&xmap) : "memory");
            /* under PDL: the weight boxes of the first slots before waiting for the kernel that writes x */
            const int pre = nk < STAGES ? nk : STAGES;
            for (int k = 0; k < pre; ++k) {
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bars + 8 * k), "r"(STAGE_BYTES) : "memory");
                tma_load_2d(base + k * STAGE_BYTES + A_BYTES, &wmap, (kb + k) * BK, n0, bars + 8 * k);
            }
            asm volatile("griddepcontrol.wait;" ::: "memory");
            for (int k = 0; k < nk; ++k) {
                const int s = k % STAGES, use = k / STAGES;
                const unsigned full = bars + 8 * s, slot = base + s * STAGE_BYTES;
                if (k >= pre) {
                    while (!mbar_try(bars + 8 * (STAGES + s), (use - 1) & 1)) {}
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(full), "r"(STAGE_BYTES) : "memory");
                    tma_load_2d(slot + A_BYTES, &wmap, (kb + k) * BK, n0, full);
                }
                tma_load_2d(slot, &xmap, (kb + k) * BK, m0, full);
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int cw = wg - 1, lane = tid & 31, q = ((tid - 128) >> 5) & 3, ct = tid - 128;
    float d[BN / 2];
    #pragma unroll
    for (int j = 0; j < BN / 2; ++j) d[j] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    for (int k = 0; k < nk; ++k) {
        const int s = k % STAGES;
        while (!mbar_try(bars + 8 * s, (k / STAGES) & 1)) {}
        const unsigned slot = base + s * STAGE_BYTES;
        const unsigned long long da = sw128_desc(slot + cw * 64 * 128), db = sw128_desc(slot + A_BYTES);
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_n<BN>(d, da + 2 * kk, db + 2 * kk, 1);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        if (k > 0) {  /* this warp's MMAs of step k - 1 are done: its slot may be refilled */
            asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
            __syncwarp();
            if (lane == 0) mbar_arrive(bars + 8 * (STAGES + (k - 1) % STAGES));
        }
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    #pragma unroll
    for (int j = 0; j < BN / 2; ++j) asm volatile("" : "+f"(d[j]) :: "memory");
    asm volatile("bar.sync 1, 256;" ::: "memory");  /* every slot consumed: the ring stages the output tile */

    /* thread: tokens 64 cw + 16 q + lane / 4 (+ 8), columns 8 j + 2 (lane % 4) (+ 1) */
    const int r = 64 * cw + 16 * q + (lane >> 2);
    #pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        const int c = 8 * j + 2 * (lane & 3);
        const float b0 = add_bias && n0 + c < N ? bias[n0 + c] : 0.f, b1 = add_bias && n0 + c + 1 < N ? bias[n0 + c + 1] : 0.f;
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v0 = d[4 * j + 2 * h] + b0, v1 = d[4 * j + 2 * h + 1] + b1;
            if (GELU) { v0 = gelu_tanh_f(v0); v1 = gelu_tanh_f(v1); }
            unsigned char* at = smem + (r + 8 * h) * OUT_PITCH + OUT_BYTES * c;
            if (OUT_F32) *(float2*)at = make_float2(v0, v1);
            else *(unsigned*)at = to_bf16(v0) | ((unsigned)to_bf16(v1) << 16);
        }
    }
    asm volatile("bar.sync 1, 256;" ::: "memory");
    constexpr int PIECES = BN * OUT_BYTES / 16, PER = 16 / OUT_BYTES;  /* 16-byte pieces along a row, columns each */
    for (int idx = ct; idx < BM * PIECES; idx += 256) {
        const int row = idx / PIECES, p = idx % PIECES;
        if (m0 + row < M && n0 + PER * p < N)
            *(uint4*)(out + ((size_t)(m0 + row) * N + n0 + PER * p) * OUT_BYTES) = *(const uint4*)(smem + row * OUT_PITCH + 16 * p);
    }
}
"""


def smem_bytes(bn: int, stages: int, out_f32: bool = False) -> int:
    ring = stages * (BM * BK * 2 + bn * BK * 2)
    assert BM * (bn * (4 if out_f32 else 2) + 16) <= ring, "the output tile is staged in the ring: more stages"
    return ring + 2 * stages * 8


def source(bn: int, stages: int, gelu: bool, out_f32: bool = False) -> str:
    assert bn % 8 == 0 and 8 <= bn <= 256, bn
    text = _SOURCE
    for k, v in dict(BN=bn, STAGES=stages, GELU=int(gelu), OUT_F32=int(out_f32), WGMMA=wgmma_n_source((bn,)),
                     DEVICE=device_helpers()).items():
        text = text.replace(f"@{k}@", str(v))
    return text


@functools.lru_cache(maxsize=None)
def _kernel(bn: int, stages: int, gelu: bool, out_f32: bool = False):
    return compile_cuda(source(bn, stages, gelu, out_f32), "wgmma_linear_kernel", smem_bytes(bn, stages, out_f32),
                        arch_suffix="a")


def one_wave_width(M: int, N: int, sms: int, split: int = 1) -> int:
    """The narrowest output tile (a multiple of 8, <= 256) that covers N columns in floor(sms / (token tiles x split))
    tiles, i.e. the fewest columns per program for which the product (split over K in `split` parts) is one wave."""
    tiles_m = -(-M // BM)
    per = max(1, sms // (tiles_m * split))
    return min(256, max(8, 8 * -(-N // (8 * per))))


def wgmma_linear(x: torch.Tensor, w_nk: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None,
                 gelu: bool = False, bn: int | None = None, stages: int | None = None, pdl: bool = True,
                 split: int = 1) -> torch.Tensor:
    """x [M, K] bf16, w_nk [N, K] bf16 (K contiguous), bias [N] float32 or None -> act(x @ w_nk^T + bias) [M, N]
    (float32 accumulation; act = tanh-GELU if gelu). out: bf16 or float32 (default bf16).
    split > 1: the K steps (64 columns each) are dealt into `split` contiguous parts, one program per (tile, part),
    and part z's product goes to out[z] of an out [split, M, N] (default float32), the bias in part 0 only: the
    caller sums the parts in order (add_norm does, kernels/add_norm.py): more programs with shorter K loops where the
    output alone is too few tiles for the SMs. Measured slower than cuBLAS for SigLIP's o / fc2 and the prefix's o at
    every camera count (benchmarks/NOTES.md session 15), so the engine does not use it.
    bn: the output tile width (default: one wave, `one_wave_width`); stages: the ring depth (default: as many as fit).
    pdl: launched with programmatic dependent launch. CUDA, sm_90a only."""
    M, K = x.shape
    N, K2 = w_nk.shape
    assert K == K2 and K % 8 == 0 and N % 8 == 0, (x.shape, w_nk.shape)  # 16-byte rows for the tensor maps
    assert x.is_contiguous() and w_nk.is_contiguous() and x.dtype == w_nk.dtype == torch.bfloat16
    assert bias is None or (bias.shape == (N,) and bias.dtype == torch.float32 and bias.is_contiguous())
    nk = -(-K // BK)
    if not 1 <= split <= nk:
        raise ValueError(f"split={split}: expected 1 .. {nk} parts of the {nk} 64-column K steps")
    if split > 1 and gelu:
        raise ValueError("split > 1 writes partial sums: an activation cannot be applied to them")
    shape = (M, N) if split == 1 else (split, M, N)
    if out is None:
        out = torch.empty(shape, dtype=torch.bfloat16 if split == 1 else torch.float32, device=x.device)
    if out.shape != shape or not out.is_contiguous() or out.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out: expected a contiguous bf16 / float32 tensor of shape {shape}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    out_f32 = out.dtype == torch.float32
    if bn is None:
        bn = one_wave_width(M, N, torch.cuda.get_device_properties(x.device).multi_processor_count, split)
    if stages is None:
        stages = max(2, min(6, (227 * 1024 - 64) // (BM * BK * 2 + bn * BK * 2)))
    tiles_m = -(-M // BM)
    launch_raw(_kernel(bn, stages, bool(gelu), out_f32), tiles_m * -(-N // bn) * split, THREADS,
               smem_bytes(bn, stages, out_f32),
               [tensor_map(x, BM), tensor_map(w_nk, bn), ctypes.c_void_p(bias.data_ptr() if bias is not None else 0),
                ctypes.c_void_p(out.data_ptr()), ctypes.c_int(M), ctypes.c_int(N), ctypes.c_int(K), ctypes.c_int(tiles_m),
                ctypes.c_int(split)], pdl)
    return out


def linear_ref(x: torch.Tensor, w_nk: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    y = x.float() @ w_nk.float().t() + (bias.float() if bias is not None else 0)
    return torch.nn.functional.gelu(y, approximate="tanh") if gelu else y
