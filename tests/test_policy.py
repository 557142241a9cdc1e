"""Pi0Policy end to end on the tiny torch model, the input/output chains against independent math, presets,
and bad observations."""

import dataclasses
import io
import json
import logging

import numpy as np
import pytest
import sentencepiece as spm
import torch
from openpi_client import base_policy

from pi0_triton_policy import normalize as N
from pi0_triton_policy.config import get_variant
from pi0_triton_policy.policy import ObservationError, Pi0Policy, create_policy, make_example_observation
from pi0_triton_policy.presets import ENV_TO_PRESET, get_preset, preset_names
from pi0_triton_policy.tokenizer import FallbackTokenizer, PaligemmaTokenizer
from pi0_triton_policy.torch_model import TorchPi0
from pi0_triton_policy.transforms import gripper_from_angular, gripper_to_angular, resize_with_pad
from pi0_triton_policy.weights import random_params

PRESETS = ["pi0_aloha_sim", "pi0_aloha", "pi0_droid", "pi0_libero", "pi0_base"]


@pytest.fixture(scope="module")
def tiny_backends():
    """One tiny torch model per action horizon (pi0_droid's model is built with 10, as OpenPI's config)."""
    # One thread: on a shared 2-core machine torch's thread pool is ~4x slower than a single thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = get_variant("pi0_tiny")
    params = random_params(cfg, seed=0)
    cache = {}

    def get(horizon: int) -> TorchPi0:
        if horizon not in cache:
            cache[horizon] = TorchPi0(dataclasses.replace(cfg, action_horizon=horizon), params)
        return cache[horizon]

    yield get
    torch.set_num_threads(threads)


class RecordingBackend:
    """A stand-in backend that returns fixed normalized actions and keeps what it was given."""

    backend_name = "fake"

    def __init__(self, horizon=50, actions=None):
        self.cfg = dataclasses.replace(get_variant("pi0_tiny"), action_horizon=horizon)
        self.actions = actions
        self.calls = []

    def sample_actions(self, images, image_mask, tokens, token_mask, state, noise, num_steps=10):
        self.calls.append(dict(images=images, image_mask=image_mask, tokens=tokens, token_mask=token_mask, state=state, noise=noise))
        return self.actions if self.actions is not None else noise * 0.1


def test_presets_exist_and_unknown_names_suggest():
    assert preset_names() == sorted(PRESETS)
    assert set(ENV_TO_PRESET.values()) <= set(PRESETS)
    with pytest.raises(KeyError, match="Did you mean 'pi0_aloha'"):
        get_preset("pi0_alhoa")
    p = get_preset("pi0_aloha")
    assert p.delta_action_mask == (True,) * 6 + (False,) + (True,) * 6 + (False,)
    assert (p.asset_id, p.action_horizon, p.action_dim, p.norm) == ("trossen", 50, 14, "zscore")
    assert get_preset("pi0_aloha_sim").default_prompt == "Transfer cube"
    assert get_preset("pi0_aloha_sim").delta_action_mask is None
    assert get_preset("pi0_libero").delta_action_mask == (True,) * 6 + (False,)
    assert get_preset("pi0_droid").action_horizon == 10


@pytest.mark.parametrize("float_images", [False, True], ids=["uint8", "float01"])
@pytest.mark.parametrize("preset_name", PRESETS)
def test_example_observations_give_finite_actions_of_the_preset_shape(tiny_backends, preset_name, float_images):
    preset = get_preset(preset_name)
    policy = Pi0Policy(tiny_backends(preset.action_horizon), preset, tokenizer=FallbackTokenizer())
    assert isinstance(policy, base_policy.BasePolicy)
    obs = make_example_observation(preset_name, rng=0, float_images=float_images)
    if preset.robot == "aloha":
        assert all(im.shape == (3, 480, 640) for im in obs["images"].values()) and obs["state"].shape == (14,)
    elif preset.robot == "droid":
        assert obs["observation/exterior_image_1_left"].shape == (180, 320, 3)
    else:
        assert obs["observation/image"].shape == (224, 224, 3)
    image = next(iter(obs["images"].values())) if preset.robot == "aloha" else obs[next(k for k in obs if "image" in k)]
    assert image.dtype == (np.float32 if float_images else np.uint8)

    out = policy.infer(obs)
    assert out["actions"].shape == (preset.action_horizon, preset.action_dim)
    assert out["actions"].dtype == np.float64  # as OpenPI's (float64 norm stats)
    assert np.isfinite(out["actions"]).all()
    assert out["state"].shape == (32,) and out["policy_timing"]["infer_ms"] > 0


