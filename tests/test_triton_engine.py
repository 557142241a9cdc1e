"""End to end: the triton engine against the float32 torch reference.

- GPU (marked `gpu`): full-size random weights, bf16 engine, 1/2/3 cameras x prompts 1/20/48,
  relative error <= 1e-2, and the same inputs give bitwise the same actions.
- CPU (marked `slow`): the tiny variant through the Triton interpreter in float32 (no CUDA graph),
  which must agree with the reference to float32 rounding; camera slots dropped, 37-token prompt.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pi0_triton_policy.config import get_variant  # noqa: E402
from pi0_triton_policy.torch_model import TorchPi0  # noqa: E402
from pi0_triton_policy.weights import random_params  # noqa: E402


def _inputs(cfg, mask, prompt, seed):
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(-1, 1, (3, 224, 224, 3)).astype(np.float32)
    tokens = rng.integers(3, cfg.vocab_size, cfg.max_token_len).astype(np.int32)
    tmask = np.arange(cfg.max_token_len) < prompt
    state = rng.normal(size=cfg.action_dim).astype(np.float32)
    noise = rng.normal(size=(cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    return imgs, np.array(mask, bool), tokens, tmask, state, noise


def _rel(a, r):
    e = float(np.linalg.norm(a - r) / np.linalg.norm(r))
    print(f"rel err {e:.2e}")
    return e


@pytest.fixture(scope="module")
def full_size():
    from pi0_triton_policy.triton_engine import TritonPi0

    cfg = get_variant("pi0")
    params = random_params(cfg, seed=0, device="cuda")
    eng = TritonPi0(cfg, params, device="cuda")
    ref = TorchPi0(cfg, params, device="cuda", dtype=torch.float32)
    return cfg, eng, ref


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mask", [[1, 0, 0], [0, 1, 1], [1, 1, 1]])
@pytest.mark.parametrize("prompt", [1, 20, 48])
def test_full_size_matches_reference(full_size, mask, prompt):
    cfg, eng, ref = full_size
    torch.backends.cuda.matmul.allow_tf32 = False
    args = _inputs(cfg, mask, prompt, seed=sum(mask) * 100 + prompt)
    a = eng.sample_actions(*args)  # numpy: through the graph's pinned input mirror (Tuning.host_staging)
    assert _rel(a, ref.sample_actions(*args)) <= 1e-2
    assert np.array_equal(a, eng.sample_actions(*args)), "same inputs must give the same actions"
    dev = [torch.from_numpy(x[None]).cuda() for x in args]  # the same call with its inputs on the device
    assert np.array_equal(a, eng.sample_actions_torch(*dev)[0].cpu().numpy()), "host and device staging differ"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pi0_inference_api(full_size):
    from pi0_triton_policy.triton_engine import Pi0Inference

    cfg, eng, ref = full_size
    imgs, _, tokens, tmask, state, noise = _inputs(cfg, [1, 1, 0], 20, seed=7)
    inf = Pi0Inference(num_views=2, engine=eng)
    out = inf.infer(torch.from_numpy(imgs[:2]), torch.from_numpy(state), torch.from_numpy(noise), tokens=tokens[:20])
    assert set(out) == {"action_output", "elapsed"} and out["elapsed"] > 0
    r = ref.sample_actions(imgs, np.array([1, 1, 0], bool), tokens, tmask, state, noise)
    assert _rel(out["action_output"].cpu().numpy(), r) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mask", [[1, 0, 0], [1, 1, 1]])
@pytest.mark.parametrize("step0", [True, False])
def test_full_size_mega_steps_match_reference(full_size, mask, step0):
    """The flow steps in the persistent CUDA kernel (Tuning.act_mega, kernels/mega_chain.py), step 0 (the state
    token's row too) there or on the skinny path (Tuning.mega_step0): the same 1e-2 budget against the float32
    reference, and the same inputs give bitwise the same actions."""
    import dataclasses

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma / sm_90a")
    cfg, eng, ref = full_size
    torch.backends.cuda.matmul.allow_tf32 = False
    args = _inputs(cfg, mask, 20, seed=sum(mask) * 10 + 3)
    default = eng.tuning
    try:
        eng.tuning = dataclasses.replace(default, act_mega=(True, True, True), mega_step0=step0)
        eng._graphs.clear()
        a = eng.sample_actions(*args)
        assert _rel(a, ref.sample_actions(*args)) <= 1e-2
        assert np.array_equal(a, eng.sample_actions(*args)), "same inputs must give the same actions"
    finally:
        eng.tuning = default
        eng._graphs.clear()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is the CPU check")
@pytest.mark.parametrize("path", ["stack", "skinny", "act_cublas", "time_fused"])  # + the time MLP in one launch
def test_tiny_interpreter_matches_reference(path):
    from pi0_triton_policy.triton_engine import TritonPi0, Tuning

    cfg = get_variant("pi0_tiny")
    params = random_params(cfg, seed=1)
    tuning = Tuning(act_stack=path == "stack", act_skinny=path in ("stack", "skinny", "time_fused"),
                    act_cublas=path == "act_cublas", time_fused=path == "time_fused",
                    sk_attn2=(64, 128, 4, 2, 2), st_attn2=(64, 128, 2, 2),  # few interpreter programs
                    vis_res_split=((2, 2),) * 3 if path == "act_cublas" else ((1, 1),) * 3,  # + SigLIP's and the
                    pre_res_split=((2, 2),) * 3 if path == "act_cublas" else ((1, 1),) * 3)  # prefix's o / down split over K
    eng = TritonPi0(cfg, params, device="cpu", dtype=torch.float32, use_graphs=False, tuning=tuning)
    args = _inputs(cfg, [1, 0, 1], 37, seed=3)
    assert _rel(eng.sample_actions(*args), TorchPi0(cfg, params).sample_actions(*args)) < 1e-5


def test_stage_batch1_stages_what_set_inputs_stages():
    """The one-copy staging of a batch-of-1 call (every camera slot, full prompt) leaves the graph's inputs exactly as
    set_inputs does; any other shape is declined (False, nothing staged) for set_inputs' checks."""
    from pi0_triton_policy.triton_engine import TritonPi0

    cfg = get_variant("pi0_tiny")
    eng = TritonPi0(cfg, random_params(cfg, seed=1), device="cpu", dtype=torch.float32, use_graphs=False)
    imgs, _, tokens, tmask, state, noise = _inputs(cfg, [1, 0, 1], 48, seed=5)
    t = [torch.from_numpy(x) for x in (imgs, tokens, tmask, state, noise)]
    g = eng.graph_for(2)
    names = ("images", "slot_idx", "tokens", "token_mask", "state", "x_t")
    g.set_inputs(*t, views=[0, 2])
    want = {k: getattr(g, k).clone() for k in names}
    for k in names:
        getattr(g, k).zero_()
    assert g.stage_batch1(*(x[None] for x in t), views=[0, 2])
    for k in names:
        assert torch.equal(getattr(g, k), want[k]), k
    before = {k: getattr(g, k).clone() for k in names}
    assert not g.stage_batch1(t[0][None], t[1][None, :5], t[2][None, :5], t[3][None], t[4][None], views=[0, 2])
    assert not g.stage_batch1(t[0][None, :2], t[1][None], t[2][None], t[3][None], t[4][None], views=[0, 1])
    assert not g.stage_batch1(*(x[None] for x in t), views=[0])
    for k in names:
        assert torch.equal(getattr(g, k), before[k]), k


def test_stage_host_stages_what_set_inputs_stages():
    """A call from host memory (numpy) stages one observation through the graph's input mirror: the views patch_embed
    reads, the prompt (its tail cleared after a longer one), state and noise end up as set_inputs leaves them from
    tensors; bad shapes are the same clear errors; sample_actions takes this path with or without a batch of 1."""
    from pi0_triton_policy.triton_engine import TritonPi0

    cfg = get_variant("pi0_tiny")
    eng = TritonPi0(cfg, random_params(cfg, seed=1), device="cpu", dtype=torch.float32, use_graphs=False)
    imgs, _, tokens, tmask, state, noise = _inputs(cfg, [1, 0, 1], 48, seed=6)
    g = eng.graph_for(2)
    seen = lambda: g.images[g.slot_idx.long()].clone()  # noqa: E731 (the views patch_embed reads)
    names = ("tokens", "token_mask", "state", "x_t")
    for views, n in (([0, 2], 48), ([1, 2], 5), ([2, 0], 20)):
        g.set_inputs(*(torch.from_numpy(x) for x in (imgs, tokens[:n], tmask[:n], state, noise)), views=views)
        want = dict({k: getattr(g, k).clone() for k in names}, seen=seen())
        for k in names + ("images",):
            getattr(g, k).fill_(7)  # stale values the host staging must overwrite
        g.stage_host(imgs, views, tokens[:n], tmask[:n], state, noise)
        got = dict({k: getattr(g, k).clone() for k in names}, seen=seen())
        for k in want:
            assert torch.equal(got[k], want[k]), (views, n, k)
        assert g.slot_idx.tolist() == [0, 1]  # present views packed into slots 0..V-1
    for bad, match in (((imgs[:, :100], [0, 2], tokens, tmask, state, noise), "present slots"),
                       ((imgs, [0, 3], tokens, tmask, state, noise), "present slots"),
                       ((imgs, [0, 2], np.zeros(49, np.int32), np.ones(49, bool), state, noise), "prompt tokens"),
                       ((imgs, [0, 2], tokens, tmask[:-1], state, noise), "token_mask"),
                       ((imgs, [0, 2], tokens, tmask, state, noise[:1]), "noise")):
        with pytest.raises(ValueError, match=match):
            g.stage_host(*bad)
    with pytest.raises(ValueError, match="0 cameras present"):
        eng.sample_actions(imgs, np.zeros(3, bool), tokens, tmask, state, noise)
    staged = []
    g.stage_host = lambda *a: staged.append(a) or type(g).stage_host(g, *a)  # the call takes the host path
    g.run = lambda: None  # (the staging is the question here, not the model)
    out = eng.sample_actions(imgs[None], np.array([[1, 0, 1]]), tokens[None, :5], tmask[None, :5], state[None], noise[None])
    assert len(staged) == 1 and staged[0][1] == [0, 2] and out.shape == (1,) + noise.shape
    assert np.array_equal(out[0], noise)  # nothing ran: x_t still holds the staged noise


def test_wrong_camera_count_is_a_clear_error():
    """A graph for 2 views given 1 image must say so (a tensor copy would broadcast the image into both views)."""
    from pi0_triton_policy.triton_engine import TritonPi0

    cfg = get_variant("pi0_tiny")
    eng = TritonPi0(cfg, random_params(cfg, seed=1), device="cpu", dtype=torch.float32, use_graphs=False)
    imgs, _, tokens, tmask, state, noise = _inputs(cfg, [1, 1, 0], 5, seed=2)
    g = eng.graph_for(2)
    with pytest.raises(ValueError, match="camera images"):
        g.set_inputs(torch.from_numpy(imgs[:1]), torch.from_numpy(tokens), torch.from_numpy(tmask), torch.from_numpy(state),
                     torch.from_numpy(noise))
    with pytest.raises(ValueError, match="token_mask"):
        g.set_inputs(torch.from_numpy(imgs[:2]), torch.from_numpy(tokens), torch.from_numpy(tmask[:-1]),
                     torch.from_numpy(state), torch.from_numpy(noise))
    with pytest.raises(ValueError, match="noise"):  # copy_ would broadcast one noise row into 50
        g.set_inputs(torch.from_numpy(imgs[:2]), torch.from_numpy(tokens), torch.from_numpy(tmask), torch.from_numpy(state),
                     torch.from_numpy(noise[:1]))
    g.set_inputs(torch.from_numpy(imgs[:2]), torch.from_numpy(tokens), torch.from_numpy(tmask), torch.from_numpy(state),
                 torch.from_numpy(noise))  # the right count is accepted
    n = len(tokens)
    L, VP = cfg.max_token_len, 2 * cfg.vision.num_patches
    g.positions()  # (part of the graph) positions and key validity from the mask: cumsum(mask) - 1, suffix after
    m = torch.zeros(L, dtype=torch.int32)
    m[:n] = torch.from_numpy(tmask).to(torch.int32)
    assert torch.equal(g.key_valid[VP:].cpu(), m)
    assert torch.equal(g.pos[VP:g.T].cpu(), VP + torch.cumsum(m, 0).to(torch.int32) - 1)
    assert torch.equal(g.pos[g.T:].cpu(), VP + int(m.sum()) + torch.arange(g.S, dtype=torch.int32))


def test_set_inputs_stages_present_slots_and_clears_the_prompt_tail():
    """One copy call stages the present camera slots (absent ones are skipped), the prompt and the noise; a shorter
    prompt after a longer one leaves no stale tokens; slot lists that do not fit the graph are clear errors."""
    from pi0_triton_policy.triton_engine import TritonPi0

    cfg = get_variant("pi0_tiny")
    eng = TritonPi0(cfg, random_params(cfg, seed=1), device="cpu", dtype=torch.float32, use_graphs=False)
    imgs, _, tokens, tmask, state, noise = _inputs(cfg, [1, 0, 1], 48, seed=4)
    t = [torch.from_numpy(x) for x in (imgs, tokens, tmask, state, noise)]
    g = eng.graph_for(2)
    g.set_inputs(t[0], t[1], t[2], t[3], t[4], views=[0, 2])
    seen = lambda: g.images[g.slot_idx.long()]  # noqa: E731 (the views patch_embed reads)
    assert torch.equal(seen(), t[0][[0, 2]]) and torch.equal(g.tokens, t[1]) and torch.equal(g.x_t, t[4])
    assert torch.equal(g.token_mask, t[2].to(torch.int32)) and torch.equal(g.state[0], t[3])
    g.set_inputs(t[0], t[1][:5], t[2][:5], t[3], t[4], views=[1, 2])
    assert torch.equal(seen(), t[0][[1, 2]])
    assert torch.equal(g.tokens[:5], t[1][:5]) and g.tokens[5:].eq(0).all() and g.token_mask[5:].eq(0).all()
    g.set_inputs(t[0][[2, 1]], t[1], t[2], t[3], t[4])  # present views only
    assert torch.equal(seen(), t[0][[2, 1]]) and g.slot_idx.tolist() == [0, 1]
    for bad in ([0], [0, 3], [-1, 0]):
        with pytest.raises(ValueError, match="present slots"):
            g.set_inputs(t[0], t[1], t[2], t[3], t[4], views=bad)
