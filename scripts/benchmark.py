"""Benchmark the backends on random full-size Pi0 weights (no checkpoint needed).

Prints a table backend x cameras (1, 2, 3) -> median / p99 ms over --runs calls after warm-up, achieved
TFLOP/s and GB/s, the hardware floor (FLOPs / 700 TFLOP/s and weight bytes / 3.0 TB/s, per phase),
peak GPU memory, warm-up/capture time, card and commit; writes the same as JSON beside the table.

    python scripts/benchmark.py                          # triton + torch (eager, bf16)
    python scripts/benchmark.py --model_type triton      # the original project's spelling
    python scripts/benchmark.py --backends triton torch --compile --runs 200 --json out.json
    python scripts/benchmark.py --check                   # also: triton vs float32 torch accuracy + determinism

Commit: $PI0_COMMIT if set, else `git rev-parse HEAD`; beside it the digest of the sources that ran (`--digest` prints
the same for a checkout), since a copied working tree can carry a stale .git.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from pi0_triton_policy.config import get_variant

PEAK_TFLOPS, PEAK_TBPS = 700.0, 3.0  # DESIGN.md "Performance" floor rates (H100, bf16)


def commit() -> str:
    if os.environ.get("PI0_COMMIT"):  # the device copy of the tree has no (or a stale) .git: the caller says
        return os.environ["PI0_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).decode().strip()
    except Exception:
        return os.environ.get("PI0_COMMIT", "unknown")


SOURCE_DIRS = ("pi0_triton_policy", "kernels", "scripts", "configs")


def source_digest(root: str | None = None) -> str:
    """sha1 (12 hex) over the paths and bytes of the engine's sources (*.py, *.json, *.yaml under SOURCE_DIRS): what
    ran, whatever the copy's .git says; `--digest` on a checkout gives the value to match."""
    import hashlib

    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for top in SOURCE_DIRS:
        for dirpath, dirnames, files in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".json", ".yaml")):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
                    with open(path, "rb") as f:
                        h.update(f.read() + b"\0")
    return h.hexdigest()[:12]


def work(cfg, views: int, prompt: int = 48, steps: int = 10) -> dict:
    """FLOPs and weight bytes (bf16) per phase for one call with `views` cameras computed."""
    v, p, a = cfg.vision, cfg.prefix, cfg.action
    P, W, F = v.num_patches, v.width, v.mlp_dim
    M = views * P
    vis_f = 2 * M * 588 * W + v.depth * (2 * M * (4 * W * W + 2 * W * F) + 4 * views * P * P * W) + 2 * M * W * p.width
    vis_b = 2 * (v.depth * (4 * W * W + 2 * W * F) + W * p.width)

    def gemma_layer(g, rows):
        nq = g.num_heads * g.head_dim
        return g.width * (nq + 2 * g.head_dim) + nq * g.width + 3 * g.width * g.mlp_dim, rows

    T = M + prompt
    qkv = p.width * (p.num_heads * p.head_dim + 2 * p.head_dim)
    full, _ = gemma_layer(p, T)
    pre_f = 2 * T * (full * (p.depth - 1) + qkv) + (p.depth - 1) * 4 * T * T * p.num_heads * p.head_dim
    pre_b = 2 * (full * (p.depth - 1) + qkv)
    fa, _ = gemma_layer(a, 0)
    R = cfg.action_horizon
    act_f = steps * (a.depth * (2 * (R + 1) * fa + 4 * (R + 1) * (T + R + 1) * a.num_heads * a.head_dim) + 2 * R * a.width * a.width)
    act_b = steps * (2 * a.depth * fa + 4 * a.width * a.width)
    phases = {"vision": (vis_f, vis_b), "prefix": (pre_f, pre_b), "action": (act_f, act_b)}
    floor_ms = sum(max(f / (PEAK_TFLOPS * 1e12), b / (PEAK_TBPS * 1e12)) for f, b in phases.values()) * 1e3
    return {"flops": sum(f for f, _ in phases.values()), "bytes": sum(b for _, b in phases.values()),
            "floor_ms": floor_ms, "phases": {k: {"flops": f, "bytes": b} for k, (f, b) in phases.items()}}


