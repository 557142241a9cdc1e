"""policy_records/: OpenPI's PolicyRecorder format (step_N.npy, one flat dict), read back safely, replayed."""

import dataclasses
import pickle

import numpy as np
import pytest

from pi0_triton_policy.config import get_variant
from pi0_triton_policy.policy import Pi0Policy, make_example_observation
from pi0_triton_policy.records import PolicyRecorder, iter_records, read_record, replay, write_record
from pi0_triton_policy.tokenizer import FallbackTokenizer


class FakeBackend:
    """Deterministic in its inputs (noise and state) so replays can be compared exactly."""

    backend_name = "fake"

    def __init__(self, horizon=50):
        self.cfg = dataclasses.replace(get_variant("pi0_tiny"), action_horizon=horizon)

    def sample_actions(self, images, image_mask, tokens, token_mask, state, noise, num_steps=10):
        return noise * 0.5 + state + images.mean()


def _policy(preset, tmp_path=None, seed=0):
    return Pi0Policy(FakeBackend(), preset, tokenizer=FallbackTokenizer(), seed=seed, record_dir=tmp_path)


def test_policy_writes_openpi_layout_one_file_per_step(tmp_path):
    policy = _policy("pi0_aloha", tmp_path)
    obs = [make_example_observation("pi0_aloha", rng=i) for i in range(3)]
    outs = [policy.infer(o) for o in obs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0.npy", "step_1.npy", "step_2.npy"]

    # What OpenPI's own tools do with these files: np.load(allow_pickle=True).item() -> one flat dict.
    flat = np.load(tmp_path / "step_1.npy", allow_pickle=True).item()
    assert {"inputs/state", "inputs/images/cam_high", "inputs/prompt", "outputs/actions", "outputs/policy_timing/infer_ms"} <= set(flat)
    np.testing.assert_array_equal(flat["inputs/images/cam_low"], obs[1]["images"]["cam_low"])
    np.testing.assert_array_equal(flat["outputs/actions"], outs[1]["actions"])


def test_read_back_nests_aloha_images_and_keeps_flat_keys(tmp_path):
    aloha = _policy("pi0_aloha", tmp_path / "aloha")
    obs = make_example_observation("pi0_aloha", rng=0)
    out = aloha.infer(obs)
    rec = read_record(tmp_path / "aloha" / "step_0.npy")
    assert rec.step == 0 and set(rec.inputs["images"]) == set(obs["images"])
    np.testing.assert_array_equal(rec.inputs["images"]["cam_high"], obs["images"]["cam_high"])
    np.testing.assert_array_equal(rec.outputs["actions"], out["actions"])
    assert rec.outputs["policy_timing"]["infer_ms"] == out["policy_timing"]["infer_ms"]

    libero = _policy("pi0_libero", tmp_path / "libero")
    obs = make_example_observation("pi0_libero", rng=0)
    libero.infer(obs)
    rec = read_record(tmp_path / "libero" / "step_0.npy")
    assert set(rec.inputs) == set(obs)  # "observation/image" stays one key
    assert rec.inputs["prompt"] == obs["prompt"]


def test_reads_a_file_written_the_way_openpi_writes_it(tmp_path):
    # OpenPI: np.save(path, np.asarray(flax.traverse_util.flatten_dict({...}, sep="/"))) with path "step_N".
    flat = {
        "inputs/observation/state": np.arange(8.0),
        "inputs/observation/image": np.zeros((224, 224, 3), np.uint8),
        "inputs/prompt": "pick up the fork",
        "outputs/actions": np.ones((50, 7)),
        "outputs/policy_timing/infer_ms": 36.2,
    }
    np.save(tmp_path / "step_12", np.asarray(flat))
    rec = read_record(tmp_path / "step_12.npy")
    assert rec.step == 12 and rec.inputs["prompt"] == "pick up the fork"
    np.testing.assert_array_equal(rec.inputs["observation/state"], np.arange(8.0))
    assert rec.outputs["policy_timing"] == {"infer_ms": 36.2}


def test_replay_reproduces_outputs_and_steps_are_in_numeric_order(tmp_path):
    recorder = PolicyRecorder(_policy("pi0_libero", seed=3), tmp_path)
    for i in range(12):  # step_10, step_11 must come after step_9
        recorder.infer(make_example_observation("pi0_libero", rng=i))
    assert [r.step for r in iter_records(tmp_path)] == list(range(12))
    replays = list(replay(_policy("pi0_libero", seed=3), tmp_path))  # same seed -> same noise stream
    assert len(replays) == 12
    for rec, out in replays:
        np.testing.assert_array_equal(out["actions"], rec.outputs["actions"])


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_reader_refuses_pickled_code(tmp_path, capsys):
    payload = np.empty((), dtype=object)
    payload[()] = {"inputs/state": _Evil()}
    np.save(tmp_path / "step_0.npy", payload, allow_pickle=True)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        read_record(tmp_path / "step_0.npy")
    assert "must never run" not in capsys.readouterr().out


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="step_<N>.npy"):
        read_record(tmp_path / "actions.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_records(tmp_path / "missing"))
    write_record(tmp_path, 0, {"a": np.zeros(2)}, {"actions": np.zeros((1, 2))})
    assert read_record(tmp_path / "step_0.npy").inputs == {"a": pytest.approx(np.zeros(2))}