def test_noise_seeded_per_call_and_explicit_noise(tiny_backends):
    backend = tiny_backends(50)
    obs = make_example_observation("pi0_libero", rng=1)
    a = Pi0Policy(backend, "pi0_libero", tokenizer=FallbackTokenizer(), seed=7)
    b = Pi0Policy(backend, "pi0_libero", tokenizer=FallbackTokenizer(), seed=7)
    first = a.infer(obs)["actions"]
    np.testing.assert_array_equal(first, b.infer(obs)["actions"])  # same seed, same stream
    assert not np.allclose(first, a.infer(obs)["actions"])  # fresh noise each call
    noise = np.random.default_rng(3).standard_normal((50, 32)).astype(np.float32)
    np.testing.assert_array_equal(a.infer(obs, noise=noise)["actions"], b.infer(obs, noise=noise)["actions"])
    with pytest.raises(ValueError, match=r"noise: expected a float array of shape \(50, 32\)"):
        a.infer(obs, noise=np.zeros((10, 32)))


def test_input_chain_matches_independent_math():
    backend = RecordingBackend()
    stats = {
        "state": N.NormStats(np.arange(8.0), np.full(8, 2.0)),
        "actions": N.NormStats(np.zeros(7), np.ones(7)),
    }
    policy = Pi0Policy(backend, "pi0_libero", norm_stats=stats, tokenizer=FallbackTokenizer())
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, size=(97, 131, 3), dtype=np.uint8)  # odd size: resized with pad
    wrist = rng.random((3, 224, 224)).astype(np.float32)  # float CHW
    state = rng.normal(size=8)
    policy.infer({"observation/image": base, "observation/wrist_image": wrist, "observation/state": state, "prompt": "go"})
    got = backend.calls[0]

    expected_state = np.zeros(32, np.float32)
    expected_state[:8] = (state - np.arange(8.0)) / (2.0 + 1e-6)  # z-score, then zero padding
    np.testing.assert_array_equal(got["state"], expected_state)
    assert got["state"].dtype == np.float32

    wrist_u8 = np.transpose((255 * wrist).astype(np.uint8), (1, 2, 0))
    for i, u8 in enumerate([resize_with_pad(base), wrist_u8]):
        np.testing.assert_array_equal(got["images"][i], u8.astype(np.float32) / 255 * 2 - 1)
    assert (got["images"][2] == -1).all()  # absent right wrist: zeros -> -1
    np.testing.assert_array_equal(got["image_mask"], [True, True, False])
    assert got["images"].shape == (3, 224, 224, 3) and got["images"].dtype == np.float32

    tokens, mask = FallbackTokenizer().tokenize("go")
    np.testing.assert_array_equal(got["tokens"], tokens)
    np.testing.assert_array_equal(got["token_mask"], mask)
    assert got["tokens"].dtype == np.int32 and got["noise"].shape == (50, 32)


def test_output_chain_libero_delta_actions():
    raw = np.random.default_rng(6).normal(size=(50, 32)).astype(np.float32)
    stats = {
        "state": N.NormStats(np.full(8, 0.5), np.full(8, 2.0)),
        "actions": N.NormStats(np.arange(7.0), np.full(7, 3.0)),
    }
    policy = Pi0Policy(RecordingBackend(actions=raw), "pi0_libero", norm_stats=stats, tokenizer=FallbackTokenizer())
    obs = make_example_observation("pi0_libero", rng=2)
    out = policy.infer(obs)["actions"]

    # Independent: the state the model saw (float32), unnormalized; actions unnormalized; + state on 6 dims.
    model_state = ((obs["observation/state"] - 0.5) / (2.0 + 1e-6)).astype(np.float32)
    state = model_state.astype(np.float64) * (2.0 + 1e-6) + 0.5
    expected = raw[:, :7].astype(np.float64) * (3.0 + 1e-6) + np.arange(7.0)  # float64 stats upcast, as in OpenPI
    expected[:, :6] += state[:6]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_output_chain_aloha_delta_joints_and_grippers():
    raw = np.random.default_rng(7).normal(size=(50, 32)).astype(np.float32) * 0.1
    identity = N.identity_norm_stats(32, 32)
    policy = Pi0Policy(RecordingBackend(actions=raw), "pi0_aloha", norm_stats=identity, tokenizer=FallbackTokenizer())
    obs = make_example_observation("pi0_aloha", rng=3)
    out = policy.infer(obs)["actions"]

    flip = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], dtype=np.float64)
    pi_state = flip * obs["state"]
    pi_state[[6, 13]] = gripper_to_angular(pi_state[[6, 13]])
    pi_state = (pi_state / (1 + 1e-6)).astype(np.float32).astype(np.float64) * (1 + 1e-6)  # the float32 the model saw
    pi_actions = raw[:, :14].astype(np.float64) * (1 + 1e-6)
    joints = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    pi_actions[:, joints] += pi_state[joints]  # delta joints, absolute grippers
    expected = flip * pi_actions
    expected[:, [6, 13]] = gripper_from_angular(expected[:, [6, 13]])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_default_prompt_and_metadata():
    backend = RecordingBackend()
    sim = Pi0Policy(backend, "pi0_aloha_sim", tokenizer=FallbackTokenizer())
    obs = make_example_observation("pi0_aloha_sim", rng=0)
    del obs["prompt"]
    sim.infer(obs)
    np.testing.assert_array_equal(backend.calls[-1]["tokens"], FallbackTokenizer().tokenize("Transfer cube")[0])
    override = Pi0Policy(backend, "pi0_aloha_sim", tokenizer=FallbackTokenizer(), default_prompt="wave")
    override.infer(obs)
    np.testing.assert_array_equal(backend.calls[-1]["tokens"], FallbackTokenizer().tokenize("wave")[0])
    assert sim.metadata == {}
    aloha = Pi0Policy(backend, "pi0_aloha", tokenizer=FallbackTokenizer())
    assert aloha.metadata == {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}
    aloha.metadata["reset_pose"].append(9)  # a copy: callers cannot corrupt the preset
    assert aloha.metadata == {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}
    assert Pi0Policy(backend, "pi0_libero", tokenizer=FallbackTokenizer()).metadata == {}


