"""Is a weight slab requested before the PDL wait (kernels/slab_matmul.py, Gluon) faster than the Triton skinny
kernel's loop pipeline? Times the action expert's four matmuls per layer (qkv 1024->2560, o 2048->1024,
gate|up 1024->8192, down 4096->1024; 50 rows) chained over 18 layers with PDL in a CUDA graph, for several launch
shapes, after checking each shape against torch. Compare with `stack_probe.py --pk '{"noattn": {"off": ["attn"]}}'`
(the Triton chain of the same four matmuls with their epilogues) run in the same call.

    python benchmarks/slab_probe.py [--json out.json] [--cfg '{"name": {"qkv": [bn, split, nw, na], ...}}'] [--timeline]
"""

from __future__ import annotations

import argparse
import json

import torch

from pi0_triton_policy.kernels import slab_matmul as SM
from stack_probe import summarize_stamps, time_graph  # noqa: E402 (benchmarks/ is the script's directory)

D, F, NQ, HD, L, R = 1024, 4096, 8, 256, 18, 50
SHAPES = dict(qkv=((NQ + 2) * HD, D), o=(D, NQ * HD), gu=(2 * F, D), down=(D, F))  # (N, K) of W^T
# kernel -> (BN, split, nw, na[, early_trigger[, a_once]]); nw = weight buffers (0: the whole slab in shared memory),
# na = activation buffers (0: as many as nw); a_once: only the first activation block is loaded and reused (wrong
# result; times the weight stream without the activation traffic)
CONFIGS = {
    "bn32": dict(qkv=(32, 2, 0, 0), o=(32, 4, 0, 0), gu=(64, 1, 10, 10), down=(32, 4, 6, 6)),
}


def time_links(n_links, programs=128):
    """us per link of a chain of empty PDL kernels (_pdl_link_kernel): the floor of any kernel-per-op chain."""
    out = torch.empty(programs, dtype=torch.int32, device="cuda")
    return time_graph(lambda: [SM.pdl_link(out, programs) for _ in range(n_links)]) / n_links


