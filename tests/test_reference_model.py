"""The torch reference's pieces, each against an independent computation (numpy float64, loops, or math)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pi0_triton_policy import torch_model as tm
from pi0_triton_policy.config import get_variant
from pi0_triton_policy.testing import random_inputs, rel_err
from pi0_triton_policy.weights import random_params


def test_rms_norm_matches_float64_formula():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 37)) * 3
    scale = rng.normal(size=37) * 0.1
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * (1 + scale)
    out = tm.rms_norm(torch.tensor(x, dtype=torch.float32), torch.tensor(scale, dtype=torch.float32))
    err = rel_err(out, ref)
    print(f"rms_norm rel err {err:.2e}")
    assert err < 1e-6
    # bf16 input: statistics in float32, result rounded once to bf16
    out_bf16 = tm.rms_norm(torch.tensor(x, dtype=torch.bfloat16), torch.tensor(scale, dtype=torch.float32))
    assert out_bf16.dtype == torch.bfloat16 and rel_err(out_bf16.float(), ref) < 1e-2


def test_rope_is_a_rotation_of_half_pairs():
    rng = np.random.default_rng(2)
    B, T, N, H = 2, 7, 3, 16
    x = rng.normal(size=(B, T, N, H))
    pos = rng.integers(0, 900, size=(B, T))
    # independent: pair (x[i], x[i + H/2]) as a complex number, rotated by pos / 10000**(2i/H)
    z = x[..., : H // 2] + 1j * x[..., H // 2 :]
    theta = pos[..., None, None] / 10_000.0 ** (2 * np.arange(H // 2) / H)
    rz = z * np.exp(1j * theta)
    ref = np.concatenate([rz.real, rz.imag], -1)
    out = tm.rope(torch.tensor(x, dtype=torch.float32), torch.tensor(pos))
    err = rel_err(out, ref)
    print(f"rope rel err {err:.2e}")
    assert err < 1e-5


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q = torch.tensor(rng.normal(size=(1, 1, 1, 32)), dtype=torch.float64)
    k = torch.tensor(rng.normal(size=(1, 1, 1, 32)), dtype=torch.float64)
    dots = []
    for m in (5, 40, 300):
        qm = tm.rope(q, torch.tensor([[m]])).double()
        kn = tm.rope(k, torch.tensor([[m - 3]])).double()
        dots.append(float((qm * kn).sum()))
    assert np.allclose(dots, dots[0], rtol=1e-5)


def test_time_embedding_formula():
    t = np.array([1.0, 0.9, 0.1234, 0.0])
    dim = 64
    out = tm.time_embedding(torch.tensor(t, dtype=torch.float32), dim).numpy()
    ref = np.zeros((len(t), dim))
    for b, tb in enumerate(t):
        for i in range(dim // 2):
            period = 4e-3 * (4.0 / 4e-3) ** (i / (dim // 2 - 1))
            ref[b, i] = math.sin(2 * math.pi * tb / period)
            ref[b, dim // 2 + i] = math.cos(2 * math.pi * tb / period)
    assert np.abs(out - ref).max() < 2e-4  # float32 angles up to 2*pi*250


def test_gelu_is_tanh_approximation():
    x = np.linspace(-6, 6, 101)
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    out = tm.gelu_tanh(torch.tensor(x, dtype=torch.float64)).numpy()
    assert np.abs(out - ref).max() < 1e-12


def _expected_visibility(image_valid, text_valid, horizon):
    """By the spec's words: prefix bidirectional among valid tokens; the state token sees the prefix and
    itself; action tokens see the prefix, the state and every action; invalid tokens see nothing and are
    seen by nothing. Returns (mask [S, P+S], positions of the suffix, prefix positions)."""
    prefix_valid = list(image_valid) + list(text_valid)
    P, S = len(prefix_valid), 1 + horizon
    prefix_mask = np.zeros((P, P), bool)
    for i in range(P):
        for j in range(P):
            prefix_mask[i, j] = prefix_valid[i] and prefix_valid[j]
    suffix_mask = np.zeros((S, P + S), bool)
    for i in range(S):
        for j in range(P):
            suffix_mask[i, j] = prefix_valid[j]
        for j in range(S):
            state_row = i == 0
            suffix_mask[i, P + j] = (j == 0) if state_row else True
    prefix_pos, n = [], 0
    for v in prefix_valid:
        prefix_pos.append(n - 1 + (1 if v else 0))
        n += int(v)
    suffix_pos = [n + i for i in range(S)]
    return prefix_mask, suffix_mask, np.array(prefix_pos), np.array(suffix_pos)


def test_attention_masks_and_positions():
    cfg = get_variant("pi0_tiny")
    model = tm.TorchPi0(cfg, random_params(cfg))
    image_valid = np.repeat([True, False, True], cfg.image_tokens)
    text_valid = np.arange(cfg.max_token_len) < 11
    prefix_valid = torch.tensor(np.concatenate([image_valid, text_valid]))[None]
    exp_prefix, exp_suffix, exp_ppos, exp_spos = _expected_visibility(image_valid, text_valid, cfg.action_horizon)

    prefix_mask = tm.make_attn_mask(prefix_valid, torch.zeros_like(prefix_valid, dtype=torch.long))[0].numpy()
    np.testing.assert_array_equal(prefix_mask, exp_prefix)
    np.testing.assert_array_equal(model.suffix_attention_mask(prefix_valid)[0].numpy(), exp_suffix)
    ppos = (prefix_valid.long().cumsum(-1) - 1)[0].numpy()
    valid = prefix_valid[0].numpy()
    np.testing.assert_array_equal(ppos[valid], exp_ppos[valid])  # pads/masked images: position unused
    assert ppos[valid][-1] == 256 * 2 + 11 - 1


def test_euler_steps_follow_the_flow_schedule():
    """num_steps=2 gives x1 = noise - 0.5 v(noise, 1), x0 = x1 - 0.5 v(x1, 0.5), v from the model's pieces."""
    cfg = get_variant("pi0_tiny")
    model = tm.TorchPi0(cfg, random_params(cfg, seed=4))
    args = [torch.as_tensor(a)[None] for a in random_inputs(np.random.default_rng(5), 2, 9, cfg)]
    images, image_mask, tokens, token_mask, state, noise = args
    out = model.sample_actions_torch(*args, num_steps=2)

    cfgs = (cfg.prefix, cfg.action)
    prefix, valid = model.embed_prefix(images, image_mask, tokens, token_mask)
    _, cache = tm.gemma_forward(
        model.params, cfgs, [prefix, None], tm.make_attn_mask(valid, torch.zeros_like(valid, dtype=torch.long)),
        valid.long().cumsum(-1) - 1, None, torch.float32,
    )

    def velocity(x, t):
        suffix = model.embed_suffix(state, x, torch.tensor([t]))
        pos = valid.long().sum(-1, keepdim=True) + torch.arange(cfg.suffix_len)
        (_, o), _ = tm.gemma_forward(model.params, cfgs, [None, suffix], model.suffix_attention_mask(valid), pos, cache, torch.float32)
        return o[:, 1:] @ model.params["action_out_proj/kernel"] + model.params["action_out_proj/bias"]

    x1 = noise - 0.5 * velocity(noise, 1.0)
    x0 = x1 - 0.5 * velocity(x1, 0.5)
    err = rel_err(out, x0)
    print(f"two Euler steps rel err {err:.2e}")
    assert err < 1e-6


