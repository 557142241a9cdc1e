"""Skinny matmul with the split-K reduction in distributed shared memory (CUDA C++ via NVRTC, Hopper; experimental).

out[M, N] = a[M, K] @ W[K, N] for M <= 64 rows, W stored transposed (`wt` [N, K]), bf16 in, bf16 out.

Why: the per-program timeline of the action expert's matmul chain (benchmarks/NOTES.md, session 6) shows the split-K
tail (fp32 partials to global memory, an arrival atomic, the last program's reload, the stragglers it waits for) as
2-4 us of every o/down link, while a kernel boundary under PDL is 0.7 us. Triton 3.6 (and Gluon) expose no thread
block clusters, so this kernel is CUDA C++: the SPLIT programs of one column tile form a cluster; each computes its K
range (its 4 warps take a quarter each, summed in shared memory), pushes rows r*64/SPLIT.. of that partial into rank
r's shared memory (DSMEM stores), one cluster barrier, then every rank sums the SPLIT slots of its rows in fixed
order (deterministic) and stores them. Each program's weight slab is requested with cp.async before
`griddepcontrol.wait` (it does not depend on the previous kernel); the activations after it.

Compiled at first use with NVRTC (the library torch ships), launched with cuLaunchKernelEx so PDL applies
(captured in CUDA graphs like any launch). `cluster_matmul_reference` is the plain PyTorch math it is tested against
(GPU only: no interpreter for CUDA C++).
"""

from __future__ import annotations

import ctypes
import functools

import torch

BM = 64  # activation rows per program (M <= 64; rows >= M are zero-filled in shared memory and never stored)
THREADS = 128

# device helpers shared by the CUDA C++ kernels here and in cluster_attention.py ("%%" for the % formatting)
CUDA_HELPERS = r"""
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %%1; cvt.u32.u64 %%0, t; }" : "=r"(a) : "l"(p));
    return a;
}
/* a shared-memory address that the compiler cannot compute before this point (after a barrier): the non-volatile
   ldmatrix / ld.shared::cluster below depend on it, so they are not hoisted above the barrier */
__device__ __forceinline__ unsigned pinned_u32(unsigned a) {
    unsigned r;
    asm volatile("mov.u32 %%0, %%1;" : "=r"(r) : "r"(a) : "memory");
    return r;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%%0], [%%1], 16, %%2;" :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ unsigned long long globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %%0, %%%%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned short to_bf16(float x) {
    unsigned short b;
    asm("cvt.rn.bf16.f32 %%0, %%1;" : "=h"(b) : "f"(x));
    return b;
}

"""

# mbarriers, the wgmma shared-memory descriptors and the P V wgmma (A from registers), shared by the Hopper kernels
# (mega_chain, wgmma_geglu, wgmma_linear, head_block);
# plain text (no % formatting)
HOPPER_HELPERS = r"""
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ bool mbar_try(unsigned bar, unsigned parity) {
    unsigned ok;
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    return ok;
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
/* wgmma descriptor of a K-major bf16 tile in the 128-byte swizzle: rows of 64 elements (128 B), 8-row atoms 1024 B
   apart (stride byte offset), 1024-aligned; +32 B on the address steps K by 16 inside the atom */
__device__ __forceinline__ unsigned long long sw128_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}/* wgmma m64n64k16, A (P) from registers, B (V) from shared memory N-major (imm-trans-b 1) */
__device__ __forceinline__ void wgmma_pv64(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                           unsigned long long db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
                 "{%32,%33,%34,%35}, %36, 1, 1, 1, 1;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db) : "memory");
}

/* an N-major bf16 B operand in the 128-byte swizzle: 8-key atoms of 128 B rows 1024 B apart (stride byte offset),
   64-column groups 2048 B apart (leading byte offset) */
__device__ __forceinline__ unsigned long long sw128_desc_mn(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(2048 >> 4) << 16)
         | ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}
"""

