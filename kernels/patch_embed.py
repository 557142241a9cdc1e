"""SigLIP patch embedding: the 14x14 stride-14 conv as a matmul over patches gathered on the fly.

out[v*P + p, :] = patches(images)[slots[v], p, :] @ kernel + (bias + pos_embedding)[p]
`slots` (optional) picks the present cameras out of every camera slot, so a call stages all slots in one copy.
Float32 throughout (OpenPI computes the conv in float32); the result seeds the vision residual stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _patch_embed_kernel(
    img_ptr, w_ptr, add_ptr, out_ptr,  # images [slots,S,S,3], kernel [K=ps*ps*3, N], add [P, N], out [V*P, N]
    slot_ptr,  # int32 [V]: the image slot of view v (HAS_SLOTS), else view v is image v
    M, N, K,
    GRID: tl.constexpr, PS: tl.constexpr, IMG: tl.constexpr, HAS_SLOTS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    P: tl.constexpr = GRID * GRID
    v, p = offs_m // P, offs_m % P
    py, px = p // GRID, p % GRID
    if HAS_SLOTS:
        v = tl.load(slot_ptr + v, mask=offs_m < M, other=0)
    # pixel (v, py*PS + ky, px*PS + kx, c) for k = (ky*PS + kx)*3 + c
    row_base = ((v.to(tl.int64) * IMG + py * PS) * IMG + px * PS) * 3  # [BM]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ky, kx, c = offs_k // (PS * 3), (offs_k // 3) % PS, offs_k % 3
        col = (ky * IMG + kx) * 3 + c  # [BK]
        a = tl.load(img_ptr + row_base[:, None] + col[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc += tl.load(add_ptr + p[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


def patch_embed(images: torch.Tensor, kernel: torch.Tensor, add: torch.Tensor, out: torch.Tensor | None = None,
                patch_size: int = 14, block=(64, 64, 32), num_warps: int = 4,
                slots: torch.Tensor | None = None, precision: str | None = None) -> torch.Tensor:
    """images [V, S, S, 3] fp32, kernel [ps*ps*3, N] fp32, add = bias + pos_emb [P, N] fp32 -> [V*P, N] fp32.
    slots (int32 [V], on the device): view v is images[slots[v]] (images then holds every camera slot).
    precision: tl.dot's input_precision; default "tf32x3" on CUDA (three tf32 MMAs: float32-accurate on the tensor
    cores, where "ieee" runs on the FMA units) and "ieee" elsewhere (the interpreter)."""
    V, S, S2, C = images.shape
    if slots is not None:
        assert slots.dtype == torch.int32 and slots.dim() == 1 and slots.device == images.device, slots
        V = slots.shape[0]
    assert S == S2 and C == 3 and S % patch_size == 0, images.shape
    grid_side = S // patch_size
    P = grid_side * grid_side
    K, N = kernel.shape
    assert K == patch_size * patch_size * 3 and add.shape == (P, N), (kernel.shape, add.shape)
    assert images.is_contiguous() and kernel.is_contiguous() and add.is_contiguous()
    M = V * P
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32, device=images.device)
    assert out.shape == (M, N) and out.is_contiguous()
    BM, BN, BK = block
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _patch_embed_kernel[grid](images, kernel, add, out, images if slots is None else slots, M, N, K, GRID=grid_side,
                              PS=patch_size, IMG=S, HAS_SLOTS=slots is not None,
                              PRECISION=precision or ("tf32x3" if images.is_cuda else "ieee"), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                              num_warps=num_warps)
    return out


def patch_embed_ref(images: torch.Tensor, kernel: torch.Tensor, add: torch.Tensor, patch_size: int = 14,
                    slots: torch.Tensor | None = None) -> torch.Tensor:
    if slots is not None:
        images = images[slots.long()]
    V, S = images.shape[:2]
    g = S // patch_size
    patches = images.float().reshape(V, g, patch_size, g, patch_size, 3).permute(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(V, g * g, patch_size * patch_size * 3)
    return (patches @ kernel.float() + add.float()).reshape(V * g * g, -1)
