"""One launch that copies a call's raw inputs into a CUDA graph's static input buffers.

Staging with tensor copies costs one launch each (images, tokens, token mask, their zero padding, state, noise: seven),
and when the inputs already sit on the GPU each launch is host time during which the GPU waits for the graph. Here
one kernel does all of it, casting on the fly (int64 tokens -> int32, a bool mask -> int32, any float -> float32) and
zeroing the prompt padding past the given tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stage_inputs_kernel(img_src, img_dst, n_img, tok_src, mask_src, tok_dst, mask_dst, n_tok, L,
                         state_src, state_dst, n_state, noise_src, noise_dst, n_noise,
                         BLOCK: tl.constexpr, SMALL: tl.constexpr):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    for start in range(pid * BLOCK, n_img, nprog * BLOCK):  # the images: grid-stride over every program
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n_img
        tl.store(img_dst + offs, tl.load(img_src + offs, mask=ok).to(tl.float32), mask=ok)
    if pid == nprog - 1:  # the small inputs: the last program (it has the fewest image chunks)
        offs = tl.arange(0, SMALL)
        given, pad = offs < n_tok, offs < L
        tok = tl.load(tok_src + offs, mask=given, other=0).to(tl.int32)
        msk = tl.load(mask_src + offs, mask=given, other=0).to(tl.int32)
        tl.store(tok_dst + offs, tok, mask=pad)
        tl.store(mask_dst + offs, msk, mask=pad)
        tl.store(state_dst + offs, tl.load(state_src + offs, mask=offs < n_state).to(tl.float32), mask=offs < n_state)
        for start in range(0, n_noise, SMALL):
            o = start + offs
            tl.store(noise_dst + o, tl.load(noise_src + o, mask=o < n_noise).to(tl.float32), mask=o < n_noise)


def stage_inputs(images, tokens, token_mask, state, noise, images_dst, tokens_dst, mask_dst, state_dst, noise_dst,
                 block: int = 4096, num_programs: int = 64) -> None:
    """images -> images_dst (float32), tokens / token_mask [n] -> the first n of tokens_dst / mask_dst [L] (int32, the
    rest zeroed), state -> state_dst, noise -> noise_dst (float32). Every tensor contiguous on one device."""
    L, n = tokens_dst.numel(), tokens.numel()
    assert n <= L and token_mask.numel() == n and images.numel() == images_dst.numel()
    assert state.numel() == state_dst.numel() and noise.numel() == noise_dst.numel()
    srcs = [t.contiguous() for t in (images, tokens, token_mask, state, noise)]
    small = triton.next_power_of_2(max(L, state.numel(), 16))
    grid = (max(1, min(num_programs, triton.cdiv(images.numel(), block))),)
    _stage_inputs_kernel[grid](srcs[0], images_dst, images.numel(), srcs[1], srcs[2], tokens_dst, mask_dst, n, L,
                               srcs[3], state_dst, state.numel(), srcs[4], noise_dst, noise.numel(),
                               BLOCK=block, SMALL=small, num_warps=4)


def stage_inputs_ref(images, tokens, token_mask, state, noise, images_dst, tokens_dst, mask_dst, state_dst,
                     noise_dst) -> None:
    """The same with tensor copies (also the path for inputs that are not on the buffers' device)."""
    n = tokens.numel()
    images_dst.copy_(images.reshape(images_dst.shape), non_blocking=True)
    tokens_dst[:n].copy_(tokens.reshape(-1), non_blocking=True)
    mask_dst[:n].copy_(token_mask.reshape(-1), non_blocking=True)
    if n < tokens_dst.numel():
        tokens_dst[n:].zero_()
        mask_dst[n:].zero_()
    state_dst.copy_(state.reshape(state_dst.shape), non_blocking=True)
    noise_dst.copy_(noise.reshape(noise_dst.shape), non_blocking=True)
