"""Where the host part of a call goes (benchmark median - graph replay): the engine's call with CUDA inputs (as
scripts/benchmark.py times it; also the pre-session-9 staging, re-enacted) against the same call with the camera mask on the host (no device->host read), the
graph's own staging (set_inputs + replay + output clone, no mask logic) and the bare replay. Host-side seconds per
piece (perf_counter) and the GPU time between events recorded at the piece boundaries. Random full-size weights.

    python benchmarks/host_part_probe.py [--views 1 3] [--runs 200]
    python benchmarks/host_part_probe.py --numpy [--views 1 2 3]   # the policy server's call: numpy in, numpy out
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

sys.path.insert(0, "scripts")
from benchmark import inputs, time_calls, to_torch  # noqa: E402
from positions_ab import probe_engine  # noqa: E402 (benchmarks/ is the script's directory)


def pieces(eng, a, runs):
    """Host us per piece of sample_actions_torch (one batch row), and GPU us between the pieces' boundaries."""
    images, image_mask, tokens, token_mask, state, noise = a
    host = {k: [] for k in ("mask_read", "graph_for", "set_inputs", "replay", "clone")}
    gpu = {k: [] for k in ("start->mask", "mask->staged", "staged->replayed", "replayed->cloned")}
    for _ in range(runs):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        ev[0].record()
        t0 = time.perf_counter()
        present = [i for i, on in enumerate(torch.as_tensor(image_mask[0]).tolist()) if on]
        t1 = time.perf_counter()
        ev[1].record()
        g = eng.graph_for(len(present))
        t2 = time.perf_counter()
        g.set_inputs(images[0], tokens[0], token_mask[0], state[0], noise[0], views=present)
        t3 = time.perf_counter()
        ev[2].record()
        out = g()
        t4 = time.perf_counter()
        ev[3].record()
        out.clone()
        t5 = time.perf_counter()
        ev[4].record()
        ev[4].synchronize()
        for k, (u, v) in zip(host, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
            host[k].append((v - u) * 1e6)
        for i, k in enumerate(gpu):
            gpu[k].append(ev[i].elapsed_time(ev[i + 1]) * 1e3)
    return ({k: round(statistics.median(v), 1) for k, v in host.items()},
            {k: round(statistics.median(v), 1) for k, v in gpu.items()})


def old_call(eng, a):
    """The call as it was before session 9 (gather of the present slots, five separate copies), re-enacted on the same
    graph for an A/B in one process."""
    images, image_mask, tokens, token_mask, state, noise = a
    present = torch.nonzero(torch.as_tensor(image_mask[0]).cpu().bool()).flatten()
    g = eng.graph_for(len(present))
    imgs = torch.as_tensor(images[0])
    if len(present) < imgs.shape[0]:
        imgs = imgs[present.to(imgs.device)]
    n = tokens[0].shape[0]
    g.images[:len(present)].copy_(imgs, non_blocking=True)  # timing only: slot_idx is what the last call left
    g.tokens[:n].copy_(tokens[0], non_blocking=True)
    g.token_mask[:n].copy_(token_mask[0], non_blocking=True)
    g.state.copy_(state[0].reshape(1, -1), non_blocking=True)
    g.x_t.copy_(noise[0].reshape(g.x_t.shape), non_blocking=True)
    return g().clone()


def row_call(eng, a):
    """The per-batch-row path of sample_actions_torch (session 9's call; now taken for batches > 1 or other shapes):
    the row views, set_inputs with its checks, the output view, against the one-copy stage_batch1 of a batch of 1."""
    images, image_mask, tokens, token_mask, state, noise = a
    present = [i for i, on in enumerate(torch.as_tensor(image_mask[0]).tolist()) if on]
    g = eng.graph_for(len(present))
    g.set_inputs(torch.as_tensor(images[0]), torch.as_tensor(tokens[0]), torch.as_tensor(token_mask[0]),
                 torch.as_tensor(state[0]), torch.as_tensor(noise[0]), views=present)
    return g().clone()[None]


def wall_ms(fn, runs: int) -> float:
    """Median host wall time of a call that returns after the GPU is done (as the policy server times the backend)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def numpy_calls(eng, cfg, views_list, runs: int):
    """The backend call the policy server makes (numpy in, numpy out: `sample_actions`) with the graph's pinned input
    mirror (Tuning.host_staging, one copy each way) and without (a torch tensor per array, a copy per tensor), against
    the same observation already on the device and the bare replay; rounds alternate."""
    import dataclasses

    base = eng.tuning
    for views in views_list:
        a = inputs(cfg, views, 48, seed=views)  # numpy: [3, 224, 224, 3] float32 images, mask, prompt, state, noise
        dev = to_torch(a, "cuda")
        g = eng.graph_for(views)

        def device_call():
            eng.sample_actions_torch(*dev)
            torch.cuda.synchronize()

        def replay():
            g.graph.replay()
            torch.cuda.synchronize()

        for rnd in range(2):
            row = {}
            for name, staging in (("mirror", True), ("per-tensor", False)):
                eng.tuning = dataclasses.replace(base, host_staging=staging)
                row[name] = wall_ms(lambda: eng.sample_actions(*a), runs)
            eng.tuning = base
            row["device inputs"] = wall_ms(device_call, runs)
            row["replay"] = wall_ms(replay, runs)
            print(f"views={views} round {rnd}: numpy call, wall ms: " + " | ".join(f"{k} {v:.3f}" for k, v in row.items()),
                  flush=True)


def main():
    if "--numpy" in sys.argv:
        sys.argv.remove("--numpy")
        args, cfg, eng = probe_engine()
        numpy_calls(eng, cfg, args.views, args.runs)
        return
    args, cfg, eng = probe_engine()
    for views in args.views:
        a = to_torch(inputs(cfg, views, 48, seed=views), "cuda")
        a[0] = a[0].float()
        g = eng.graph_for(views)
        host_mask = list(a)
        host_mask[1] = a[1].cpu()
        for rnd in range(2):
            old, _, _ = time_calls(lambda: old_call(eng, a), args.runs)
            row, _, _ = time_calls(lambda: row_call(eng, a), args.runs)
            call, _, _ = time_calls(lambda: eng.sample_actions_torch(*a), args.runs)
            call_hm, _, _ = time_calls(lambda: eng.sample_actions_torch(*host_mask), args.runs)
            imgs = a[0][0][a[1][0].cpu().bool().nonzero().flatten().cuda()]

            def staged():
                g.set_inputs(imgs, a[2][0], a[3][0], a[4][0], a[5][0])
                g().clone()

            st, _, _ = time_calls(staged, args.runs)
            rep, _, _ = time_calls(g.graph.replay, args.runs)
            print(f"views={views} round {rnd}: old call {old:.3f} ms | row call {row:.3f} | call {call:.3f} | mask on host {call_hm:.3f} | set_inputs+replay+clone "
                  f"{st:.3f} | replay {rep:.3f} | host part {call - rep:.3f}", flush=True)
        h, gp = pieces(eng, a, args.runs)
        print(f"views={views} host us per piece {h}\n          GPU us between pieces {gp}", flush=True)


if __name__ == "__main__":
    main()
