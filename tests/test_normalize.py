"""Norm stats: z-score and quantile round trips, OpenPI's padding rules, the JSON file."""

import json

import numpy as np
import pytest

from pi0_triton_policy import normalize as N


def make_stats(d=8, seed=0):
    rng = np.random.default_rng(seed)
    q01 = rng.normal(size=d) - 2
    return N.NormStats(mean=rng.normal(size=d), std=rng.uniform(0.1, 3, size=d), q01=q01, q99=q01 + rng.uniform(1, 4, size=d))


@pytest.mark.parametrize("kind", ["zscore", "quantile"])
def test_normalize_unnormalize_round_trip(kind):
    stats = make_stats()
    x = np.random.default_rng(1).normal(size=(50, 8)) * 3
    np.testing.assert_allclose(N.unnormalize(N.normalize(x, stats, kind), stats, kind), x, rtol=1e-12, atol=1e-12)


def test_formulas_match_openpi():
    s = make_stats(4)
    x = np.array([0.5, -1.0, 2.0])  # fewer dims than the stats: the first 3 are used
    np.testing.assert_allclose(N.normalize(x, s, "zscore"), (x - s.mean[:3]) / (s.std[:3] + 1e-6))
    np.testing.assert_allclose(N.normalize(x, s, "quantile"), (x - s.q01[:3]) / (s.q99[:3] - s.q01[:3] + 1e-6) * 2 - 1)
    with pytest.raises(ValueError, match="cannot normalize 5 dims with norm stats of 4 dims"):
        N.normalize(np.zeros(5), s)


def test_unnormalize_pads_to_model_width():
    s = make_stats(4)
    y = np.random.default_rng(2).normal(size=(3, 32))
    z = N.unnormalize(y, s, "zscore")
    np.testing.assert_allclose(z[:, :4], y[:, :4] * (s.std + 1e-6) + s.mean)
    np.testing.assert_allclose(z[:, 4:], y[:, 4:] * (1 + 1e-6))  # padded mean 0, std 1
    q = N.unnormalize(y, s, "quantile")
    np.testing.assert_allclose(q[:, :4], (y[:, :4] + 1) / 2 * (s.q99 - s.q01 + 1e-6) + s.q01)
    np.testing.assert_array_equal(q[:, 4:], y[:, 4:])  # passed through
    assert z.dtype == np.float64


def test_quantile_needs_quantiles():
    with pytest.raises(ValueError, match="q01 and q99"):
        N.normalize(np.zeros(2), N.NormStats(np.zeros(2), np.ones(2)), "quantile")
    with pytest.raises(ValueError, match="unknown norm kind"):
        N.normalize(np.zeros(2), make_stats(2), "minmax")


def test_pad_to_dim():
    np.testing.assert_array_equal(N.pad_to_dim(np.array([1.0, 2.0]), 4), [1, 2, 0, 0])
    np.testing.assert_array_equal(N.pad_to_dim(np.ones((2, 3)), 5, value=7.0)[:, 3:], 7.0)
    x = np.ones(6)
    assert N.pad_to_dim(x, 4) is x


def test_json_round_trip_and_openpi_layout(tmp_path):
    stats = {"state": make_stats(14, 3), "actions": make_stats(14, 4)}
    path = N.save_norm_stats(tmp_path / "assets" / "trossen", stats)
    assert path.name == "norm_stats.json"
    doc = json.loads(path.read_text())
    assert set(doc["norm_stats"]["state"]) == {"mean", "std", "q01", "q99"}
    loaded = N.load_norm_stats(path.parent)  # a directory works like OpenPI's normalize.load
    for key in stats:
        for f in ("mean", "std", "q01", "q99"):
            np.testing.assert_array_equal(getattr(loaded[key], f), getattr(stats[key], f))
    # OpenPI's files may lack quantiles (older pi0 checkpoints).
    path.write_text(json.dumps({"norm_stats": {"state": {"mean": [0, 1], "std": [1, 2]}, "actions": {"mean": [0], "std": [1]}}}))
    assert N.load_norm_stats(path)["state"].q01 is None


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="norm stats not found"):
        N.load_norm_stats(tmp_path / "nope")
    bad = tmp_path / "norm_stats.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        N.load_norm_stats(bad)
    bad.write_text(json.dumps({"norm_stats": {"state": {"mean": [0, 1], "std": [1]}}}))
    with pytest.raises(ValueError, match="different lengths"):
        N.load_norm_stats(bad)
    bad.write_text(json.dumps({"norm_stats": {"state": {"mean": [0, "x"], "std": [1, 1]}}}))
    with pytest.raises(ValueError, match="state.mean"):
        N.load_norm_stats(bad)
