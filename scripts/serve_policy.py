"""Serve a Pi0 policy over OpenPI's websocket protocol: a drop-in for openpi's `scripts/serve_policy.py`.

    python scripts/serve_policy.py --backend triton --env LIBERO --weights weights/pi0_libero
    python scripts/serve_policy.py --backend triton --config pi0_libero --checkpoint-dir ~/.cache/openpi/openpi-assets/checkpoints/pi0_libero
    python scripts/serve_policy.py --backend torch --variant pi0_tiny --device cpu     # CPU smoke test, random weights

Robot clients (`openpi_client.websocket_client_policy.WebsocketClientPolicy(host, 8000)`) connect unchanged.
Before the port opens, the backend is built (CUDA graphs captured), one warm-up inference runs on an example
observation of the preset, and a few more are timed; the start-up log says backend, card, weights, preset
and that latency. Without --weights/--checkpoint-dir it serves RANDOM full-size weights (loudly).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import platform
import socket
import sys
import time
from typing import Literal

import numpy as np
import tyro

log = logging.getLogger("serve_policy")

VARIANT_ALIASES = {"dummy": "pi0_dummy", "tiny": "pi0_tiny"}


class EnvMode(enum.Enum):
    """OpenPI's environments; each picks a preset (pi0_triton_policy.presets.ENV_TO_PRESET)."""

    ALOHA = "aloha"
    ALOHA_SIM = "aloha_sim"
    DROID = "droid"
    LIBERO = "libero"


@dataclasses.dataclass
class Args:
    """Serve a Pi0 policy to openpi_client robot clients over OpenPI's websocket protocol."""

    # Inference backend: triton (fused kernels in CUDA graphs, needs a GPU), torch (reference, any device), jax.
    backend: Literal["triton", "torch", "jax"] = "triton"
    # Environment, as in OpenPI: picks the preset (ALOHA -> pi0_aloha, ALOHA_SIM -> pi0_aloha_sim, DROID -> pi0_droid, LIBERO -> pi0_libero).
    env: EnvMode = EnvMode.ALOHA_SIM
    # Preset name (a file in configs/, or a path to a .toml); overrides --env.
    config: str | None = None
    # Converted weights directory (scripts/convert_checkpoint.py output).
    weights: str | None = None
    # Original OpenPI checkpoint directory (params/ + assets/); converted on the fly for triton/torch.
    checkpoint_dir: str | None = None
    # Address to bind (OpenPI binds all interfaces).
    host: str = "0.0.0.0"
    # Port to serve on.
    port: int = 8000
    # Prompt used when an observation carries none (overrides the preset's default prompt).
    default_prompt: str | None = None
    # Record every inference to policy_records/step_N.npy (OpenPI's PolicyRecorder format).
    record: bool = False
    # Torch device, e.g. cuda:1 or cpu (default: cuda if available).
    device: str | None = None
    # Model variant for random weights (no --weights/--checkpoint-dir): pi0 (full size), dummy / pi0_tiny (CPU tests).
    variant: str = "pi0"
    # Refuse websocket frames larger than this many MiB (close 1009).
    max_message_mb: float = 64.0
    # Require 'Authorization: Api-Key <key>' (openpi_client's api_key=...); default: the PI0_API_KEY environment variable.
    api_key: str | None = None
    # Seed for the flow-matching noise (and for random weights).
    seed: int = 0
    # Timed inferences after the warm-up, for the start-up latency line.
    latency_iters: int = 5


def _card(device: str) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def _loud_random_weights_warning(weights: str) -> None:
    bar = "!" * 100
    log.warning(
        "\n%s\n!!  SERVING %s\n!!  The actions are meaningless noise: do NOT connect a real robot.\n"
        "!!  For a real policy pass --weights DIR (scripts/convert_checkpoint.py output) or --checkpoint-dir DIR "
        "(an OpenPI checkpoint).\n%s",
        bar, weights, bar,
    )


