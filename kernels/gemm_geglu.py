"""Gate/up matmul with the GeGLU gating in its epilogue: h = gelu_tanh(x @ Wg) * (x @ Wu).

For the prefix MLP (M = 304..816 rows, K = 2048, 2F = 32768) the gate/up output is 20-53 MB; written by the matmul
and read back by a separate GeGLU pass it costs 8.5 / 26 us per layer (1 / 3 cameras) of DRAM traffic. Here the
gating happens on the float32 accumulator, so only h (half the columns) is written.

Layout (made once at load by `interleave_gate_up`): w [2F, K], K contiguous, rows interleaved (2j = gate column j,
2j + 1 = up column j). A BN-column tile then holds BN / 2 gate/up pairs, and in the MMA accumulator's register layout
the two columns of a pair sit in the same thread, so the split is free. Operands and the output move by TMA
(tensor descriptors; rows past M are zero-filled on load and clipped on store).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pi0_triton_policy.kernels._common import gelu_tanh, gelu_tanh_ref


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row tiles walk the column tiles together, so a weight tile is reused from L2
    per_group = GROUP_M * num_n
    group = tile // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_matmul_nt(a_desc, b_desc, pid_m, pid_n, K,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    """The float32 accumulator of output tile (pid_m, pid_n) of a [M, K] @ b [N, K]^T, K pipelined over STAGES TMA
    loads (shared by gemm_geglu and gemm_rope_qkv)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        a = a_desc.load([pid_m * BM, k])
        b = b_desc.load([pid_n * BN, k])
        acc = tl.dot(a, b.T, acc)
    return acc