def test_masked_camera_slots_do_not_change_actions():
    """A masked slot is invisible: its pixels cannot matter (the reason triton may skip computing it)."""
    cfg = get_variant("pi0_tiny")
    model = tm.TorchPi0(cfg, random_params(cfg, seed=6))
    args = list(random_inputs(np.random.default_rng(7), 2, 20, cfg))
    a = model.sample_actions(*args)
    args[0] = args[0].copy()
    args[0][2] = np.random.default_rng(8).uniform(-1, 1, size=args[0][2].shape)
    b = model.sample_actions(*args)
    np.testing.assert_array_equal(a, b)


def test_batch_matches_single():
    cfg = get_variant("pi0_tiny")
    model = tm.TorchPi0(cfg, random_params(cfg, seed=9))
    rng = np.random.default_rng(10)
    singles = [random_inputs(rng, c, n, cfg) for c, n in ((1, 5), (3, 48))]
    batched = [np.stack(x) for x in zip(*singles)]
    out = model.sample_actions(*batched)
    for i, s in enumerate(singles):
        assert rel_err(out[i], model.sample_actions(*s)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_bf16_reference_is_close_to_float32(dtype):
    cfg = get_variant("pi0_tiny")
    params = random_params(cfg, seed=11)
    args = random_inputs(np.random.default_rng(12), 3, 30, cfg)
    ref = tm.TorchPi0(cfg, params).sample_actions(*args)
    out = tm.TorchPi0(cfg, params, dtype=dtype).sample_actions(*args)
    err = rel_err(out, ref)
    print(f"bf16 vs float32 rel err {err:.2e}")
    assert 0 < err < 3e-2
