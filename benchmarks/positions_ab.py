"""A/B in one process: graph replay with the prompt positions computed inside the graph (the default since session 6)
vs the same graph with that step removed (positions left from the previous call), and the host part of a call
(call median - replay). Random full-size weights; ABAB order.

    python benchmarks/positions_ab.py [--views 1 3] [--runs 200]
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, "scripts")
from benchmark import inputs, time_calls, to_torch  # noqa: E402

from pi0_triton_policy.config import get_variant  # noqa: E402
from pi0_triton_policy.triton_engine import TritonPi0, _ViewGraph  # noqa: E402
from pi0_triton_policy.weights import random_params  # noqa: E402


def probe_engine():
    """--views / --runs, and the engine on random full-size bf16 weights (also used by host_part_probe)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    cfg = get_variant("pi0")
    eng = TritonPi0(cfg, random_params(cfg, seed=0, device="cuda", dtype=torch.bfloat16), device="cuda")
    print(f"card {torch.cuda.get_device_name()}")
    return args, cfg, eng


def main():
    args, cfg, eng = probe_engine()
    in_graph = _ViewGraph.positions
    for rnd in range(2):
        for name, fn in (("in_graph", in_graph), ("no_positions", lambda self: None)):
            _ViewGraph.positions = fn
            eng._graphs.clear()
            for views in args.views:
                a = to_torch(inputs(cfg, views, 48, seed=views), "cuda")
                a[0] = a[0].float()
                if name == "no_positions":  # fill the position buffers once, outside the graph
                    g = eng.graph_for(views)
                    in_graph(g)
                g = eng.graph_for(views)
                call = lambda: eng.sample_actions_torch(*a)  # noqa: E731
                med, _, _ = time_calls(call, args.runs)
                rep, _, _ = time_calls(g.graph.replay, args.runs)
                print(f"round {rnd} {name:13s} views={views} call {med:6.2f} ms  replay {rep:6.2f}  host {med - rep:5.2f}",
                      flush=True)
    _ViewGraph.positions = in_graph


if __name__ == "__main__":
    main()
