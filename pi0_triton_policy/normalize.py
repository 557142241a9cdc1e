"""Normalization statistics (OpenPI's `norm_stats.json`) and the z-score / quantile maps.

File: `<checkpoint>/assets/<asset_id>/norm_stats.json` =
    {"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...]}, "actions": {...}}}
pi0 uses z-score `(x - mean) / (std + 1e-6)`; pi0.5 and FAST use quantiles `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1`.
Normalizing uses the first d entries of the stats (d = the data's width). Unnormalizing a 32-wide model
output pads mean with 0 and std with 1 (z-score), or passes the extra dims through (quantile), exactly as
OpenPI's Unnormalize does. Stats are float64 (JSON numbers), so results are float64 as in OpenPI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

NORM_STATS_FILE = "norm_stats.json"
NORM_KINDS = ("zscore", "quantile")
EPS = 1e-6  # OpenPI's epsilon in both maps


@dataclasses.dataclass(frozen=True)
class NormStats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])


def _vector(value, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected a list of numbers, got {type(value).__name__} ({e})") from e
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{where}: expected a non-empty 1-D list of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: contains NaN or inf")
    return arr


def parse_norm_stats(data: dict, source: str = "norm stats") -> dict[str, NormStats]:
    """The parsed JSON document (with or without the top-level "norm_stats" wrapper) -> {key: NormStats}."""
    table = data.get("norm_stats", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{source}: expected {{'norm_stats': {{'state': {{...}}, 'actions': {{...}}}}}}, got {type(data).__name__}")
    out = {}
    for key, entry in table.items():
        if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
            raise ValueError(f"{source}: entry {key!r} must hold at least 'mean' and 'std' lists")
        fields = {name: _vector(entry[name], f"{source}: {key}.{name}") for name in ("mean", "std", "q01", "q99") if entry.get(name) is not None}
        dims = {name: v.shape[0] for name, v in fields.items()}
        if len(set(dims.values())) != 1:
            raise ValueError(f"{source}: entry {key!r} has lists of different lengths {dims}")
        out[key] = NormStats(**fields)
    return out


def load_norm_stats(path: str | os.PathLike) -> dict[str, NormStats]:
    """From a norm_stats.json file, or a directory holding one (OpenPI's `assets/<asset_id>/`)."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / NORM_STATS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"norm stats not found at {str(p)!r}: expected OpenPI's {NORM_STATS_FILE} "
            "(copied from <openpi checkpoint>/assets/<asset_id>/ by scripts/convert_checkpoint.py)"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(p)!r} is not valid JSON: {e}") from e
    return parse_norm_stats(data, source=str(p))


def save_norm_stats(path: str | os.PathLike, stats: dict[str, NormStats]) -> pathlib.Path:
    """Write OpenPI's layout (a file path, or a directory that gets norm_stats.json)."""
    p = pathlib.Path(path)
    if p.suffix != ".json":
        p = p / NORM_STATS_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "norm_stats": {
            k: {f: getattr(s, f).tolist() for f in ("mean", "std", "q01", "q99") if getattr(s, f) is not None}
            for k, s in stats.items()
        }
    }
    p.write_text(json.dumps(doc, indent=2) + "\n")
    return p


def identity_norm_stats(state_dim: int, action_dim: int) -> dict[str, NormStats]:
    """mean 0, std 1, q01 -1, q99 1: the z-score map is then x / (1 + 1e-6), close to identity (random weights)."""

    def one(d):
        return NormStats(np.zeros(d), np.ones(d), -np.ones(d), np.ones(d))

    return {"state": one(state_dim), "actions": one(action_dim)}


def _check_kind(kind: str) -> None:
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")


def _quantiles(stats: NormStats) -> tuple[np.ndarray, np.ndarray]:
    if stats.q01 is None or stats.q99 is None:
        raise ValueError("quantile normalization needs q01 and q99 in norm_stats.json, which has only mean/std")
    return stats.q01, stats.q99


def normalize(x: np.ndarray, stats: NormStats, kind: str = "zscore") -> np.ndarray:
    """Normalize the last axis of x with the first x.shape[-1] entries of the stats."""
    _check_kind(kind)
    x = np.asarray(x)
    d = x.shape[-1]
    if d > stats.dim:
        raise ValueError(f"cannot normalize {d} dims with norm stats of {stats.dim} dims")
    if kind == "zscore":
        return (x - stats.mean[:d]) / (stats.std[:d] + EPS)
    q01, q99 = _quantiles(stats)
    return (x - q01[:d]) / (q99[:d] - q01[:d] + EPS) * 2.0 - 1.0


def unnormalize(x: np.ndarray, stats: NormStats, kind: str = "zscore") -> np.ndarray:
    """Inverse of `normalize`; dims beyond the stats keep mean 0 / std 1 (z-score) or pass through (quantile)."""
    _check_kind(kind)
    x = np.asarray(x)
    d = x.shape[-1]
    if kind == "zscore":
        mean = pad_to_dim(stats.mean, d, value=0.0)[:d]
        std = pad_to_dim(stats.std, d, value=1.0)[:d]
        return x * (std + EPS) + mean
    q01, q99 = _quantiles(stats)
    n = min(d, q01.shape[-1])
    head = (x[..., :n] + 1.0) / 2.0 * (q99[:n] - q01[:n] + EPS) + q01[:n]
    return np.concatenate([head, x[..., n:]], axis=-1)


def pad_to_dim(x: np.ndarray, dim: int, axis: int = -1, value: float = 0.0) -> np.ndarray:
    """Pad axis up to `dim` with `value`; an axis already at least `dim` long is returned unchanged."""
    x = np.asarray(x)
    missing = dim - x.shape[axis]
    if missing <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, missing)
    return np.pad(x, widths, constant_values=value)
