"""Matmul with split-K over a persistent grid and the vision layer's epilogues: bias, tanh-GELU, residual add.

out = epilogue(a @ w + bias)        a [M, K], w [K, N] (the cuBLAS layout), accumulation in float32
    EPI 0: out = bf16(acc)                      (vision QKV)
    EPI 1: out = bf16(gelu_tanh(acc))           (vision fc1)
    EPI 2: res += acc, in place, float32        (vision o / fc2 into the residual stream; the norm follows)

Why: SigLIP's matmuls at one camera have M = 256 rows, so 128 x 128 output tiles number 18-68 on 132 SMs and
cuBLAS runs them at 90-330 TFLOP/s (profile: 7.5-10 us for 0.7-2.5 GFLOP). Splitting K gives every SM a unit of
work; the SPLIT partials of a tile go to a float32 workspace in L2 and the last unit of the tile to arrive sums them
in fixed order (`_common.arrive_last`: bitwise deterministic) and applies the epilogue. With SPLIT = 1 the epilogue
runs straight from the accumulator. Operands move by TMA (tensor descriptors; rows and columns past M, N, K are
zero-filled on load and clipped on store), so a K range is a multiple of BK and no tile needs masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pi0_triton_policy.kernels._common import (HAS_PDL, arrive_last, default_workspace, gdc_launch_dependents, gdc_wait,
                                              gelu_tanh, gelu_tanh_ref, pdl_kwargs)
from pi0_triton_policy.kernels.gemm_geglu import _num_sms, _tile_coords

EPILOGUES = {"none": 0, "gelu": 1, "residual": 2}


@triton.jit
def _epilogue(acc, out_desc, res_desc, bias_ptr, off_m, off_n, N,
              BN: tl.constexpr, EPI: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        cols = off_n + tl.arange(0, BN)
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if EPI == 2:
        res_desc.store([off_m, off_n], res_desc.load([off_m, off_n]) + acc)
    elif EPI == 1:
        out_desc.store([off_m, off_n], gelu_tanh(acc).to(out_desc.dtype))
    else:
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit
def _gemm_splitk_kernel(a_desc, b_desc, out_desc, res_desc, bias_ptr, ws_ptr, cnt_ptr, M, N, K, K_PER_SPLIT,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        STAGES: tl.constexpr, SPLIT: tl.constexpr, EPI: tl.constexpr, HAS_BIAS: tl.constexpr,
                        NUM_PROGRAMS, PDL: tl.constexpr):
    if PDL:  # launched early under programmatic dependent launch: the inputs are the previous kernel's output
        gdc_wait()
        gdc_launch_dependents()
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # unit u = (tile u // SPLIT, K range u % SPLIT): the SPLIT units of a tile are neighbours, so they run in the
    # same wave and the last to arrive waits little
    for u in tl.range(tl.program_id(0), num_m * num_n * SPLIT, NUM_PROGRAMS):
        tile = u // SPLIT
        ks = u % SPLIT
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        k_lo = ks * K_PER_SPLIT
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BK, num_stages=STAGES):
            acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([k, off_n]), acc)
        if SPLIT == 1:
            _epilogue(acc, out_desc, res_desc, bias_ptr, off_m, off_n, N, BN, EPI, HAS_BIAS)
        else:
            # partials of tile t: ws[t, s] (a BM x BN float32 block each, row-major; whole tiles, no masks)
            part = (ws_ptr + tile.to(tl.int64) * (SPLIT * BM * BN)
                    + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :])
            tl.store(part + ks * (BM * BN), acc)
            if arrive_last(cnt_ptr + tile, SPLIT):
                total = tl.load(part, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    total += tl.load(part + s * (BM * BN), cache_modifier=".cg")
                _epilogue(total, out_desc, res_desc, bias_ptr, off_m, off_n, N, BN, EPI, HAS_BIAS)


def gemm_splitk(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                act: str = "none", res: torch.Tensor | None = None, block=(128, 128, 64), num_warps: int = 4,
                num_stages: int = 4, split: int = 1, group_m: int = 8, persistent: bool = True, workspace=None,
                pdl: bool = False) -> torch.Tensor:
    """a [M, K] @ w [K, N] (+ bias [N]) -> out [M, N] (act "none" or "gelu"), or res [M, N] float32 += (act
    "residual"; out unused). split: K ranges per output tile (deterministic fixed-order sum). Returns out or res."""
    M, K = a.shape
    K2, N = w.shape
    if K != K2:
        raise ValueError(f"gemm_splitk: a is [{M}, {K}] but w is [{K2}, {N}]; expected w with {K} rows")
    if act not in EPILOGUES:
        raise ValueError(f"gemm_splitk: act must be one of {sorted(EPILOGUES)}, got {act!r}")
    epi = EPILOGUES[act]
    assert a.stride(1) == 1 and w.stride(1) == 1, "row-major operands"
    BM, BN, BK = block
    if epi == 2:
        assert res is not None and res.shape == (M, N) and res.dtype == torch.float32 and res.stride(1) == 1
        res_desc = TensorDescriptor.from_tensor(res, [BM, BN])
        out_desc, ret = res_desc, res
    else:
        if out is None:
            out = torch.empty(M, N, dtype=a.dtype, device=a.device)
        assert out.shape == (M, N) and out.stride(1) == 1
        out_desc = TensorDescriptor.from_tensor(out, [BM, BN])
        res_desc, ret = out_desc, out
    if bias is not None:
        assert bias.shape == (N,) and bias.is_contiguous()
    k_blocks = triton.cdiv(K, BK)
    split = max(1, min(split, k_blocks))
    k_per = triton.cdiv(k_blocks, split) * BK
    split = triton.cdiv(K, k_per)  # no empty K range
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    ws = workspace if workspace is not None else default_workspace(a.device)
    buf, cnt = ws.need(tiles * split * BM * BN if split > 1 else 1, tiles)
    units = tiles * split
    nprog = min(units, _num_sms(a.device)) if persistent else units
    use_pdl = bool(pdl) and HAS_PDL and a.is_cuda
    _gemm_splitk_kernel[(nprog,)](
        TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(w, [BK, BN]), out_desc, res_desc,
        bias if bias is not None else buf, buf, cnt, M, N, K, k_per,
        BM=BM, BN=BN, BK=BK, GROUP_M=group_m, STAGES=num_stages, SPLIT=split, EPI=epi, HAS_BIAS=bias is not None,
        NUM_PROGRAMS=nprog, PDL=use_pdl, num_warps=num_warps, **pdl_kwargs(use_pdl))
    return ret


def gemm_splitk_ref(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none",
                    res: torch.Tensor | None = None) -> torch.Tensor:
    acc = a.float() @ w.float()
    if bias is not None:
        acc = acc + bias.float()
    if act == "gelu":
        return gelu_tanh_ref(acc)
    if act == "residual":
        return res.float() + acc
    return acc
