"""Prompt token embedding: gather rows of the (vocab, width) table and scale by sqrt(width).

Writes float32 rows straight into the prefix residual stream (after the image tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _embed_tokens_kernel(tok_ptr, table_ptr, out_ptr, W, stride_om, scale, BLOCK: tl.constexpr):
    pid, pid_w = tl.program_id(0), tl.program_id(1)
    offs = pid_w * BLOCK + tl.arange(0, BLOCK)
    ok = offs < W
    tok = tl.load(tok_ptr + pid).to(tl.int64)
    row = tl.load(table_ptr + tok * W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid * stride_om + offs, row * scale, mask=ok)


def embed_tokens(tokens: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """tokens [L] int, table [V, W] -> out [L, W] float32 (rows may be strided) = table[tokens] * sqrt(W)."""
    L = tokens.shape[0]
    W = table.shape[1]
    if out is None:
        out = torch.empty(L, W, dtype=torch.float32, device=table.device)
    assert out.shape == (L, W) and out.stride(1) == 1 and table.is_contiguous()
    _embed_tokens_kernel[(L, triton.cdiv(W, block))](tokens, table, out, W, out.stride(0), float(W) ** 0.5, BLOCK=block)
    return out


def embed_tokens_ref(tokens, table):
    return table[tokens.long()].float() * float(table.shape[1]) ** 0.5
