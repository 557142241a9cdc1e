"""scripts/ab_compare.py and pi0_triton_policy/ab.py on the CPU with the tiny model (pi0_tiny).

- in one process: torch vs jax on the same random weights, observations and noise agree within the float32
  tolerance and the report says PASS (through the CLI entry point, outputs checked);
- a deliberately perturbed weight on side B makes the verdict FAIL;
- over the wire: two scripts/serve_policy.py subprocesses (same seed -> same noise) on free loopback ports,
  replayed one stream: table, figure and JSON are written and the actions agree exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pi0_triton_policy import ab

# openpi-client 0.1.2 calls websockets.sync.client.connect() outside a `with`, which websockets >= 16 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def _check_outputs(out: Path, stdout: str) -> dict:
    for name in ("report.json", "report.md", "ab.png", "actions.npz"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert (out / "ab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert md.strip() in stdout  # the same table went to stdout
    for text in ("| side | n | p50 | p95 | p99 |", "| dim | max abs err | mean abs err |", "VERDICT:", "card: cpu", "commit:"):
        assert text in md, f"{text!r} not in the report"
    for side in ("A", "B"):
        lat = report["sides"][side]["latency_ms"]
        assert lat["n"] == report["meta"]["num_obs"] and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert len(report["per_dim"]["max_abs_err"]) == report["meta"]["action_shape"][1] == 14  # ALOHA: 14 dims
    return report


@pytest.mark.slow
def test_cli_torch_vs_jax_in_process_pass(tmp_path, capsys):
    out = tmp_path / "ab"
    rc = ab.main(["--a", "torch", "--b", "jax", "--variant", "pi0_tiny", "--device", "cpu", "--config", "pi0_aloha_sim",
                  "--num-obs", "2", "--warmup", "1", "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    print(stdout)
    report = _check_outputs(out, stdout)
    assert rc == 0
    assert report["verdict"] == "PASS" and "VERDICT: PASS" in stdout
    assert report["tolerance"]["value"] == ab.FLOAT32_TOL and "float32" in report["tolerance"]["why"]
    assert report["rel_err"]["max"] < 1e-4 and report["raw_rel_err"]["max"] < 1e-4
    assert report["sides"]["A"]["backend"] == "torch" and report["sides"]["B"]["backend"] == "jax"
    assert report["meta"]["card"] == "cpu" and "RANDOM (pi0_tiny, seed 0)" in report["meta"]["weights"]
    arrays = np.load(out / "actions.npz")
    assert arrays["actions_a"].shape == (2, 50, 14) and arrays["raw_a"].shape == (2, 50, 32)


@pytest.mark.slow
def test_perturbed_weight_fails(tmp_path):
    a, b, info = ab.build_backends("torch", "jax", variant="pi0_tiny", device="cpu", perturb_b=(ab.DEFAULT_PERTURB, 1e-2))
    assert info["perturbed_b"]["tensor"] == ab.DEFAULT_PERTURB
    report = ab.compare_backends(a, b, preset="pi0_aloha_sim", num_obs=1, warmup=0, device="cpu", progress=False, meta=info)
    md = ab.format_markdown(report)
    print(md)
    assert report["verdict"] == "FAIL" and "VERDICT: FAIL" in md and "deliberately perturbed" in md
    assert report["rel_err"]["max"] > 10 * ab.FLOAT32_TOL
    ab.write_outputs(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == "FAIL"


def test_perturb_params_touches_one_tensor_only():
    from pi0_triton_policy import weights as W
    from pi0_triton_policy.config import get_variant

    params = W.random_params(get_variant("pi0_tiny"), seed=0)
    p2 = ab.perturb_params(params, rel=1e-2)
    changed = [k for k in params if p2[k] is not params[k]]
    assert changed == [ab.DEFAULT_PERTURB]
    w, w2 = params[ab.DEFAULT_PERTURB], p2[ab.DEFAULT_PERTURB]
    rel = float((w2 - w).norm() / w.norm())
    assert 5e-3 < rel < 2e-2
    with pytest.raises(KeyError, match="no weight named"):
        ab.perturb_params(params, "nope/kernel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _servers(tmp_path: Path, n: int = 2):
    """n scripts/serve_policy.py subprocesses (torch, pi0_tiny, CPU, seed 0); always stopped on exit."""
    procs, logs, ports = [], [], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PI0_API_KEY", None)
    try:
        for i in range(n):
            port = _free_port()
            log = open(tmp_path / f"server_{i}.log", "w")
            cmd = [sys.executable, str(REPO / "scripts" / "serve_policy.py"), "--backend", "torch", "--variant", "pi0_tiny",
                   "--device", "cpu", "--host", HOST, "--port", str(port), "--seed", "0", "--latency-iters", "0"]
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
            logs.append(log)
            ports.append(port)
        yield ports
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()  # SIGTERM: the server shuts down cleanly
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for f in logs:
            f.close()
        for i in range(len(procs)):
            print(f"--- server {i} log (tail) ---")
            print("\n".join((tmp_path / f"server_{i}.log").read_text().splitlines()[-5:]))


@pytest.mark.slow
def test_over_the_wire_two_local_servers(tmp_path, capsys):
    out = tmp_path / "wire"
    with _servers(tmp_path) as (pa, pb):
        rc = ab.main(["--a-url", f"ws://{HOST}:{pa}", "--b-url", f"{HOST}:{pb}", "--config", "pi0_aloha_sim",
                      "--num-obs", "3", "--warmup", "1", "--same-noise", "--connect-timeout", "120",
                      "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    print(stdout)
    report = _check_outputs(out, stdout)
    assert rc == 0
    assert report["meta"]["mode"] == "wire" and "round trip" in stdout and "server p50" in stdout
    assert report["sides"]["A"]["url"] == f"ws://{HOST}:{pa}" and report["sides"]["B"]["url"] == f"ws://{HOST}:{pb}"
    assert report["sides"]["A"]["server_ms"]["n"] == 3
    # Two of our servers with one seed draw the same noise: the same observations give the same actions.
    assert report["verdict"] == "PASS" and report["rel_err"]["max"] < 1e-6
    assert "declared identical" in report["meta"]["noise"]

    # Without --same-noise the report refuses to call it, and says why.
    report["exact"] = False
    again = ab.summarize(
        {s: {"actions": list(np.load(out / "actions.npz")[f"actions_{s.lower()}"]), "latency_ms": [1.0], "model_ms": [1.0]}
         for s in ("A", "B")},
        {s: {"url": report["sides"][s]["url"], "backend": "server"} for s in ("A", "B")},
        1e-2, "test", {"mode": "wire", "card": "cpu", "noise": "differs"}, exact=False,
    )
    assert again["verdict"] == "NO VERDICT" and "same noise" in again["verdict_line"]


def test_bad_arguments():
    with pytest.raises(SystemExit):
        ab.main(["--a", "torch"])  # no --b
    with pytest.raises(SystemExit):
        ab.main(["--a-url", "ws://127.0.0.1:1"])  # no --b-url
    with pytest.raises(SystemExit):
        ab.main(["--a", "torch", "--b", "jax", "--variant", "pi0", "--device", "cpu"])  # full-size random on a CPU


def test_default_tolerance_says_which():
    assert ab.default_tolerance([ab.side_precision("torch", None), ab.side_precision("jax", "float32")]) == (
        ab.FLOAT32_TOL, "float32 tolerance (both sides float32)")
    tol, why = ab.default_tolerance([ab.side_precision("triton", None), ab.side_precision("jax", None)])
    assert tol == ab.BF16_TOL and "bf16" in why
    assert ab.default_tolerance([ab.side_precision("torch", "bfloat16"), "float32"])[0] == ab.BF16_TOL


def test_replay_reads_policy_records(tmp_path):
    from pi0_triton_policy.policy import make_example_observation
    from pi0_triton_policy.records import write_record

    sent = [make_example_observation("pi0_libero", rng=i) for i in range(3)]
    for i, obs in enumerate(sent):
        write_record(tmp_path, i, obs, {"actions": np.zeros((50, 7)), "policy_timing": {"infer_ms": 1.0}})
    got = ab.observation_stream("pi0_libero", None, replay_dir=tmp_path)
    assert len(got) == 3 and len(ab.observation_stream("pi0_libero", 2, replay_dir=tmp_path)) == 2
    for a, b in zip(sent, got):
        assert sorted(a) == sorted(b) and a["prompt"] == b["prompt"]
        np.testing.assert_array_equal(a["observation/image"], b["observation/image"])
