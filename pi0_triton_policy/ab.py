"""A/B runs: one observation stream into two backends (one process) or two servers (over the wire).

In one process (`compare_backends`): both sides are Pi0Policy objects over the same weights, the same
tokenizer and norm stats, and are given the same observations and the SAME explicit noise
(`Pi0Policy.infer(obs, noise=...)`), so their actions must agree up to numerics:
    per action dimension: max and mean |A - B| over all observations and horizon steps,
    per observation: ||A - B|| / ||B|| over the whole action chunk (B is the reference),
    latency per side: wall-clock of `policy.infer` (transforms + model), warm-up excluded,
    a verdict: PASS when the largest chunk relative error is <= the tolerance.
The model-space error (the backend's normalized [50, 32] output, before unnormalize and the robot
transform) is reported beside it.

Over the wire (`compare_servers`): the same observations go to two running servers, one request at a time
(A then B, never concurrently), and the client measures round trips. Servers draw their own noise, so
actions agree chunk by chunk only when both draw the same noise: two of OUR servers
(`scripts/serve_policy.py`) started with the same weights, `--seed`, `--latency-iters`, and serving only
this client since start-up do (Pi0Policy draws each call's noise from `np.random.default_rng(seed)`, and the
start-up warm-up draws the same number of times on both). OpenPI's own server draws from a JAX key, so
against it only the action distributions (per-dimension mean/std) are comparable.

Outputs: `format_markdown(report)` (stdout), `save_figure(report, path)` (latency CDFs, per-dimension
error bars, per-dimension action mean/std), `write_outputs(report, out_dir)` (report.json, report.md,
ab.png, actions.npz). The report is a plain JSON-able dict.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence

# JAX beside torch on one GPU: without this JAX grabs 75% of the card at start-up and torch runs out.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np

log = logging.getLogger(__name__)

BACKEND_NAMES = ("triton", "torch", "jax")
FLOAT32_TOL = 1e-4  # float32 vs float32 (torch vs jax): measured ~3e-6 on pi0_tiny
BF16_TOL = 1e-2  # a bf16 side (triton, or --X-dtype bfloat16): DESIGN.md puts bf16 paths at 1e-3..1e-2
DEFAULT_PERTURB = "action_out_proj/kernel"
REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Environment facts for the report
# ---------------------------------------------------------------------------------------------


def git_commit(repo_dir: str | os.PathLike = REPO_DIR) -> str | None:
    """Short commit of the checkout ("+dirty" when tracked files changed), or None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def card_name(device: str | None) -> str:
    """torch.cuda.get_device_name for a CUDA device, else "cpu"."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "jax", "triton"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


# ---------------------------------------------------------------------------------------------
# Tolerance
# ---------------------------------------------------------------------------------------------


def side_precision(backend: str, dtype: str | None) -> str:
    """"bfloat16" or "float32": what a side computes in (triton is always bf16)."""
    if backend == "triton":
        return "bfloat16"
    return "bfloat16" if dtype in ("bfloat16", "bf16") else "float32"


def default_tolerance(precisions: Sequence[str]) -> tuple[float, str]:
    """(tol, why): 1e-4 when every side is float32, 1e-2 when any side is bf16 (or fp16)."""
    if all(p == "float32" for p in precisions):
        return FLOAT32_TOL, "float32 tolerance (both sides float32)"
    return BF16_TOL, "bf16 tolerance (a bf16 side: " + " vs ".join(precisions) + ")"


# ---------------------------------------------------------------------------------------------
# Weights and backends (in-process mode)
# ---------------------------------------------------------------------------------------------

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _torch_dtype(name: str | None):
    if name is None:
        return None
    import torch

    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected float32 or bfloat16")
    return getattr(torch, _DTYPES[name])


def load_params(weights_dir=None, checkpoint_dir=None, variant: str = "pi0", seed: int = 0, device: str | None = None):
    """(cfg, canonical params, info): read ONCE and shared by both sides, so both get the very same weights.

    checkpoint_dir: the OpenPI checkpoint (Orbax or OpenPI's PyTorch export) read by
    `convert.read_openpi_checkpoint` (LoRA / training-state trees merged); the jax side gets it back as
    OpenPI's nested tree, torch/triton re-lay it out at load, as `load_backend` does.
    Neither: random weights for `variant` from `seed`, generated on `device` as `load_backend` does, so a
    server started with the same --variant/--seed/--device serves the same weights.
    """
    from pi0_triton_policy import weights as W
    from pi0_triton_policy.backends import default_device

    device = device or default_device()
    if weights_dir is not None and checkpoint_dir is not None:
        raise ValueError("give either --weights (converted) or --checkpoint-dir (OpenPI original), not both")
    if checkpoint_dir is not None:
        from pi0_triton_policy.convert import read_openpi_checkpoint

        cfg, params, info = read_openpi_checkpoint(checkpoint_dir)
        return cfg, params, {"weights": str(checkpoint_dir), "kind": "openpi-checkpoint", **info}
    if weights_dir is not None:
        cfg, params, manifest = W.load_weights(weights_dir)
        return cfg, params, {"weights": str(weights_dir), "kind": "converted", "sha256": manifest.get("sha256")}
    from pi0_triton_policy.config import get_variant

    cfg = get_variant(variant)
    gen_device = device if str(device).startswith("cuda") else "cpu"
    params = W.random_params(cfg, seed=seed, device=gen_device)
    return cfg, params, {"weights": f"RANDOM ({variant}, seed {seed})", "kind": "random"}


def perturb_params(params: dict, name: str = DEFAULT_PERTURB, rel: float = 1e-2, seed: int = 1234) -> dict:
    """A copy of `params` (other tensors shared, not copied) with `name` += rel * rms(w) * N(0, 1).

    For checking that the A/B verdict can fail: 1e-2 on action_out_proj/kernel moves the actions by ~1e-2
    relative, far outside the float32 tolerance.
    """
    import torch

    if name not in params:
        close = sorted(k for k in params if name.split("/")[0] in k)[:5]
        raise KeyError(f"no weight named {name!r} to perturb; similar: {close or sorted(params)[:5]}")
    w = params[name]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device)
    rms = w.float().pow(2).mean().sqrt()
    out = dict(params)
    out[name] = (w.float() + rel * rms * noise).to(w.dtype)
    return out


def _parse_perturb(spec: str | None) -> tuple[str, float] | None:
    """"NAME[=REL]" -> (name, rel); "" or "default" -> (DEFAULT_PERTURB, 1e-2)."""
    if spec is None:
        return None
    name, _, rel = spec.partition("=")
    return (name if name and name != "default" else DEFAULT_PERTURB), (float(rel) if rel else 1e-2)


def build_backends(
    a: str,
    b: str,
    weights_dir=None,
    checkpoint_dir=None,
    variant: str = "pi0",
    seed: int = 0,
    device: str | None = None,
    a_dtype: str | None = None,
    b_dtype: str | None = None,
    perturb_b: tuple[str, float] | None = None,
    action_horizon: int | None = None,
):
    """(backend_a, backend_b, info) over ONE weight set (read or generated once, make_backend twice).

    `perturb_b=(name, rel)` perturbs one tensor on side B only (see `perturb_params`).
    `action_horizon` overrides the model's number of action tokens on both sides (OpenPI's pi0_droid uses 10).
    """
    from pi0_triton_policy.backends import default_device, make_backend

    for n in (a, b):
        if n not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {n!r}; expected one of {', '.join(BACKEND_NAMES)}")
    device = device or default_device()
    t0 = time.perf_counter()
    cfg, params, info = load_params(weights_dir, checkpoint_dir, variant, seed, device)
    if action_horizon is not None and action_horizon != cfg.action_horizon:
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be >= 1, got {action_horizon}")
        cfg = dataclasses.replace(cfg, action_horizon=action_horizon)
    info = {**info, "variant": cfg.name, "load_s": round(time.perf_counter() - t0, 2)}
    backend_a = make_backend(a, cfg, params, device=device, dtype=_torch_dtype(a_dtype))
    params_b = params
    if perturb_b is not None:
        params_b = perturb_params(params, *perturb_b)
        info["perturbed_b"] = {"tensor": perturb_b[0], "rel": perturb_b[1]}
        log.warning("side B has a DELIBERATELY perturbed weight: %s (rel %g)", *perturb_b)
    backend_b = make_backend(b, cfg, params_b, device=device, dtype=_torch_dtype(b_dtype))
    del params, params_b
    _free_cuda(device)
    info["build_s"] = round(time.perf_counter() - t0, 2)
    return backend_a, backend_b, info


def _free_cuda(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def describe_backend(backend, dtype: str | None = None, device: str | None = None) -> dict:
    """{"backend", "precision", "device"} for the report."""
    name = getattr(backend, "backend_name", type(backend).__name__)
    if name == "jax":
        import jax

        dev = jax.devices()[0]
        where = f"{dev.platform}:{dev.id} ({getattr(dev, 'device_kind', dev.platform)})"
    else:
        where = str(getattr(backend, "device", device or "?"))
    return {"backend": name, "precision": backend_precision(backend, dtype), "device": where}


def backend_precision(backend, dtype: str | None = None) -> str:
    """What a built backend computes in, read from its `dtype` (torch or jax dtype) when it has one."""
    text = str(getattr(backend, "dtype", ""))
    for p in ("bfloat16", "float16", "float32"):
        if p in text:
            return p
    return side_precision(getattr(backend, "backend_name", "?"), dtype)


# ---------------------------------------------------------------------------------------------
# Observations and noise
# ---------------------------------------------------------------------------------------------


def observation_stream(preset: str, num_obs: int | None = None, seed: int = 0, replay_dir=None) -> list[dict]:
    """Example observations for `preset` (num_obs of them, default 20) or the inputs of an OpenPI
    `policy_records/` directory (all of them, or the first num_obs)."""
    if replay_dir is not None:
        from pi0_triton_policy.records import iter_records

        obs = []
        for rec in iter_records(replay_dir):
            if num_obs is not None and len(obs) >= num_obs:
                break
            obs.append(rec.inputs)
        if not obs:
            raise FileNotFoundError(f"no step_<N>.npy records in {str(replay_dir)!r}")
        return obs
    from pi0_triton_policy.policy import make_example_observation

    rng = np.random.default_rng(seed)
    return [make_example_observation(preset, rng=rng) for _ in range(20 if num_obs is None else num_obs)]


def noise_stream(n: int, horizon: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    """n standard-normal [horizon, dim] float32 arrays (the flow's x at t=1), one per observation."""
    rng = np.random.default_rng([seed, 0x4E015E])  # independent of the observation stream's rng
    return [rng.standard_normal((horizon, dim), dtype=np.float32) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, unit="obs", file=sys.stderr)
    except ImportError:  # the GPU machine may lack tqdm
        return _PlainProgress(total, desc, enabled)


class _PlainProgress:
    def __init__(self, total, desc, enabled):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0

    def update(self, k=1):
        self.n += k
        if self.enabled and (self.n == self.total or self.n % max(1, self.total // 10) == 0):
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# In-process comparison
# ---------------------------------------------------------------------------------------------


class _Tap:
    """Passes calls through to a backend and keeps its last raw (normalized, model-space) output."""

    def __init__(self, backend):
        self.backend = backend
        self.cfg = backend.cfg
        self.backend_name = getattr(backend, "backend_name", "?")
        self.last: np.ndarray | None = None

    def sample_actions(self, *args, **kwargs):
        out = self.backend.sample_actions(*args, **kwargs)
        self.last = np.array(out, dtype=np.float32, copy=True)
        return out


def make_policies(preset: str, backend_a, backend_b, weights_dir=None, num_steps: int = 10, default_prompt: str | None = None):
    """Two Pi0Policy objects sharing ONE tokenizer and ONE set of norm stats, over tapped backends."""
    from pi0_triton_policy.policy import Pi0Policy, create_policy

    pa = create_policy(preset, _Tap(backend_a), weights_dir=weights_dir, num_steps=num_steps, default_prompt=default_prompt)
    pb = Pi0Policy(_Tap(backend_b), pa.preset, norm_stats=pa.norm_stats, tokenizer=pa.tokenizer,
                   default_prompt=default_prompt, num_steps=num_steps)
    return pa, pb


def compare_backends(
    backend_a,
    backend_b,
    preset: str = "pi0_aloha_sim",
    observations: Sequence[dict] | None = None,
    num_obs: int | None = None,
    seed: int = 0,
    warmup: int = 2,
    tol: float | None = None,
    weights_dir=None,
    num_steps: int = 10,
    progress: bool = True,
    a_dtype: str | None = None,
    b_dtype: str | None = None,
    device: str | None = None,
    meta: dict | None = None,
) -> dict:
    """Run the same observations and noise through two backends; returns the report dict (see module doc)."""
    ca, cb = backend_a.cfg, backend_b.cfg
    if (ca.action_horizon, ca.action_dim) != (cb.action_horizon, cb.action_dim):
        raise ValueError(f"the two backends make different action chunks: {ca.action_horizon}x{ca.action_dim} vs "
                         f"{cb.action_horizon}x{cb.action_dim}")
    observations = list(observations) if observations is not None else observation_stream(preset, num_obs, seed)
    noises = noise_stream(len(observations), ca.action_horizon, ca.action_dim, seed)
    pa, pb = make_policies(preset, backend_a, backend_b, weights_dir=weights_dir, num_steps=num_steps)
    sides = [("A", pa, describe_backend(backend_a, a_dtype, device)), ("B", pb, describe_backend(backend_b, b_dtype, device))]

    # Warm-up (JIT compile, autotune, CUDA graph capture) on the first observation; not timed.
    warm_s = {}
    for label, pol, _ in sides:
        t0 = time.perf_counter()
        for _ in range(warmup):
            pol.infer(copy.deepcopy(observations[0]), noise=noises[0])
        warm_s[label] = round(time.perf_counter() - t0, 3)

    rec = {label: {"actions": [], "raw": [], "latency_ms": [], "model_ms": []} for label, _, _ in sides}
    bar = _progress(len(observations), "A/B", progress)
    try:
        for obs, noise in zip(observations, noises):
            for label, pol, _ in sides:  # A then B on each observation
                o = copy.deepcopy(obs)  # neither side can see what the other did to its input
                t0 = time.perf_counter()
                out = pol.infer(o, noise=noise)  # numpy out: the device work is finished
                ms = (time.perf_counter() - t0) * 1e3
                r = rec[label]
                r["actions"].append(np.asarray(out["actions"], np.float64))
                r["raw"].append(pol.backend.last)
                r["latency_ms"].append(ms)
                r["model_ms"].append(float(out.get("policy_timing", {}).get("infer_ms", float("nan"))))
            bar.update(1)
            errs = [_rel(x, y) for x, y in zip(rec["A"]["actions"], rec["B"]["actions"])]
            bar.set_postfix_str(f"max rel err {max(errs):.1e}")
    finally:
        bar.close()

    precisions = [s[2]["precision"] for s in sides]
    tol_why = "given (--tol)"
    if tol is None:
        tol, tol_why = default_tolerance(precisions)
    side_info = {label: {**desc, "warmup_calls": warmup, "warmup_s": warm_s[label]} for label, _, desc in sides}
    m = {
        "mode": "in-process",
        "preset": pa.preset.name,
        "num_steps": num_steps,
        "seed": seed,
        "card": card_name(device),
        "noise": "identical: the same explicit noise array goes to both sides for each observation (Pi0Policy.infer(obs, noise=...))",
        **(meta or {}),
    }
    return summarize(rec, side_info, tol, tol_why, m, exact=True)


# ---------------------------------------------------------------------------------------------
# Over the wire
# ---------------------------------------------------------------------------------------------


def _normalize_url(url: str) -> str:
    return url if url.startswith(("ws://", "wss://")) else "ws://" + url


def connect(url: str, api_key: str | None = None, timeout_s: float = 60.0):
    """An openpi_client WebsocketClientPolicy for `url`, retrying while the server is still starting."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    url = _normalize_url(url)
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or (443 if parts.scheme == "wss" else 80)
    deadline = time.monotonic() + timeout_s
    while True:  # probe the port first: openpi_client logs every failed attempt
        try:
            socket.create_connection((host, port), timeout=5).close()
            break
        except OSError as e:  # refused while the server warms up (our server opens its port after the warm-up)
            if time.monotonic() >= deadline:
                raise ConnectionError(f"no policy server answered at {url} within {timeout_s:.0f} s ({e}); "
                                      f"start one with scripts/serve_policy.py --port N") from e
            time.sleep(0.5)
    return WebsocketClientPolicy(url, api_key=api_key)


def _close(client) -> None:
    ws = getattr(client, "_ws", None)  # openpi_client keeps the connection here and has no close()
    if ws is not None:
        try:
            ws.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


def compare_servers(
    a_url: str,
    b_url: str,
    observations: Sequence[dict],
    warmup: int = 1,
    tol: float | None = None,
    same_noise: bool = False,
    api_key: str | None = None,
    connect_timeout_s: float = 60.0,
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Replay `observations` to two running servers, one request at a time; returns the report dict."""
    observations = list(observations)
    clients = {}
    try:
        for label, url in (("A", a_url), ("B", b_url)):
            clients[label] = connect(url, api_key=api_key, timeout_s=connect_timeout_s)
        side_info = {
            label: {"url": _normalize_url(url), "backend": "server", "server_metadata": _jsonable(clients[label].get_server_metadata()),
                    "warmup_calls": warmup}
            for label, url in (("A", a_url), ("B", b_url))
        }
        for label, c in clients.items():
            t0 = time.perf_counter()
            for _ in range(warmup):
                c.infer(observations[0])
            side_info[label]["warmup_s"] = round(time.perf_counter() - t0, 3)

        rec = {label: {"actions": [], "raw": None, "latency_ms": [], "model_ms": [], "server_ms": []} for label in clients}
        bar = _progress(len(observations), "A/B wire", progress)
        try:
            for obs in observations:
                for label, c in clients.items():  # sequential, so one server's work never slows the other's
                    t0 = time.perf_counter()
                    out = c.infer(obs)
                    ms = (time.perf_counter() - t0) * 1e3
                    r = rec[label]
                    r["actions"].append(np.asarray(out["actions"], np.float64))
                    r["latency_ms"].append(ms)
                    r["model_ms"].append(float(out.get("policy_timing", {}).get("infer_ms", float("nan"))))
                    r["server_ms"].append(float(out.get("server_timing", {}).get("infer_ms", float("nan"))))
                bar.update(1)
        finally:
            bar.close()
    finally:
        for c in clients.values():
            _close(c)

    shapes = {label: rec[label]["actions"][0].shape for label in rec}
    if shapes["A"] != shapes["B"]:
        raise ValueError(f"the servers answer differently shaped action chunks: A {shapes['A']} vs B {shapes['B']}; "
                         "serve the same preset on both")
    tol_why = "given (--tol)"
    if tol is None:
        tol, tol_why = BF16_TOL, "bf16 tolerance (the servers' precision is not visible over the wire; pass --tol)"
    if same_noise:
        noise = ("declared identical (--same-noise): two of our servers with the same weights, --seed and --latency-iters, "
                 "serving only this client since start-up, draw the same noise sequence, so actions compare chunk by chunk")
    else:
        noise = ("NOT identical: each server draws its own noise, so the errors below measure noise, not numerics; "
                 "compare the per-dimension mean/std (distributions) and the latencies. For an exact comparison start two "
                 "of our servers with the same weights, --seed and --latency-iters and pass --same-noise")
    m = {
        "mode": "wire",
        "card": card_name(None) + " (this client; the servers' cards are in their start-up logs)",
        "noise": noise,
        **(meta or {}),
    }
    return summarize(rec, side_info, tol, tol_why, m, exact=same_noise)


def _jsonable(x):
    try:
        return json.loads(json.dumps(x, default=lambda o: np.asarray(o).tolist()))
    except (TypeError, ValueError):
        return repr(x)


# ---------------------------------------------------------------------------------------------
# Statistics and verdict
# ---------------------------------------------------------------------------------------------


def _rel(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    num, den = np.linalg.norm(out - ref), np.linalg.norm(ref)
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return float(num / den)


def latency_stats(ms: Sequence[float]) -> dict:
    x = np.asarray([v for v in ms if np.isfinite(v)], np.float64)
    if x.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(x, [50, 95, 99])
    return {"n": int(x.size), "p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(x.mean()),
            "min": float(x.min()), "max": float(x.max())}


def summarize(rec: dict, side_info: dict, tol: float, tol_why: str, meta: dict, exact: bool) -> dict:
    """Per-dimension errors, chunk relative errors, latency percentiles and the verdict, as a JSON-able dict."""
    A = np.stack(rec["A"]["actions"])  # [N, H, d]
    B = np.stack(rec["B"]["actions"])
    diff = np.abs(A - B)
    rel = [_rel(a, b) for a, b in zip(A, B)]
    finite = bool(np.isfinite(A).all() and np.isfinite(B).all())
    worst = max(rel) if rel else math.nan
    if exact:
        ok = finite and worst <= tol
        verdict = "PASS" if ok else "FAIL"
        why = (f"max relative error {worst:.2e} {'<=' if worst <= tol else '>'} tolerance {tol:.0e} ({tol_why})"
               + ("" if finite else "; NON-FINITE actions"))
    else:
        verdict = "NO VERDICT"
        why = f"noise differs between the servers, so no exact comparison (max relative error {worst:.2e} is noise)"
        if finite and worst <= tol:
            why += "; yet the chunks agree within tolerance, so the servers evidently drew the same noise (pass --same-noise)"

    raw = None
    if rec["A"].get("raw") and rec["B"].get("raw"):
        raw_rel = [_rel(a, b) for a, b in zip(rec["A"]["raw"], rec["B"]["raw"])]
        raw = {"rel_err": raw_rel, "mean": float(np.mean(raw_rel)), "max": float(np.max(raw_rel))}

    sides = {}
    for label in ("A", "B"):
        r = rec[label]
        acts = np.stack(r["actions"])
        sides[label] = {
            **side_info[label],
            "latency_ms": latency_stats(r["latency_ms"]),
            "model_ms": latency_stats(r["model_ms"]),
            **({"server_ms": latency_stats(r["server_ms"])} if r.get("server_ms") else {}),
            "samples_ms": {"latency": [float(v) for v in r["latency_ms"]], "model": [float(v) for v in r["model_ms"]],
                           **({"server": [float(v) for v in r["server_ms"]]} if r.get("server_ms") else {})},
            "action_mean": acts.mean(axis=(0, 1)).tolist(),
            "action_std": acts.std(axis=(0, 1)).tolist(),
        }
    report = {
        "meta": {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "commit": git_commit(),
            "versions": _versions(),
            "num_obs": int(A.shape[0]),
            "action_shape": list(A.shape[1:]),
            **meta,
        },
        "verdict": verdict,
        "verdict_line": f"VERDICT: {verdict} - {why}",
        "exact": exact,
        "tolerance": {"value": tol, "why": tol_why, "metric": "max over observations of ||A - B|| / ||B|| on the robot action chunk"},
        "rel_err": {"per_obs": rel, "mean": float(np.mean(rel)), "max": float(worst)},
        "raw_rel_err": raw,
        "per_dim": {
            "max_abs_err": diff.max(axis=(0, 1)).tolist(),
            "mean_abs_err": diff.mean(axis=(0, 1)).tolist(),
        },
        "sides": sides,
    }
    report["_arrays"] = {"actions_a": A, "actions_b": B}
    if raw is not None:
        report["_arrays"].update(raw_a=np.stack(rec["A"]["raw"]), raw_b=np.stack(rec["B"]["raw"]))
    return report


# ---------------------------------------------------------------------------------------------
# Markdown, figure, files
# ---------------------------------------------------------------------------------------------


def _side_name(label: str, s: dict) -> str:
    if s.get("url"):
        return f"{label}: {s['url']}"
    return f"{label}: {s['backend']} ({s['precision']}, {s['device']})"


def _fmt_ms(st: dict, key: str) -> str:
    return f"{st[key]:.2f}" if st.get("n") else "-"


def format_markdown(report: dict) -> str:
    m, sides = report["meta"], report["sides"]
    wire = m["mode"] == "wire"
    lines = [
        f"# A/B: {_side_name('A', sides['A'])} vs {_side_name('B', sides['B'])}",
        "",
        f"- mode: {m['mode']}; observations: {m['num_obs']} ({m.get('observations', 'generated')}); "
        f"action chunk {'x'.join(map(str, m['action_shape']))}" + (f"; preset `{m['preset']}`" if m.get("preset") else ""),
        f"- card: {m['card']}; commit: {m.get('commit') or 'unknown'}; host: {m['host']}; {m['time']}",
    ]
    if m.get("weights"):
        lines.append(f"- weights: {m['weights']}")
    if m.get("perturbed_b"):
        lines.append(f"- **side B deliberately perturbed**: {m['perturbed_b']['tensor']} (rel {m['perturbed_b']['rel']:g})")
    lines += [f"- noise: {m['noise']}", ""]

    kind = "round trip" if wire else "policy.infer"
    lines += [
        f"## Latency (ms, {kind}; warm-up excluded)",
        "",
        "| side | n | p50 | p95 | p99 | mean | min | max | model p50 |" + (" server p50 |" if wire else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if wire else ""),
    ]
    for label in ("A", "B"):
        s = sides[label]
        st, mo = s["latency_ms"], s["model_ms"]
        row = (f"| {_side_name(label, s)} | {st.get('n', 0)} | {_fmt_ms(st, 'p50')} | {_fmt_ms(st, 'p95')} | {_fmt_ms(st, 'p99')} | "
               f"{_fmt_ms(st, 'mean')} | {_fmt_ms(st, 'min')} | {_fmt_ms(st, 'max')} | {_fmt_ms(mo, 'p50')} |")
        if wire:
            row += f" {_fmt_ms(s.get('server_ms', {}), 'p50')} |"
        lines.append(row)
    a50, b50 = sides["A"]["latency_ms"].get("p50"), sides["B"]["latency_ms"].get("p50")
    if a50 and b50:
        lines.append(f"\np50 ratio B/A: {b50 / a50:.2f}x")
    lines.append("")

    re_ = report["rel_err"]
    lines += [
        "## Actions (B is the reference)",
        "",
        f"relative error per action chunk ||A-B||/||B||: mean {re_['mean']:.2e}, max {re_['max']:.2e}"
        + ("" if report["exact"] else " (noise differs: not a numerics measurement)"),
    ]
    if report.get("raw_rel_err"):
        r = report["raw_rel_err"]
        lines.append(f"model space (backend's normalized [H, 32] output): mean {r['mean']:.2e}, max {r['max']:.2e}")
    lines += [
        "",
        "| dim | max abs err | mean abs err | A mean | A std | B mean | B std |",
        "|---|---|---|---|---|---|---|",
    ]
    pd = report["per_dim"]
    for d in range(len(pd["max_abs_err"])):
        lines.append(
            f"| {d} | {pd['max_abs_err'][d]:.2e} | {pd['mean_abs_err'][d]:.2e} | {sides['A']['action_mean'][d]:+.4f} | "
            f"{sides['A']['action_std'][d]:.4f} | {sides['B']['action_mean'][d]:+.4f} | {sides['B']['action_std'][d]:.4f} |"
        )
    lines += ["", f"**{report['verdict_line']}**", ""]
    return "\n".join(lines)


def save_figure(report: dict, path: str | os.PathLike) -> pathlib.Path | None:
    """Latency CDFs, per-dimension |A-B| (mean bar, whisker to max), per-dimension action mean +- std.
    Returns None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no figure (pip install matplotlib, then re-render with --from-json)")
        return None
    m, sides = report["meta"], report["sides"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {"A": "tab:blue", "B": "tab:orange"}

    ax = axes[0]
    for label in ("A", "B"):
        x = _finite_sorted(sides[label]["samples_ms"]["latency"])
        if x.size:
            ax.step(np.r_[x[0], x], np.arange(x.size + 1) / x.size, where="post", color=colors[label],
                    label=_side_name(label, sides[label]))
        srv = _finite_sorted(sides[label]["samples_ms"].get("server", []))
        if srv.size:
            ax.step(np.r_[srv[0], srv], np.arange(srv.size + 1) / srv.size, where="post", color=colors[label], ls="--",
                    label=f"{label}: server infer")
    ax.set_xlabel("round trip (ms)" if m["mode"] == "wire" else "policy.infer (ms)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("latency CDF (warm-up excluded)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[1]
    mx, mean = np.asarray(report["per_dim"]["max_abs_err"]), np.asarray(report["per_dim"]["mean_abs_err"])
    dims = np.arange(mx.size)
    ax.bar(dims, mean, color="tab:gray", label="mean |A-B|")
    ax.errorbar(dims, mean, yerr=[np.zeros_like(mean), mx - mean], fmt="none", ecolor="black", capsize=3, label="max |A-B|")
    if (mean > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("action dimension")
    ax.set_ylabel("absolute error")
    ax.set_title(f"per-dimension |A-B| ({report['verdict']}, max rel {report['rel_err']['max']:.1e})")
    ax.set_xticks(dims)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)

    ax = axes[2]
    for k, label in enumerate(("A", "B")):
        mu, sd = np.asarray(sides[label]["action_mean"]), np.asarray(sides[label]["action_std"])
        ax.errorbar(dims + (k - 0.5) * 0.3, mu, yerr=sd, fmt="o", ms=3, capsize=2, color=colors[label], label=f"{label} mean +- std")
    ax.set_xlabel("action dimension")
    ax.set_title("action distribution per dimension")
    ax.set_xticks(dims)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    fig.suptitle(f"A/B {m['mode']}: {_side_name('A', sides['A'])} vs {_side_name('B', sides['B'])} | {m['card']} | "
                 f"commit {m.get('commit') or '?'} | {m['num_obs']} obs", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite_sorted(values) -> np.ndarray:
    x = np.asarray(values, np.float64)
    return np.sort(x[np.isfinite(x)])


def default_out_dir() -> pathlib.Path:
    return REPO_DIR / "benchmarks" / "ab" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_outputs(report: dict, out_dir: str | os.PathLike) -> dict[str, str]:
    """report.json (machines), report.md (the stdout table), ab.png (figure), actions.npz (raw chunks)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig = save_figure(report, out / "ab.png")
    if fig is not None:
        paths["figure"] = str(fig)
    arrays = report.get("_arrays")
    if arrays:
        np.savez_compressed(out / "actions.npz", **arrays)
        paths["actions"] = str(out / "actions.npz")
    (out / "report.md").write_text(format_markdown(report) + "\n")
    paths["markdown"] = str(out / "report.md")
    paths["json"] = str(out / "report.json")
    report["meta"]["outputs"] = paths
    (out / "report.json").write_text(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=2, default=_json_default) + "\n")
    return paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def load_report(path: str | os.PathLike) -> dict:
    """A report.json (or its directory) back as a report dict, for re-rendering the table and figure."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "report.json"
    return json.loads(p.read_text())


# ---------------------------------------------------------------------------------------------
# Command line (scripts/ab_compare.py)
# ---------------------------------------------------------------------------------------------


def build_arg_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="ab_compare.py",
        description="A/B two Pi0 backends in one process (--a/--b) or two running servers (--a-url/--b-url) on one "
        "observation stream: per-dimension action errors, chunk relative error, latency percentiles, a PASS/FAIL verdict.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("in-process mode")
    g.add_argument("--a", choices=BACKEND_NAMES, help="backend for side A")
    g.add_argument("--b", choices=BACKEND_NAMES, help="backend for side B (the reference for relative errors)")
    g.add_argument("--weights", help="converted weights directory (scripts/convert_checkpoint.py output)")
    g.add_argument("--checkpoint-dir", help="original OpenPI checkpoint (params/ + assets/), read once for both sides")
    g.add_argument("--variant", default="pi0", help="model variant for random weights (pi0, pi0_dummy, pi0_tiny)")
    g.add_argument("--device", help="torch device for torch/triton (default: cuda if available); jax uses its default device")
    g.add_argument("--a-dtype", choices=sorted(_DTYPES), help="compute dtype of side A (torch/jax; default float32; triton is bf16)")
    g.add_argument("--b-dtype", choices=sorted(_DTYPES), help="compute dtype of side B")
    g.add_argument("--num-steps", type=int, default=10, help="flow-matching steps")
    g.add_argument("--action-horizon", type=int, help="action tokens in the model (default: the weights' 50; OpenPI's pi0_droid uses 10)")
    g.add_argument("--perturb-b", nargs="?", const="default", metavar="NAME[=REL]",
                   help=f"deliberately perturb one weight on side B (default {DEFAULT_PERTURB}=0.01) to see the verdict fail")
    g = p.add_argument_group("over-the-wire mode")
    g.add_argument("--a-url", help="ws://host:port of server A")
    g.add_argument("--b-url", help="ws://host:port of server B")
    g.add_argument("--same-noise", action="store_true",
                   help="declare that both servers draw the same noise (two of ours, same weights/--seed/--latency-iters, "
                   "fresh): then the verdict applies")
    g.add_argument("--api-key", help="Api-Key sent to both servers")
    g.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to keep retrying a server that is still starting")
    g = p.add_argument_group("observations and output")
    g.add_argument("--config", default="pi0_aloha_sim", help="policy preset (configs/*.toml): robot transform, norm stats, example observations")
    g.add_argument("--num-obs", type=int, help="observations (default 20 generated, or every record with --replay)")
    g.add_argument("--replay", metavar="DIR", help="replay the inputs of an OpenPI policy_records/ directory")
    g.add_argument("--seed", type=int, default=0, help="seed for observations, noise and random weights")
    g.add_argument("--warmup", type=int, default=2, help="untimed calls per side before measuring")
    g.add_argument("--tol", type=float, help=f"tolerance on max chunk relative error (default {FLOAT32_TOL:g} float32 vs float32, "
                   f"{BF16_TOL:g} with a bf16/triton side or over the wire)")
    g.add_argument("--out", help="output directory (default benchmarks/ab/<timestamp>/)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--commit", help="commit to print in the report when this copy has no .git (default: git rev-parse)")
    g.add_argument("--from-json", metavar="PATH", help="only re-render report.md/ab.png from an earlier report.json (or its dir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0 PASS (or no verdict), 1 FAIL, 2 bad arguments."""
    p = build_arg_parser()
    args = p.parse_args(argv)
    if args.from_json:
        report = load_report(args.from_json)
        out = pathlib.Path(args.out) if args.out else pathlib.Path(args.from_json if os.path.isdir(args.from_json) else os.path.dirname(args.from_json))
        save_figure(report, out / "ab.png")
        md = format_markdown(report)
        (out / "report.md").write_text(md + "\n")
        print(md)
        return 0

    wire = args.a_url is not None or args.b_url is not None
    if wire:
        if not (args.a_url and args.b_url):
            p.error("over the wire needs both --a-url and --b-url")
        if args.a or args.b:
            p.error("give either --a/--b (in-process) or --a-url/--b-url (over the wire), not both")
    elif not (args.a and args.b):
        p.error("give --a and --b (in-process backends), or --a-url and --b-url (running servers)")

    observations = observation_stream(args.config, args.num_obs, args.seed, args.replay)
    src = f"replayed from {args.replay}" if args.replay else f"generated for preset {args.config}, seed {args.seed}"
    if wire:
        report = compare_servers(
            args.a_url, args.b_url, observations, warmup=args.warmup, tol=args.tol, same_noise=args.same_noise,
            api_key=args.api_key, connect_timeout_s=args.connect_timeout, progress=not args.no_progress,
            meta={"observations": src, "preset_of_observations": args.config},
        )
    else:
        from pi0_triton_policy.backends import default_device

        device = args.device or default_device()
        random_weights = args.weights is None and args.checkpoint_dir is None
        if random_weights and args.variant == "pi0" and not str(device).startswith("cuda"):
            p.error(f"random full-size pi0 weights on {device!r} would take minutes a call and ~40 GB of memory; "
                    "on a CPU pass --variant pi0_tiny (or pi0_dummy), or give --weights/--checkpoint-dir")
        perturb = _parse_perturb(args.perturb_b)
        backend_a, backend_b, info = build_backends(
            args.a, args.b, weights_dir=args.weights, checkpoint_dir=args.checkpoint_dir, variant=args.variant, seed=args.seed,
            device=device, a_dtype=args.a_dtype, b_dtype=args.b_dtype, perturb_b=perturb, action_horizon=args.action_horizon,
        )
        report = compare_backends(
            backend_a, backend_b, preset=args.config, observations=observations, seed=args.seed, warmup=args.warmup,
            tol=args.tol, weights_dir=args.weights or args.checkpoint_dir, num_steps=args.num_steps,
            progress=not args.no_progress, a_dtype=args.a_dtype, b_dtype=args.b_dtype, device=device,
            meta={"observations": src, **info},
        )
    if args.commit:
        report["meta"]["commit"] = args.commit
    out = pathlib.Path(args.out) if args.out else default_out_dir()
    write_outputs(report, out)
    print(format_markdown(report))
    print(f"wrote {out}/report.md, report.json" + (", ab.png" if "figure" in report["meta"]["outputs"] else " (no figure)")
          + ", actions.npz" * ("actions" in report["meta"]["outputs"]))
    return 1 if report["verdict"] == "FAIL" else 0


__all__ = [
    "build_backends", "compare_backends", "compare_servers", "format_markdown", "load_params", "main",
    "observation_stream", "noise_stream", "perturb_params", "save_figure", "write_outputs",
]
