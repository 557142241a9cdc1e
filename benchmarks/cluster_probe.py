"""The action expert's four matmuls (qkv, o, gate|up, down; 50 rows) chained over 18 layers with PDL in a CUDA graph,
on kernels/cluster_matmul.py (CUDA C++: split-K reduced through distributed shared memory inside a cluster). Same
measurements as slab_probe.py: correctness and determinism per shape, us per layer for the chain, each kind alone,
an empty PDL link through the same launcher, and per-program %globaltimer stamps (--timeline).

    python benchmarks/cluster_probe.py [--cfg '{"name": {"qkv": [bn, split], ...}}'] [--timeline] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from pi0_triton_policy.kernels import cluster_matmul as CM
from slab_probe import L, R, SHAPES, chain_setup  # noqa: E402 (benchmarks/ is the script's directory)
from stack_probe import summarize_stamps, time_graph  # noqa: E402

CONFIGS = {"c1": dict(qkv=(32, 2), o=(64, 8), gu=(128, 2), down=(32, 8))}

_LINK = r"""
extern "C" __global__ void pdl_link(int* out) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
    if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x;
}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--cfg", default=None)
    ap.add_argument("--timeline", action="store_true")
    args = ap.parse_args()
    configs = json.loads(args.cfg) if args.cfg else CONFIGS
    dev = "cuda"
    bf = torch.bfloat16
    weights, ins, outs = chain_setup(dev)
    res = {"card": torch.cuda.get_device_name(), "rows": []}
    print(f"card {res['card']}  (4 matmuls x {L} layers, {R} rows, PDL)")
    link = CM.compile_cuda(_LINK, "pdl_link")
    lout = torch.empty(256, dtype=torch.int32, device=dev)
    for pdl in (True, False):
        t = time_graph(lambda: [CM.launch(link, 128, 128, 0, [lout], pdl) for _ in range(4 * L)]) / (4 * L)
        res["rows"].append({"variant": f"empty_link_pdl{int(pdl)}", "us_link": t})
        print(f"empty link (128 programs, pdl={pdl}): {t:.2f} us per kernel", flush=True)
    for name, cfg in configs.items():
        try:
            errs, det = {}, {}
            for k, (bn, split) in cfg.items():
                a = torch.randn_like(ins[k], dtype=torch.float32).to(bf)
                ins[k].copy_(a)
                o1, o2 = torch.empty_like(outs[k]), torch.empty_like(outs[k])
                CM.cluster_matmul(a, weights[k][0], o1, bn, split, pdl=False)
                CM.cluster_matmul(a, weights[k][0], o2, bn, split, pdl=True)
                ref = CM.cluster_matmul_reference(a, weights[k][0])
                errs[k] = ((o1.float() - ref).abs().max() / ref.abs().max()).item()
                det[k] = bool(torch.equal(o1, o2))
            torch.cuda.synchronize()

            def chain(kinds=tuple(cfg), ts=None, slots=None):
                off = 0
                for i in range(L):
                    for k in kinds:
                        bn, split = cfg[k]
                        n = SHAPES[k][0] // bn * split
                        CM.cluster_matmul(ins[k], weights[k][i], outs[k], bn, split,
                                          timestamps=None if ts is None else ts[off * 5:])
                        if slots is not None:
                            slots.append((k, i, off, n))
                        off += n

            t = time_graph(chain)
            alone = {k: round(time_graph(lambda k=k: chain((k,))) / L, 2) for k in cfg}
            tl_rows = None
            if args.timeline:
                per_layer = sum(SHAPES[k][0] // cfg[k][0] * cfg[k][1] for k in cfg)
                ts = torch.zeros(L * per_layer * 5, dtype=torch.int64, device=dev)
                slots = []
                chain(ts=ts)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.graph(g, stream=s):
                    chain(ts=ts, slots=slots)
                g.replay()
                torch.cuda.synchronize()
                tl_rows = summarize_stamps(ts, slots)
                for k, v in tl_rows.items():
                    print(f"    {k:5s} " + "  ".join(f"{a} {b:6.2f}" for a, b in v.items()), flush=True)
            smem = {k: CM.smem_bytes(cfg[k][0], SHAPES[k][1] // cfg[k][1]) // 1024 for k in cfg}
            row = {"variant": name, "us_step": t, "us_layer": t / L, "max_rel_err": errs, "deterministic": det,
                   "cfg": cfg, "smem_kb": smem, "us_alone_per_layer": alone, "timeline": tl_rows}
            print(f"{name:14s} {t:8.1f} us/step {t / L:6.2f} us/layer  err {max(errs.values()):.1e}  "
                  f"det {all(det.values())}  smem KB {smem}  alone us {alone}", flush=True)
        except Exception as e:  # one bad shape must not end the sweep
            row = {"variant": name, "error": repr(e)[:400], "cfg": cfg}
            print(f"{name:14s} FAILED {repr(e)[:300]}", flush=True)
        res["rows"].append(row)
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