def chain_timeline(plans, descs, outs, ins, ws, cnt, cfg):
    """Per-program %globaltimer stamps of one graph replay of the chain, summarised per kernel kind
    (stack_probe.summarize_stamps)."""
    nprog = {k: plans[k][0].N // plans[k][0].bn * plans[k][0].split for k in cfg}
    per_layer = sum(nprog.values())
    ts = torch.zeros(L * per_layer * 5, dtype=torch.int64, device="cuda")
    slots = []

    def chain():
        off = 0
        for i in range(L):
            for k, c in cfg.items():
                SM.slab_matmul(plans[k][i], descs[k], R, outs[k], ws, cnt[k], early_trigger=flag(c, 4),
                               a_once=flag(c, 5), timestamps=ts[off * 5:])
                slots.append((k, i, off, nprog[k]))
                off += nprog[k]

    chain()
    torch.cuda.synchronize()
    slots.clear()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(g, stream=s):
        chain()
    g.replay()
    torch.cuda.synchronize()
    return summarize_stamps(ts, slots)


def chain_setup(dev="cuda"):
    """Random full-size weights of the four matmuls ({kind: [L, N, K]}, W^T, bf16) and the chain's activation
    buffers: qkv x -> q, o att -> x, gate|up x -> h8, down h -> x (timing only: no data dependence is needed, the
    PDL waits order the chain). Shared with cluster_probe.py."""
    torch.manual_seed(0)
    bf = torch.bfloat16
    weights = {k: (torch.randn(L, n, kk, device=dev) * kk**-0.5).to(bf) for k, (n, kk) in SHAPES.items()}
    acts = {n: torch.randn(R, n, device=dev).to(bf) for n in {D, (NQ + 2) * HD, NQ * HD, 2 * F, F}}
    x, q, att, h8, h = acts[D], acts[(NQ + 2) * HD], acts[NQ * HD], acts[2 * F], acts[F]
    return weights, dict(qkv=x, o=att, gu=x, down=h), dict(qkv=q, o=x, gu=h8, down=x)


def flag(c, i):
    return bool(c[i]) if len(c) > i else False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--cfg", default=None, help="JSON {name: {kernel: [bn, split, nw, na(, early(, a_once))]}} (replaces the defaults)")
    ap.add_argument("--no-pdl", action="store_true")
    ap.add_argument("--timeline", action="store_true", help="per-kernel stamps of the chain (one graph replay)")
    args = ap.parse_args()
    configs = json.loads(args.cfg) if args.cfg else CONFIGS
    dev = "cuda"
    bf = torch.bfloat16
    weights, ins, outs = chain_setup(dev)
    ws = torch.empty(1 << 22, device=dev)
    cnt = {k: torch.zeros(4096, dtype=torch.int32, device=dev) for k in SHAPES}
    res = {"card": torch.cuda.get_device_name(), "rows": []}
    print(f"card {res['card']}  (4 matmuls x {L} layers, {R} rows, PDL={not args.no_pdl})")
    for progs in (128, 132):
        t_link = time_links(4 * L, progs)
        res["rows"].append({"variant": f"empty_link_{progs}", "us_link": t_link})
        print(f"empty PDL link ({progs} programs): {t_link:.2f} us per kernel", flush=True)
    for name, cfg in configs.items():
        plans, descs = {}, {}
        try:
            for k, c in cfg.items():
                bn, split, nw, na = c[:4]
                plans[k] = [SM.SlabPlan(weights[k][i], bn, split, nw, na) for i in range(L)]
                descs[k] = plans[k][0].a_desc(ins[k])
            # correctness of each kernel against torch (layer 0), fresh inputs
            errs = {}
            for k, c in cfg.items():
                a = torch.randn_like(ins[k], dtype=torch.float32).to(bf)
                ins[k].copy_(a)
                out = torch.empty_like(outs[k])
                SM.slab_matmul(plans[k][0], descs[k], R, out, ws, cnt[k], pdl=False)
                ref = SM.slab_matmul_reference(a, weights[k][0])
                errs[k] = ((out.float() - ref).abs().max() / ref.abs().max()).item() if not flag(c, 5) else None
            torch.cuda.synchronize()

            def chain():
                for i in range(L):
                    for k, c in cfg.items():
                        SM.slab_matmul(plans[k][i], descs[k], R, outs[k], ws, cnt[k], pdl=not args.no_pdl,
                                       early_trigger=flag(c, 4), a_once=flag(c, 5))

            t = time_graph(chain)
            per_kernel = {}
            for k0 in cfg:  # the same chain with one kind of matmul only: its share
                def only(k0=k0):
                    for i in range(L):
                        c = cfg[k0]
                        SM.slab_matmul(plans[k0][i], descs[k0], R, outs[k0], ws, cnt[k0], pdl=not args.no_pdl,
                                       early_trigger=flag(c, 4), a_once=flag(c, 5))
                per_kernel[k0] = round(time_graph(only) / L, 2)
            smem = {k: plans[k][0].smem_bytes() // 1024 for k in cfg}
            if args.timeline:
                tl_rows = chain_timeline(plans, descs, outs, ins, ws, cnt, cfg)
                for k, v in tl_rows.items():
                    print(f"    {k:5s} " + "  ".join(f"{a} {b:6.2f}" for a, b in v.items()), flush=True)
            row = {"variant": name, "us_step": t, "us_layer": t / L, "max_rel_err": errs, "cfg": cfg, "smem_kb": smem,
                   "us_alone_per_layer": per_kernel, "timeline": tl_rows if args.timeline else None}
            print(f"{name:14s} {t:8.1f} us/step {t / L:6.2f} us/layer  err {max(e for e in errs.values() if e is not None) if any(e is not None for e in errs.values()) else -1:.1e}  smem KB {smem}  alone us {per_kernel}",
                  flush=True)
        except Exception as e:  # one bad shape must not end the sweep
            if args.timeline:
                tl_rows = chain_timeline(plans, descs, outs, ins, ws, cnt, cfg)
                for k, v in tl_rows.items():
                    print(f"    {k:5s} " + "  ".join(f"{a} {b:6.2f}" for a, b in v.items()), flush=True)
            row = {"variant": name, "error": repr(e)[:400], "cfg": cfg}
            print(f"{name:14s} FAILED {repr(e)[:300]}", flush=True)
        res["rows"].append(row)
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