# -- bad observations ---------------------------------------------------------------------------


def _libero(**changes):
    obs = make_example_observation("pi0_libero", rng=0)
    for k, v in changes.items():
        k = k.replace("__", "/")
        if v is None:
            obs.pop(k)
        else:
            obs[k] = v
    return obs


def _aloha(images=None, **changes):
    obs = make_example_observation("pi0_aloha", rng=0)
    if images is not None:
        obs["images"] = images
    obs.update(changes)
    return obs


U8 = np.zeros((224, 224, 3), np.uint8)
BAD = {
    "missing state": ("pi0_libero", _libero(observation__state=None), ["'observation/state'", "missing", "shape (8,)", "got keys"]),
    "missing image": ("pi0_libero", _libero(observation__wrist_image=None), ["'observation/wrist_image'", "missing", "[H, W, 3]"]),
    "wrong state shape": ("pi0_libero", _libero(observation__state=np.zeros(7)), ["'observation/state'", "shape (8,)", "shape (7,)"]),
    "state not numeric": ("pi0_libero", _libero(observation__state=np.array(["a"] * 8)), ["'observation/state'", "float array", "dtype <U1"]),
    "NaN state": ("pi0_libero", _libero(observation__state=np.array([0, 1, np.nan, 0, 0, 0, 0, 0.0])), ["'observation/state'", "finite", "NaN", "[2]"]),
    "inf joint": ("pi0_droid", {**make_example_observation("pi0_droid", rng=0), "observation/joint_position": np.array([np.inf] + [0.0] * 6)}, ["'observation/joint_position'", "NaN or inf", "[0]"]),
    "image wrong dtype": ("pi0_libero", _libero(observation__image=U8.astype(np.int64)), ["'observation/image'", "uint8 or float", "dtype int64"]),
    "image wrong shape": ("pi0_libero", _libero(observation__image=np.zeros((224, 224), np.uint8)), ["'observation/image'", "[H, W, 3]", "shape (224, 224)"]),
    "image 4 channels": ("pi0_libero", _libero(observation__image=np.zeros((10, 10, 4), np.uint8)), ["'observation/image'", "[H, W, 3]", "(10, 10, 4)"]),
    "image of 0 pixels": ("pi0_libero", _libero(observation__image=np.zeros((0, 10, 3), np.uint8)), ["'observation/image'", "1..4096 px", "0x10 px"]),
    "image over 4096": ("pi0_libero", _libero(observation__wrist_image=np.zeros((2, 4097, 3), np.uint8)), ["'observation/wrist_image'", "1..4096 px", "2x4097 px"]),
    "NaN float image": ("pi0_libero", _libero(observation__image=np.full((8, 8, 3), np.nan, np.float32)), ["'observation/image'", "NaN"]),
    "prompt not a string": ("pi0_libero", _libero(prompt=42), ["'prompt'", "expected a str", "int 42"]),
    "prompt array of numbers": ("pi0_libero", _libero(prompt=np.zeros(3)), ["'prompt'", "expected a str", "shape (3,)"]),
    "missing prompt, no default": ("pi0_libero", _libero(prompt=None), ["'prompt'", "missing", "no default prompt"]),
    "aloha missing cam_high": ("pi0_aloha", _aloha(images={"cam_left_wrist": np.zeros((3, 8, 8), np.uint8)}), ["'images/cam_high'", "missing", "cam_left_wrist"]),
    "aloha unknown camera": ("pi0_aloha", _aloha(images={"cam_high": np.zeros((3, 8, 8), np.uint8), "cam_top": np.zeros((3, 8, 8), np.uint8)}), ["'images'", "cam_top", "cam_high"]),
    "aloha HWC image": ("pi0_aloha", _aloha(images={"cam_high": np.zeros((480, 640, 3), np.uint8)}), ["'images/cam_high'", "[3, H, W]", "(480, 640, 3)"]),
    "aloha images not a dict": ("pi0_aloha", _aloha(images=np.zeros((3, 8, 8), np.uint8)), ["'images'", "dict", "array of shape (3, 8, 8)"]),
    "aloha state 7": ("pi0_aloha", _aloha(state=np.zeros(7)), ["'state'", "shape (14,)", "shape (7,)"]),
    "aloha missing state": ("pi0_aloha", {k: v for k, v in _aloha().items() if k != "state"}, ["'state'", "missing", "(14,)"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_observations_name_key_expected_and_got(case):
    preset_name, obs, fragments = BAD[case]
    policy = Pi0Policy(RecordingBackend(horizon=get_preset(preset_name).action_horizon), preset_name, tokenizer=FallbackTokenizer())
    with pytest.raises(ObservationError) as e:
        policy.infer(obs)
    assert isinstance(e.value, ValueError)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in: {e.value}"


def test_observation_must_be_a_dict():
    policy = Pi0Policy(RecordingBackend(), "pi0_libero", tokenizer=FallbackTokenizer())
    with pytest.raises(ObservationError, match="expected a dict, got list"):
        policy.infer([1, 2])


# -- create_policy -------------------------------------------------------------------------------


def _train_tokenizer(path):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["put the bowl on the plate", "pick up the marker"] * 8), model_writer=buf,
        vocab_size=40, hard_vocab_limit=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def test_create_policy_finds_norm_stats_and_tokenizer_in_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "empty_home"))
    weights = tmp_path / "weights"
    stats = {"state": N.NormStats(np.ones(8), np.full(8, 2.0)), "actions": N.NormStats(np.ones(7), np.full(7, 2.0))}
    N.save_norm_stats(weights / "assets" / "physical-intelligence" / "libero", stats)
    _train_tokenizer(weights / "paligemma_tokenizer.model")
    backend = RecordingBackend()

    policy = create_policy("pi0_libero", backend, weights_dir=weights, seed=1)
    assert isinstance(policy.tokenizer, PaligemmaTokenizer)
    np.testing.assert_array_equal(policy.norm_stats["state"].std, np.full(8, 2.0))
    assert policy.infer(make_example_observation("pi0_libero", rng=0))["actions"].shape == (50, 7)

    with pytest.raises(FileNotFoundError) as e:  # a preset whose asset this checkpoint does not have
        create_policy("pi0_aloha", backend, weights_dir=weights)
    assert "assets/trossen/norm_stats.json" in str(e.value) and "physical-intelligence/libero" in str(e.value)

    (weights / "paligemma_tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="paligemma_tokenizer.model"):
        create_policy("pi0_libero", backend, weights_dir=weights)


def test_create_policy_without_weights_warns_identity_stats_and_fallback(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        policy = create_policy("pi0_aloha_sim", RecordingBackend())
    assert isinstance(policy.tokenizer, FallbackTokenizer)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "identity norm stats" in text and "FALLBACK" in text
    np.testing.assert_array_equal(policy.norm_stats["state"].mean, np.zeros(32))


def test_horizon_mismatch_warns_and_slices(caplog):
    with caplog.at_level(logging.WARNING, logger="pi0_triton_policy.policy"):
        policy = Pi0Policy(RecordingBackend(horizon=50), "pi0_droid", tokenizer=FallbackTokenizer())
    assert "will not match OpenPI exactly" in caplog.text
    assert policy.infer(make_example_observation("pi0_droid", rng=0))["actions"].shape == (10, 8)
    with pytest.raises(ValueError, match="returns 50 actions but the model makes only 10"):
        Pi0Policy(RecordingBackend(horizon=10), "pi0_libero", tokenizer=FallbackTokenizer())


def test_preset_files_are_valid_toml_with_known_keys(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text('robot = "aloha"\naction_horizon = 50\naction_dim = 14\nasset_id = "x"\nnorm = "zscore"\nhorizon = 3\n')
    with pytest.raises(ValueError, match=r"unknown keys \['horizon'\]"):
        get_preset(str(bad))
    bad.write_text('robot = "ur5"\naction_horizon = 50\naction_dim = 14\nasset_id = "x"\nnorm = "zscore"\n')
    with pytest.raises(ValueError, match="unknown robot 'ur5'"):
        get_preset(str(bad))
    json.dumps(get_preset("pi0_aloha").metadata)  # metadata must travel over msgpack/JSON as plain values
