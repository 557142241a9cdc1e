"""The action-token embedding with the flow time folded into a per-step bias, one kernel.

OpenPI: tok = W_out(swish(W_in([action_in_proj(x_t), time_emb(t)]))). With W_in = [W_a; W_t] split by
rows and action_in_proj(x) = x A + a:
    W_in([x A + a, e]) = x (A W_a) + (a W_a + e(t) W_t + b_in)
so at load we precompute W1 = A W_a [32, W] and, for each of the 10 flow times, the bias
tb[step] = a W_a + e(t_step) W_t + b_in [W] (float32). The kernel computes, per output tile,
    h = swish(x_t W1 + tb[step])  chunk by chunk over W, and  out = h W_out + b_out
without writing h anywhere. All float32 (OpenPI keeps these projections in float32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _action_time_mlp_kernel(
    x_ptr, w1_ptr, tb_ptr, w2_ptr, b2_ptr, out_ptr,  # x [R, A], w1 [A, W], tb [W], w2 [W, W], b2 [W], out [R, W]
    R, W, stride_om,
    A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, A)
    m_ok, n_ok = offs_m < R, offs_n < W
    x = tl.load(x_ptr + offs_m[:, None] * A + offs_a[None, :], mask=m_ok[:, None], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, W, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < W
        w1 = tl.load(w1_ptr + offs_a[:, None] * W + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        h = tl.dot(x, w1) + tl.load(tb_ptr + offs_k, mask=k_ok, other=0.0)[None, :]
        h = h / (1.0 + tl.exp(-h))  # swish
        w2 = tl.load(w2_ptr + offs_k[:, None] * W + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(h.to(w2.dtype), w2)
    acc += tl.load(b2_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = (min_period * (max_period / min_period) ** fraction).float()
    angle = t.float()[:, None] * (2.0 * math.pi / period)[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def fold_action_time(in_w, in_b, mlp_in_w, mlp_in_b, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1 [A, W], time biases [len(times), W]) in float32 (products formed in float64)."""
    W = in_w.shape[1]
    wa, wt = mlp_in_w.double()[:W], mlp_in_w.double()[W:]
    w1 = (in_w.double() @ wa).float().contiguous()
    temb = time_embedding(times, W).double()  # [steps, W]
    tb = (in_b.double() @ wa)[None, :] + temb @ wt + mlp_in_b.double()[None, :]
    return w1, tb.float().contiguous()


def action_time_mlp(x, w1, tb, w2, b2, out=None, block=(64, 64, 64), num_warps: int = 4, num_stages: int = 2):
    """x [R, A] fp32, w1 [A, W], tb [W] (this step's), w2 [W, W], b2 [W] -> out [R, W] fp32 (rows may be strided)."""
    R, A = x.shape
    W = w1.shape[1]
    assert w1.shape == (A, W) and tb.shape == (W,) and w2.shape == (W, W) and x.is_contiguous()
    if out is None:
        out = torch.empty(R, W, dtype=torch.float32, device=x.device)
    BM, BN, BK = block
    grid = (triton.cdiv(R, BM), triton.cdiv(W, BN))
    _action_time_mlp_kernel[grid](x, w1, tb, w2, b2, out, R, W, out.stride(0), A=A, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                  num_warps=num_warps, num_stages=num_stages)
    return out


def action_time_mlp_ref(x, t: float, in_w, in_b, mlp_in_w, mlp_in_b, out_w, out_b):
    """OpenPI's unfolded math in float32."""
    act = x.float() @ in_w.float() + in_b.float()
    temb = time_embedding(torch.full((x.shape[0],), t, device=x.device), act.shape[-1])
    h = torch.nn.functional.silu(torch.cat([act, temb], -1) @ mlp_in_w.float() + mlp_in_b.float())
    return h @ out_w.float() + out_b.float()