def inputs(cfg, views: int, prompt: int, seed: int, batch=False):
    rng = np.random.default_rng(seed)
    mask = np.zeros(cfg.num_image_slots, bool)
    mask[{1: [0], 2: [0, 2], 3: [0, 1, 2]}[views]] = True  # 2 views: skip the middle slot (positions must skip it)
    imgs = rng.uniform(-1, 1, (cfg.num_image_slots, 224, 224, 3)).astype(np.float32)
    tokens = rng.integers(3, cfg.vocab_size, cfg.max_token_len).astype(np.int32)
    tmask = np.arange(cfg.max_token_len) < prompt
    tokens[~tmask] = 0
    state = rng.normal(size=cfg.action_dim).astype(np.float32)
    noise = rng.normal(size=(cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    return imgs, mask, tokens, tmask, state, noise


def to_torch(args, device):
    return [torch.from_numpy(a[None]).to(device) for a in args]


def time_calls(fn, runs: int, warmup: int = 3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return float(np.median(ts)), float(np.percentile(ts, 99)), ts


def check_accuracy(cfg, out: list, log):
    """triton (bf16) vs the float32 torch reference, 1/2/3 views x prompts 1/20/48; determinism."""
    from pi0_triton_policy.torch_model import TorchPi0
    from pi0_triton_policy.triton_engine import TritonPi0
    from pi0_triton_policy.weights import random_params

    params = random_params(cfg, seed=0, device="cuda", dtype=torch.float32)
    eng = TritonPi0(cfg, params, device="cuda")
    ref = TorchPi0(cfg, params, device="cuda", dtype=torch.float32)
    del params
    torch.backends.cuda.matmul.allow_tf32 = False
    for views in (1, 2, 3):
        for prompt in (1, 20, 48):
            args = inputs(cfg, views, prompt, seed=100 * views + prompt)
            a = eng.sample_actions(*args)
            r = ref.sample_actions(*args)
            err = float(np.linalg.norm(a - r) / np.linalg.norm(r))
            again = eng.sample_actions(*args)
            det = bool(np.array_equal(a, again))
            row = {"views": views, "prompt": prompt, "rel_err": err, "deterministic": det, "finite": bool(np.isfinite(a).all())}
            out.append(row)
            log(f"accuracy views={views} prompt={prompt:2d}: rel err {err:.2e}  deterministic={det}")
    del eng, ref
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", "--model_type", nargs="+", default=["triton", "torch"], choices=["triton", "torch", "jax"])
    ap.add_argument("--views", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--torch-runs", type=int, default=20, help="timed calls for the (slow) torch reference")
    ap.add_argument("--compile", action="store_true", help="also time the torch backend under torch.compile")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode for --compile (max-autotune takes many minutes)")
    ap.add_argument("--check", action="store_true", help="accuracy vs float32 torch + determinism first")
    ap.add_argument("--json", default=None, help="JSON path (default: benchmark.json beside --log or cwd)")
    ap.add_argument("--variant", default="pi0")
    ap.add_argument("--also-act-cublas", action="store_true", help="also time the engine with cuBLAS action-expert matmuls (the previous default)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=JSON",
                    help='also time the engine with these Tuning fields changed, e.g. nopdl=\'{"pdl": false}\' (same weights)')
    ap.add_argument("--digest", action="store_true", help="print the sources' digest (see source_digest) and exit")
    args = ap.parse_args(argv)
    if args.digest:
        print(source_digest())
        return
    if not torch.cuda.is_available():
        sys.exit("benchmark.py needs a CUDA GPU")
    cfg = get_variant(args.variant)
    log = lambda s: print(s, flush=True)  # noqa: E731
    res = {"card": torch.cuda.get_device_name(), "commit": commit(), "source_digest": source_digest(),
           "torch": torch.__version__, "triton": __import__("triton").__version__, "variant": cfg.name, "rows": [],
           "accuracy": []}
    log(f"card {res['card']}  commit {res['commit']}  sources {res['source_digest']}  torch {res['torch']}  "
        f"triton {res['triton']}")
    if args.check:
        try:
            check_accuracy(cfg, res["accuracy"], log)
        except Exception:  # keep going to the timings; the traceback is in the log
            import traceback

            traceback.print_exc()
            torch.cuda.empty_cache()

    from pi0_triton_policy.weights import random_params

    params = random_params(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    for backend in args.backends:
        if backend == "jax":
            log("jax: not measured here (needs an OpenPI checkpoint and jax on this machine)")
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if backend == "triton":
            from pi0_triton_policy.triton_engine import TritonPi0

            model = TritonPi0(cfg, params, device="cuda")
            variants = [("triton", model)]
            base_tuning = model.tuning
            for spec in args.also:
                vname, over = spec.split("=", 1)
                variants.append((f"triton[{vname}]", json.loads(over)))
            if args.also_act_cublas:
                variants.append(("triton[act_cublas]", {"act_cublas": True, "act_skinny": False}))
        else:
            from pi0_triton_policy.torch_model import TorchPi0

            model = TorchPi0(cfg, params, device="cuda", dtype=torch.bfloat16)
            variants = [("torch-eager", model)]
            if args.compile:
                variants.append(("torch-compile", "compile"))
        load_s = time.perf_counter() - t0
        for name, m in variants:
            if isinstance(m, dict):  # a Tuning variant of the same engine (launch-time fields only)
                import dataclasses

                model.tuning = dataclasses.replace(base_tuning, **{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})
                model._graphs.clear()
                m = model
            for views in args.views:
                a = to_torch(inputs(cfg, views, 48, seed=views), "cuda")
                a[0] = a[0].float()
                t0 = time.perf_counter()
                if m == "compile":
                    # the reference's two building blocks compiled (SigLIP, the Gemma stack: one graph for the prefix
                    # call, one for the 10 identical suffix calls); the flow loop itself stays in Python
                    import pi0_triton_policy.torch_model as TM

                    if not hasattr(TM, "_eager_fns"):
                        TM._eager_fns = (TM.siglip_forward, TM.gemma_forward)
                        TM.siglip_forward = torch.compile(TM._eager_fns[0], mode=args.compile_mode, dynamic=False)
                        TM.gemma_forward = torch.compile(TM._eager_fns[1], mode=args.compile_mode, dynamic=False)
                    fn = lambda m=model: m.sample_actions_torch(*a)  # noqa: E731
                    fn()
                elif name.startswith("triton"):
                    m.graph_for(views)
                    fn = lambda m=m: m.sample_actions_torch(*a)  # noqa: E731
                else:
                    fn = lambda m=m: m.sample_actions_torch(*a)  # noqa: E731
                    fn()
                torch.cuda.synchronize()
                warm_s = time.perf_counter() - t0
                runs = args.runs if name.startswith("triton") else args.torch_runs
                med, p99, _ = time_calls(fn, runs)
                graph_ms = None
                if name.startswith("triton"):  # the graph replay alone (no host-side input staging)
                    graph_ms, _, _ = time_calls(m.graph_for(views).graph.replay, runs)
                peak = torch.cuda.max_memory_allocated()
                wk = work(cfg, views if name.startswith("triton") else cfg.num_image_slots)
                row = {"backend": name, "views": views, "median_ms": med, "p99_ms": p99, "replay_ms": graph_ms, "runs": runs,
                       "tflops": wk["flops"] / med / 1e9, "gbps": wk["bytes"] / med / 1e6, "floor_ms": work(cfg, views)["floor_ms"],
                       "peak_gb": peak / 1e9,
                       "load_s": load_s, "warmup_capture_s": warm_s}
                res["rows"].append(row)
                log(f"{name:13s} views={views} median {med:7.2f} ms  p99 {p99:7.2f}  replay {graph_ms or 0:6.2f}  "
                    f"floor {row['floor_ms']:.2f}  peak {row['peak_gb']:.1f} GB  warm {warm_s:.1f}s")
        del model, variants, m, fn
        import pi0_triton_policy.torch_model as TM

        if hasattr(TM, "_eager_fns"):  # undo --compile's patch
            TM.siglip_forward, TM.gemma_forward = TM._eager_fns
            del TM._eager_fns
        import gc

        gc.collect()  # engines hold a reference cycle (engine <-> its graphs)
    # memory of the triton engine alone: rebuild with the canonical weights freed after load
    if "triton" in args.backends:
        from pi0_triton_policy.triton_engine import TritonPi0

        torch.cuda.empty_cache()
        eng = TritonPi0(cfg, params, device="cuda")
        del params
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for views in args.views:
            a = to_torch(inputs(cfg, views, 48, seed=views), "cuda")
            eng.sample_actions_torch(a[0].float(), *a[1:])
        torch.cuda.synchronize()
        res["triton_engine_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        log(f"triton engine alone (weights + 3 graphs' buffers), peak {res['triton_engine_peak_gb']:.2f} GB")
    print_table(res, log)
    path = args.json or os.path.join(os.environ.get("OUT", "."), "benchmark.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {path}")
    return res


def params_bytes(params):
    return sum(t.numel() * t.element_size() for t in params.values())


def print_table(res, log):
    log(f"\n## {res['card']}, commit {res['commit']} (sources {res['source_digest']}), torch {res['torch']}, triton {res['triton']} (bf16, 10 steps, 48-token prompt, 50 actions)")
    log("| backend | cams | median ms | p99 ms | graph replay ms | TFLOP/s | GB/s (weights) | floor ms | x floor | peak GB | warm-up+capture s |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        replay = f"{r['replay_ms']:.2f}" if r["replay_ms"] else "-"
        log(f"| {r['backend']} | {r['views']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | {replay} | {r['tflops']:.0f} | "
            f"{r['gbps']:.0f} | {r['floor_ms']:.2f} | {r['median_ms'] / r['floor_ms']:.2f} | {r['peak_gb']:.1f} | {r['warmup_capture_s']:.1f} |")
    for a in res["accuracy"]:
        log(f"accuracy views={a['views']} prompt={a['prompt']}: rel err {a['rel_err']:.2e}, deterministic {a['deterministic']}")


if __name__ == "__main__":
    main()