def build_policy(args: Args, worker):
    """(policy, preset, startup_info): backend + policy layer, warmed up and timed on the inference worker
    thread that will serve it, recorder applied last."""
    from pi0_triton_policy.backends import default_device, load_backend
    from pi0_triton_policy.policy import create_policy, make_example_observation
    from pi0_triton_policy.presets import ENV_TO_PRESET, get_preset

    preset_name = args.config or ENV_TO_PRESET[args.env.name]
    preset = get_preset(preset_name)
    device = args.device or default_device()
    variant = VARIANT_ALIASES.get(args.variant, args.variant)
    random_weights = args.weights is None and args.checkpoint_dir is None
    if random_weights and variant == "pi0" and not str(device).startswith("cuda"):
        raise SystemExit(
            f"error: random full-size pi0 weights need a GPU (device is {device!r}). On a CPU pass "
            "--backend torch --device cpu --variant dummy (or pi0_tiny), or give --weights/--checkpoint-dir."
        )
    if not random_weights and args.variant != "pi0":
        log.warning("--variant %s ignored: the variant is read from the weights' shapes", args.variant)

    t0 = time.perf_counter()
    backend, info = load_backend(  # the preset's horizon: OpenPI builds pi0_droid with 10 action tokens, not 50 sliced
        args.backend, weights_dir=args.weights, checkpoint_dir=args.checkpoint_dir, variant=variant, device=device,
        seed=args.seed, action_horizon=preset.action_horizon,
    )
    load_s = time.perf_counter() - t0
    if info.get("kind") == "random":
        _loud_random_weights_warning(info["weights"])
    policy = create_policy(
        preset.name, backend, weights_dir=args.weights or args.checkpoint_dir, default_prompt=args.default_prompt, seed=args.seed
    )

    # Warm-up (first inference: allocation, autotune cache, any lazy graph capture), then steady-state timing.
    rng = np.random.default_rng(args.seed)
    obs = make_example_observation(preset.name, rng=rng)

    def timed_infer() -> tuple[dict, float]:
        t0 = time.perf_counter()
        out = policy.infer(obs)  # returns numpy, so the device work is done when it returns
        return out, time.perf_counter() - t0

    out, warmup_s = worker.submit(timed_infer).result()
    times_ms = [worker.submit(timed_infer).result()[1] * 1e3 for _ in range(max(args.latency_iters, 0))]
    policy.reset()

    if args.record:
        from pi0_triton_policy.records import PolicyRecorder

        policy = PolicyRecorder(policy, "policy_records")  # after the warm-up, so step_0 is the first real request

    startup = {
        "backend": args.backend,
        "card": _card(device),
        "device": str(device),
        "weights": info.get("weights"),
        "preset": preset.name,
        "variant": backend.cfg.name,
        "model_horizon": backend.cfg.action_horizon,
        "actions": "x".join(str(d) for d in np.shape(out["actions"])),
        "load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 3),
        "latency_ms_median": round(float(np.median(times_ms)), 2) if times_ms else None,
        "latency_ms_min": round(min(times_ms), 2) if times_ms else None,
        "latency_ms_max": round(max(times_ms), 2) if times_ms else None,
    }
    return policy, preset, startup


def main(args: Args) -> None:
    from pi0_triton_policy.backends import default_device
    from pi0_triton_policy.server import API_KEY_ENV, PolicyServer, inference_worker

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    worker = inference_worker(args.device or default_device())
    try:
        policy, preset, startup = build_policy(args, worker)
    except (FileNotFoundError, KeyError, ValueError) as e:  # bad flags, missing files: say what, not where
        log.debug("start-up failed", exc_info=True)
        raise SystemExit(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from None
    log.info("ready %s", " ".join(f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}" for k, v in startup.items()))
    try:
        hostname = socket.gethostname()
        log.info("serving on %s:%d (host %s, ip %s)%s", args.host, args.port, hostname, socket.gethostbyname(hostname),
                 "; API key required" if api_key else "")
    except OSError:
        pass
    server = PolicyServer(
        policy, host=args.host, port=args.port, metadata=policy.metadata, max_message_mb=args.max_message_mb,
        api_key=api_key, worker=worker,
    )
    server.serve_forever()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    main(tyro.cli(Args, description=__doc__))
    sys.exit(0)
