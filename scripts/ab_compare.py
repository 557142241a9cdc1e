"""A/B two Pi0 backends (one process) or two running policy servers (over the wire) on one observation stream.

    # in one process, same weights, same observations, same noise into both sides
    python scripts/ab_compare.py --a triton --b jax --variant pi0 --config pi0_aloha_sim --num-obs 20
    python scripts/ab_compare.py --a torch --b jax --checkpoint-dir ~/.cache/openpi/openpi-assets/checkpoints/pi0_aloha_sim
    python scripts/ab_compare.py --a torch --b jax --variant pi0_tiny --device cpu --num-obs 5       # CPU smoke test
    python scripts/ab_compare.py --a torch --b jax --weights weights/pi0_libero --config pi0_libero --replay policy_records

    # over the wire: two running servers (ours or OpenPI's), one request at a time
    python scripts/ab_compare.py --a-url ws://localhost:8000 --b-url ws://localhost:8001 --num-obs 50

Prints a Markdown report (latency p50/p95/p99 per side, per-dimension max/mean |A-B|, chunk relative error,
a VERDICT line) and writes report.md, report.json, ab.png and actions.npz to --out (default
benchmarks/ab/<timestamp>/). Exit status 1 when the verdict is FAIL. The logic lives in pi0_triton_policy/ab.py.
"""

from __future__ import annotations

import logging
import sys

from pi0_triton_policy.ab import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    sys.exit(main())
