"""Host-side cost of one triton call: `TritonPi0.sample_actions_torch` (inputs already on the GPU, as in
scripts/benchmark.py) vs the CUDA graph replay alone, and vs the input staging of session 4 (three device->host
reads of the camera mask / tokens / prompt mask, a gather of the present views, three pageable host->device copies),
re-enacted here on the same graph so both are timed in one process.

    python benchmarks/host_staging.py [--views 1 2 3] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from benchmark import inputs, time_calls, to_torch  # noqa: E402


def staging_session4(g, images, image_mask, tokens, token_mask, state, noise):
    """The session-4 host path (sample_actions_torch + set_inputs of commit b5e9f92), writing the same buffers."""
    present = torch.nonzero(torch.as_tensor(image_mask[0]).bool().cpu()).flatten()
    imgs = images[0][present.to(images.device)]
    V, P, L = g.V, g.P, g.L
    n = tokens.shape[1]
    mask = torch.zeros(L, dtype=torch.bool)
    mask[:n] = torch.as_tensor(token_mask[0], dtype=torch.bool).cpu()
    tok = torch.zeros(L, dtype=torch.int32)
    tok[:n] = torch.as_tensor(tokens[0]).to(torch.int32).cpu()
    n_valid = int(mask.sum())
    pos = torch.empty(g.T + g.S, dtype=torch.int32)
    pos[: V * P] = torch.arange(V * P, dtype=torch.int32)
    pos[V * P : g.T] = V * P + torch.cumsum(mask.to(torch.int32), 0) - 1
    pos[g.T :] = V * P + n_valid + torch.arange(g.S, dtype=torch.int32)
    valid = torch.ones(g.T, dtype=torch.int32)
    valid[V * P :] = mask.to(torch.int32)
    g.images.copy_(imgs, non_blocking=True)
    g.tokens.copy_(tok, non_blocking=True)
    g.pos.copy_(pos, non_blocking=True)
    g.key_valid.copy_(valid, non_blocking=True)
    g.state.copy_(state[0].reshape(1, -1), non_blocking=True)
    g.x_t.copy_(noise[0], non_blocking=True)
    return torch.stack([g().clone()])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    from pi0_triton_policy.config import get_variant
    from pi0_triton_policy.triton_engine import TritonPi0
    from pi0_triton_policy.weights import random_params

    cfg = get_variant("pi0")
    eng = TritonPi0(cfg, random_params(cfg, seed=0, device="cuda", dtype=torch.bfloat16), device="cuda")
    print(f"{torch.cuda.get_device_name()}: median ms over {args.runs} calls (inputs on the GPU)")
    for V in args.views:
        a = to_torch(inputs(cfg, V, 48, seed=V), "cuda")
        a[0] = a[0].float()
        g = eng.graph_for(V)
        new = eng.sample_actions_torch(*a)
        old = staging_session4(g, *a)
        assert torch.equal(new, old), "both stagings must give the same actions"
        t_new = time_calls(lambda: eng.sample_actions_torch(*a), args.runs)[0]
        t_old = time_calls(lambda: staging_session4(g, *a), args.runs)[0]
        t_replay = time_calls(g.graph.replay, args.runs)[0]
        print(f"views={V}: call {t_new:.3f} (session-4 staging {t_old:.3f})  replay {t_replay:.3f}  "
              f"host part {t_new - t_replay:.3f} (was {t_old - t_replay:.3f})", flush=True)


if __name__ == "__main__":
    main()