def wgmma_n_source(widths) -> str:
    """wgmma_n<N>(d, desc_a, desc_b, accumulate) for each N of `widths`: m64nNk16, bf16 -> fp32, both operands K-major
    from shared memory, N / 2 accumulator registers per thread (written out: inline asm takes no register arrays)."""
    out = ["template <int N> __device__ __forceinline__ void wgmma_n(float* d, unsigned long long da, unsigned long long db, int acc);"]
    for n in sorted(set(widths)):
        regs = ",".join(f"%{i}" for i in range(n // 2))
        ops = ", ".join(f'"+f"(d[{i}])' for i in range(n // 2))
        out.append(
            f"template <> __device__ __forceinline__ void wgmma_n<{n}>(float* d, unsigned long long da, unsigned long long db, int acc) {{\n"
            f'    asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{n // 2 + 2}, 0; '
            f'wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{regs}}}, %{n // 2}, %{n // 2 + 1}, p, 1, 1, 0, 0; }}"\n'
            f'                 : {ops} : "l"(da), "l"(db), "r"(acc) : "memory");\n}}')
    return "\n".join(out)


_SOURCE = r"""
#define BN %(BN)d
#define KC %(KC)d
#define CS %(CS)d
#define BM 64
#define NT 128
#define NJ (BN / 8)        /* n8 tiles: every warp covers all BN columns ... */
#define KW (KC / 4)        /* ... of its own quarter of the K range */
%(HELPERS)s
extern "C" __global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(NT)
cluster_matmul_kernel(const unsigned short* __restrict__ a, const unsigned short* __restrict__ wt,
                      unsigned short* __restrict__ out, unsigned long long* __restrict__ ts,
                      int M, int K, int lda, int ldo, int use_ts)
{
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned short* w_s = (unsigned short*)smem;            /* [BN][KC], 16-byte chunks XOR-swizzled by row */
    unsigned short* a_s = w_s + BN * KC;                    /* [BM][KC], same swizzle */
    float* red = (float*)smem;                              /* after the MMAs: [4 warps][BM][BN] partials */
    float* recv = (float*)(a_s + BM * KC);                  /* [CS][BM/CS][BN]: every rank's partial of my rows */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    unsigned rank;
    asm volatile("mov.u32 %%0, %%%%cluster_ctarank;" : "=r"(rank));
    if (CS > 1)  /* phase 1 of the cluster barrier: this program has started (its shared memory may be written) */
        asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    const int tile = blockIdx.x / CS;
    const int n0 = tile * BN, k0 = (int)rank * KC;
    const int CPR = KC / 8;                                 /* 16-byte chunks per row */
    unsigned long long* my_ts = ts + (size_t)blockIdx.x * 5;
    if (use_ts && tid == 0) my_ts[0] = globaltimer();

    /* the weight slab does not depend on the previous kernel: requested before the PDL wait */
    for (int i = tid; i < BN * CPR; i += NT) {
        int r = i / CPR, c = i %% CPR;
        cp_async16(smem_u32(w_s + r * KC + ((c ^ (r & 7)) * 8)), wt + (size_t)(n0 + r) * K + k0 + c * 8, 16);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");     /* the previous kernel's writes are visible from here on */
    asm volatile("griddepcontrol.launch_dependents;");
    if (use_ts && tid == 0) my_ts[1] = globaltimer();
    for (int i = tid; i < BM * CPR; i += NT) {
        int r = i / CPR, c = i %% CPR;
        int ok = r < M;
        cp_async16(smem_u32(a_s + r * KC + ((c ^ (r & 7)) * 8)), a + (size_t)(ok ? r : 0) * lda + k0 + c * 8, ok ? 16 : 0);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if (use_ts && tid == 0) my_ts[2] = globaltimer();

    const unsigned a_base = pinned_u32(smem_u32(a_s)), w_base = pinned_u32(smem_u32(w_s));
    float acc[4][NJ][4];
    #pragma unroll
    for (int mt = 0; mt < 4; ++mt)
        #pragma unroll
        for (int j = 0; j < NJ; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

    #pragma unroll
    for (int kk = 0; kk < KW / 16; ++kk) {
        const int ks = warp * (KW / 16) + kk;               /* this warp's k16 step */
        unsigned af[4][4];
        #pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
            int r = mt * 16 + (lane & 15), c = ks * 2 + (lane >> 4);
            asm("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%%0,%%1,%%2,%%3}, [%%4];"
                : "=r"(af[mt][0]), "=r"(af[mt][1]), "=r"(af[mt][2]), "=r"(af[mt][3])
                : "r"(a_base + 2 * (r * KC + ((c ^ (r & 7)) * 8))));
        }
        #pragma unroll
        for (int j = 0; j < NJ; ++j) {
            unsigned b0, b1;
            int r = j * 8 + (lane & 7), c = ks * 2 + ((lane >> 3) & 1);
            asm("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%%0,%%1}, [%%2];"
                : "=r"(b0), "=r"(b1) : "r"(w_base + 2 * (r * KC + ((c ^ (r & 7)) * 8))));
            #pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                    "{%%0,%%1,%%2,%%3}, {%%4,%%5,%%6,%%7}, {%%8,%%9}, {%%0,%%1,%%2,%%3};"
                    : "+f"(acc[mt][j][0]), "+f"(acc[mt][j][1]), "+f"(acc[mt][j][2]), "+f"(acc[mt][j][3])
                    : "r"(af[mt][0]), "r"(af[mt][1]), "r"(af[mt][2]), "r"(af[mt][3]), "r"(b0), "r"(b1));
        }
    }
    if (use_ts && tid == 0) my_ts[3] = globaltimer();

    /* the 4 warps' partials (K quarters) -> shared memory (over the slabs, no longer read) -> summed in fixed order */
    __syncthreads();
    const int g = lane >> 2, q = lane & 3;
    #pragma unroll
    for (int mt = 0; mt < 4; ++mt)
        #pragma unroll
        for (int j = 0; j < NJ; ++j)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                int row = mt * 16 + g + 8 * h, col = j * 8 + 2 * q;
                *(float2*)(red + (warp * BM + row) * BN + col) = make_float2(acc[mt][j][2 * h], acc[mt][j][2 * h + 1]);
            }
    __syncthreads();
    if (CS > 1)  /* phase 1 completes: every rank of the cluster has started, its shared memory may be written */
        asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    for (int i = tid * 4; i < BM * BN; i += NT * 4) {
        float4 s = *(float4*)(red + i);
        #pragma unroll
        for (int w = 1; w < 4; ++w) {
            float4 v = *(float4*)(red + w * BM * BN + i);
            s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
        }
        int row = i / BN, col = i %% BN;
        if (CS == 1) {
            if (row < M) {
                unsigned lo = to_bf16(s.x) | ((unsigned)to_bf16(s.y) << 16), hi = to_bf16(s.z) | ((unsigned)to_bf16(s.w) << 16);
                *(uint2*)(out + (size_t)row * ldo + n0 + col) = make_uint2(lo, hi);
            }
        } else {  /* push: row belongs to rank row / RPR, which keeps one slot per source rank */
            const int RPR = BM / CS;
            unsigned la = smem_u32(recv + (((int)rank * RPR + row %% RPR) * BN + col)), ra;
            asm volatile("mapa.shared::cluster.u32 %%0, %%1, %%2;" : "=r"(ra) : "r"(la), "r"(row / RPR));
            asm volatile("st.shared::cluster.v4.f32 [%%0], {%%1,%%2,%%3,%%4};" :: "r"(ra), "f"(s.x), "f"(s.y), "f"(s.z), "f"(s.w)
                         : "memory");
        }
    }
    if (CS > 1) {
        cluster_sync();  /* phase 2: every rank's partial of my rows is in my shared memory */
        const int RPR = BM / CS;
        for (int i = tid * 4; i < RPR * BN; i += NT * 4) {
            int row = (int)rank * RPR + i / BN, col = i %% BN;
            float4 t = *(float4*)(recv + i);
            #pragma unroll
            for (int src = 1; src < CS; ++src) {  /* fixed order: deterministic */
                float4 v = *(float4*)(recv + src * RPR * BN + i);
                t.x += v.x; t.y += v.y; t.z += v.z; t.w += v.w;
            }
            if (row < M) {
                unsigned lo = to_bf16(t.x) | ((unsigned)to_bf16(t.y) << 16), hi = to_bf16(t.z) | ((unsigned)to_bf16(t.w) << 16);
                *(uint2*)(out + (size_t)row * ldo + n0 + col) = make_uint2(lo, hi);
            }
        }
    }
    if (use_ts) {
        __syncthreads();
        if (tid == 0) my_ts[4] = globaltimer();
    }
}
"""


def cluster_matmul_reference(a: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The math of `cluster_matmul`: a @ wt.T in float32."""
    return a.float() @ wt.float().t()


def source(bn: int, kc: int, cs: int) -> str:
    return _SOURCE % dict(BN=bn, KC=kc, CS=cs, HELPERS=CUDA_HELPERS % {})


def smem_bytes(bn: int, kc: int) -> int:
    """Slabs (weights + activations, bf16) + the receive slots of this program's rows; the 4 warps' partials reuse
    the slabs."""
    assert (bn + BM) * kc * 2 >= 4 * BM * bn * 4, "the slabs must hold the 4 warps' partials"
    return (bn + BM) * kc * 2 + BM * bn * 4


@functools.lru_cache(maxsize=None)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def compile_cuda(src: str, name: str, max_dynamic_smem: int = 0, arch_suffix: str = "") -> ctypes.c_void_p:
    """NVRTC (the library torch ships) -> cubin for this GPU -> CUfunction in the current context. arch_suffix "a":
    the architecture-specific target (sm_90a: wgmma)."""
    from torch.cuda._utils import _get_gpu_rtc_library

    torch.cuda.init()
    torch.empty(1, device="cuda")  # the primary context is current on this thread
    rtc = _get_gpu_rtc_library()
    prog = ctypes.c_void_p()
    if rtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    major, minor = torch.cuda.get_device_capability()
    opts = [f"--gpu-architecture=sm_{major}{minor}{arch_suffix}".encode(), b"-default-device", b"--std=c++17"]
    res = rtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    if res != 0:
        n = ctypes.c_size_t()
        rtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        rtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC failed on {name}:\n{log.value.decode()}")
    n = ctypes.c_size_t()
    rtc.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    rtc.nvrtcGetCUBIN(prog, cubin)
    rtc.nvrtcDestroyProgram(ctypes.byref(prog))
    cu = _libcuda()
    module, func = ctypes.c_void_p(), ctypes.c_void_p()
    err = cu.cuModuleLoadData(ctypes.byref(module), cubin)
    if err == 0:
        err = cu.cuModuleGetFunction(ctypes.byref(func), module, name.encode())
    if err != 0:
        raise RuntimeError(f"loading {name} failed: CUresult {err}")
    if max_dynamic_smem > 48 * 1024:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        err = cu.cuFuncSetAttribute(func, 8, max_dynamic_smem)
        if err != 0:
            raise RuntimeError(f"cuFuncSetAttribute({max_dynamic_smem} bytes) failed: CUresult {err}")
    _MODULES.append(module)
    return func


_MODULES: list = []  # loaded modules stay alive with the process


@functools.lru_cache(maxsize=None)
def _kernel(bn: int, kc: int, cs: int) -> ctypes.c_void_p:
    assert bn in (32, 64) and kc % 64 == 0 and cs in (1, 2, 4, 8), (bn, kc, cs)  # BN 64: 176 registers
    return compile_cuda(source(bn, kc, cs), "cluster_matmul_kernel", smem_bytes(bn, kc))


class _LaunchAttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("cluster_dim", ctypes.c_uint * 3), ("flag", ctypes.c_int)]


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", _LaunchAttrValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)),
                ("num_attrs", ctypes.c_uint)]


_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


def launch(func, grid: int, block: int, smem: int, args: list, pdl: bool):
    """cuLaunchKernelEx on the current stream; pdl: programmatic stream serialization (the kernel may start while
    the previous one in the stream finishes; it calls griddepcontrol.wait before reading its inputs)."""
    launch_raw(func, grid, block, smem, [ctypes.c_void_p(x.data_ptr()) if isinstance(x, torch.Tensor)
                                         else ctypes.c_int(int(x)) for x in args], pdl)


def launch_raw(func, grid: int, block: int, smem: int, args: list, pdl: bool = False):
    """`launch` with the kernel's parameters as ctypes objects (any by-value struct, e.g. a CUtensorMap)."""
    lib = _libcuda()
    arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(c), ctypes.c_void_p) for c in args])
    attrs = (_LaunchAttr * 1)()
    attrs[0].id = _ATTR_PROGRAMMATIC_STREAM_SERIALIZATION
    attrs[0].value.flag = 1
    cfg = _LaunchConfig(grid, 1, 1, block, 1, 1, smem, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                        attrs, 1 if pdl else 0)
    err = lib.cuLaunchKernelEx(ctypes.byref(cfg), func, arr, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed: CUresult {err}")


def cluster_matmul(a: torch.Tensor, wt: torch.Tensor, out: torch.Tensor, bn: int, split: int, pdl: bool = True,
                   timestamps: torch.Tensor | None = None):
    """out[:M] = a @ wt.T with `split` K ranges per column tile reduced inside a cluster of `split` programs."""
    M, K = a.shape
    N = wt.shape[0]
    assert M <= BM and K % (split * 64) == 0 and N % bn == 0 and a.stride(1) == 1 and wt.is_contiguous()
    kc = K // split
    k = _kernel(bn, kc, split)
    ts = timestamps if timestamps is not None else out
    launch(k, N // bn * split, THREADS, smem_bytes(bn, kc),
           [a, wt, out, ts, M, K, a.stride(0), out.stride(0), int(timestamps is not None)], pdl)
    return out