@triton.jit
def _geglu_tile(a_desc, b_desc, h_desc, tile, num_m, num_n, K,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
    acc = _tile_matmul_nt(a_desc, b_desc, pid_m, pid_n, K, BM, BN, BK, STAGES)
    g, u = acc.reshape(BM, BN // 2, 2).split()
    h_desc.store([pid_m * BM, pid_n * (BN // 2)], (gelu_tanh(g) * u).to(h_desc.dtype))


@triton.jit
def _gemm_geglu_kernel(a_desc, b_desc, h_desc, M, N2, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       STAGES: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PERSISTENT: tl.constexpr,
                       FLATTEN: tl.constexpr = True, WARP_SPECIALIZE: tl.constexpr = False):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N2, BN)
    if PERSISTENT:  # one program per SM walks tiles; flatten lets the next tile's loads overlap this epilogue
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN,
                             warp_specialize=WARP_SPECIALIZE):
            _geglu_tile(a_desc, b_desc, h_desc, tile, num_m, num_n, K, BM, BN, BK, GROUP_M, STAGES)
    else:
        _geglu_tile(a_desc, b_desc, h_desc, tl.program_id(0), num_m, num_n, K, BM, BN, BK, GROUP_M, STAGES)


@triton.jit
def _geglu_t_tile(wg_desc, wu_desc, x_desc, xt_desc, h_desc, ht_desc, f0, t0, K,
                  BF: tl.constexpr, BT: tl.constexpr, BTT: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                  TAIL: tl.constexpr):
    """h rows t0.. (BT of them, + BTT more with TAIL), columns f0..f0+BF: the MMAs run transposed (weight rows x
    tokens), so the gate and up accumulators are two [BF, tokens] tiles with the same register layout (the gating is
    elementwise), and the tail tokens reuse each weight tile already in shared memory."""
    acc_g = tl.zeros((BF, BT), dtype=tl.float32)
    acc_u = tl.zeros((BF, BT), dtype=tl.float32)
    if TAIL:
        acc_gt = tl.zeros((BF, BTT), dtype=tl.float32)
        acc_ut = tl.zeros((BF, BTT), dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        wg = wg_desc.load([f0, k])
        wu = wu_desc.load([f0, k])
        x = x_desc.load([t0, k])
        acc_g = tl.dot(wg, x.T, acc_g)
        acc_u = tl.dot(wu, x.T, acc_u)
        if TAIL:
            xt = xt_desc.load([t0 + BT, k])
            acc_gt = tl.dot(wg, xt.T, acc_gt)
            acc_ut = tl.dot(wu, xt.T, acc_ut)
    h_desc.store([t0, f0], tl.trans(gelu_tanh(acc_g) * acc_u).to(h_desc.dtype))
    if TAIL:
        ht_desc.store([t0 + BT, f0], tl.trans(gelu_tanh(acc_gt) * acc_ut).to(ht_desc.dtype))


@triton.jit
def _gemm_geglu_t_kernel(wg_desc, wu_desc, x_desc, xt_desc, h_desc, ht_desc, F, K, G,
                         BF: tl.constexpr, BT: tl.constexpr, BTT: tl.constexpr, BK: tl.constexpr,
                         STAGES: tl.constexpr, NUM_PROGRAMS: tl.constexpr, TAIL: tl.constexpr):
    # tile = (column slab, token group); the G groups of a slab are consecutive tiles, so they run at the same time and
    # the slab's weights come from DRAM once. With TAIL the last group also takes the BTT tokens past G * BT.
    for tile in tl.range(tl.program_id(0), tl.cdiv(F, BF) * G, NUM_PROGRAMS):
        f0 = (tile // G) * BF
        g = tile % G
        if TAIL:
            if g == G - 1:
                _geglu_t_tile(wg_desc, wu_desc, x_desc, xt_desc, h_desc, ht_desc, f0, g * BT, K, BF, BT, BTT, BK,
                              STAGES, True)
            else:
                _geglu_t_tile(wg_desc, wu_desc, x_desc, xt_desc, h_desc, ht_desc, f0, g * BT, K, BF, BT, BTT, BK,
                              STAGES, False)
        else:
            _geglu_t_tile(wg_desc, wu_desc, x_desc, xt_desc, h_desc, ht_desc, f0, g * BT, K, BF, BT, BTT, BK,
                          STAGES, False)


def token_groups(M: int, bt: int, btt: int) -> tuple[int, bool]:
    """(groups of bt tokens, whether the last one also takes a tail of <= btt tokens) covering M tokens. The engine's
    prefix is 256 * views + 48 tokens: with (256, 64) that is `views` groups and a tail, 256 * views + 64 rows of MMA
    instead of the 128-row tiles' 256 * views + 128."""
    r = M % bt
    if M > bt and 0 < r <= btt:
        return M // bt, True
    return triton.cdiv(M, bt), False


def gemm_geglu_t(x: torch.Tensor, w_il: torch.Tensor, out: torch.Tensor | None = None, block=(64, 256, 64, 64),
                 num_warps: int = 8, num_stages: int = 3, persistent: bool = True) -> torch.Tensor:
    """gemm_geglu with the MMAs transposed: weight rows (BF gate + BF up columns) x tokens (BT, and BTT tail tokens in
    the last group), so M = 256 * views + 48 runs as views x 256 + 64 rows of MMA. block = (BF, BT, BK, BTT); the
    same interleaved weight layout (its even / odd rows read as two strided matrices), the same math."""
    M, K = x.shape
    F2, K2 = w_il.shape
    assert K == K2 and F2 % 2 == 0 and x.stride(1) == 1 and w_il.is_contiguous(), (x.shape, w_il.shape)
    F = F2 // 2
    if out is None:
        out = torch.empty(M, F, dtype=x.dtype, device=x.device)
    assert out.shape == (M, F) and out.stride(1) == 1
    BF, BT, BK, BTT = block
    G, tail = token_groups(M, BT, BTT)
    wg_desc = TensorDescriptor.from_tensor(w_il[0::2], [BF, BK])
    wu_desc = TensorDescriptor.from_tensor(w_il[1::2], [BF, BK])
    x_desc = TensorDescriptor.from_tensor(x, [BT, BK])
    xt_desc = TensorDescriptor.from_tensor(x, [BTT, BK])
    h_desc = TensorDescriptor.from_tensor(out, [BT, BF])
    ht_desc = TensorDescriptor.from_tensor(out, [BTT, BF])
    tiles = triton.cdiv(F, BF) * G
    nprog = min(tiles, _num_sms(x.device)) if persistent else tiles
    _gemm_geglu_t_kernel[(nprog,)](wg_desc, wu_desc, x_desc, xt_desc, h_desc, ht_desc, F, K, G, BF=BF, BT=BT, BTT=BTT,
                                    BK=BK, STAGES=num_stages, NUM_PROGRAMS=nprog, TAIL=tail, num_warps=num_warps)
    return out


def interleave_gate_up(w_gu: torch.Tensor) -> torch.Tensor:
    """cuBLAS layout [K, 2F] (gate columns 0..F-1, then up) -> [2F, K] with rows 2j = gate j, 2j + 1 = up j."""
    K, F2 = w_gu.shape
    F = F2 // 2
    return torch.stack((w_gu[:, :F].t(), w_gu[:, F:].t()), dim=1).reshape(F2, K).contiguous()


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def gemm_geglu(x: torch.Tensor, w_il: torch.Tensor, out: torch.Tensor | None = None, block=(128, 256, 64),
               num_warps: int = 8, num_stages: int = 3, group_m: int = 8, persistent: bool = True, flatten: bool = True,
               warp_specialize: bool = False) -> torch.Tensor:
    """x [M, K], w_il [2F, K] (interleave_gate_up) -> h [M, F] = gelu_tanh(x Wg) * (x Wu), float32 accumulation."""
    M, K = x.shape
    F2, K2 = w_il.shape
    assert K == K2 and F2 % 2 == 0 and x.stride(1) == 1 and w_il.is_contiguous(), (x.shape, w_il.shape)
    if out is None:
        out = torch.empty(M, F2 // 2, dtype=x.dtype, device=x.device)
    assert out.shape == (M, F2 // 2) and out.stride(1) == 1
    BM, BN, BK = block
    a_desc = TensorDescriptor.from_tensor(x, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(w_il, [BN, BK])
    h_desc = TensorDescriptor.from_tensor(out, [BM, BN // 2])
    tiles = triton.cdiv(M, BM) * triton.cdiv(F2, BN)
    nprog = min(tiles, _num_sms(x.device)) if persistent else tiles
    _gemm_geglu_kernel[(nprog,)](a_desc, b_desc, h_desc, M, F2, K, BM=BM, BN=BN, BK=BK, GROUP_M=group_m,
                                  STAGES=num_stages, NUM_PROGRAMS=nprog, PERSISTENT=persistent, FLATTEN=flatten,
                                  WARP_SPECIALIZE=warp_specialize, num_warps=num_warps)
    return out


def gemm_geglu_ref(x: torch.Tensor, w_il: torch.Tensor) -> torch.Tensor:
    acc = x.float() @ w_il.float().t()
    return gelu_tanh_ref(acc[:, 0::2]) * acc[:, 1::2]
