"""How long does the attention half of a layer-step take with one cluster of 8 programs per head
(kernels/head_block.py: x -> q -> attention -> o_h partials, the suffix k / v from 8 more clusters through one global
counter)? Checks the kernel against its float32 reference, times 18 layers (each its own weights and caches) as 18
launches in a CUDA graph, and prints where a layer's time goes from the programs' %globaltimer stamps. Compare with
the persistent kernel's qkv -> attention -> o spans: `mega_probe.py --attn 2 --skip-plain` in the same call.

    python benchmarks/head_block_probe.py [--json out.json] [--T 305] [--kvw 16 32] [--xchg 0 1] [--layers 18] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from pi0_triton_policy.kernels import head_block as HB
from pi0_triton_policy.kernels import mega_chain as MC
from stack_probe import time_graph  # noqa: E402 (benchmarks/ is the script's directory)

PHASES = ["start", "x_in", "q_done", "Q_gathered", "attn_done", "scattered", "o_tile_gathered", "stored"]


def setup(T: int, kvw: int, layers: int, g: torch.Generator):
    bf, dev = torch.bfloat16, "cuda"
    x = torch.randn(MC.R, 1024, device=dev, generator=g).to(bf)
    n, _ = HB.nsb_for(T)
    valid = torch.zeros(16 * n, dtype=torch.int32, device=dev)
    valid[: T + MC.R] = 1
    valid[T - 11: T - 1] = 0  # the prompt's padding (the last fixed key is the state token's)
    per = []
    for _ in range(layers):
        wq = (torch.randn(1024, 2048, device=dev, generator=g) * 1024**-0.5 * 1.4426950408889634 / 16).to(bf)
        wkv = (torch.randn(1024, 512, device=dev, generator=g) * 1024**-0.5).to(bf)
        wo = (torch.randn(2048, 1024, device=dev, generator=g) * 2048**-0.5).to(bf)
        kf = torch.randn(T, 256, device=dev, generator=g).to(bf)
        vf = torch.randn(T, 256, device=dev, generator=g).to(bf)
        kc, vc = HB.caches(kf, vf)
        per.append(dict(w=(wq, wkv, wo), fixed=(kf, vf), prep=HB.prepare(wq, wkv, wo, kvw), kc=kc, vc=vc))
    return x, valid, per


def run(T: int, kvw: int, layers: int, xchg: int, rounds: int = 7) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x, valid, per = setup(T, kvw, layers, g)
    xb = MC.to_blocked(x)
    out = torch.zeros(layers, HB.HEADS, MC.R, 1024, device="cuda")
    x0 = torch.randn(MC.R, 1024, device="cuda", generator=g)
    xres = x0.clone()
    ss = torch.zeros(512 // kvw, MC.R, device="cuda")
    ctr = torch.zeros(layers, 3, dtype=torch.int32, device="cuda")
    grid = HB.grid(kvw)
    ts = torch.zeros(layers, grid, 8, dtype=torch.int64, device="cuda")
    res = {"T": T, "kvw": kvw, "xchg": xchg, "layers": layers, "resident_clusters": HB.resident_clusters(T, kvw)}

    def chain(stamps: bool):
        ctr.zero_()
        xres.copy_(x0)
        for i, p in enumerate(per):
            HB.head_block(xb, p["prep"], p["kc"], p["vc"], valid, T, out[i], xres, ss, ctr[i],
                          timestamps=ts[i] if stamps else None, pdl=True, xchg=xchg)

    chain(False)
    torch.cuda.synchronize()
    ref, _, _ = HB.head_block_ref(x, *per[0]["w"], *per[0]["fixed"], valid)
    res["rel_err"] = round(((out[0] - ref).norm() / ref.norm()).item(), 6)
    first = out.clone()
    chain(False)
    torch.cuda.synchronize()
    res["bitwise_repeat"] = bool(torch.equal(first, out))

    res["us_per_layer"] = round(time_graph(lambda: chain(False), n_inner=1, rounds=rounds) / layers, 2)

    chain(True)
    torch.cuda.synchronize()
    st = ts.cpu().double() / 1000.0  # us
    heads, kvs = st[:, : HB.HEADS * HB.CS], st[:, HB.HEADS * HB.CS:]
    rows = []
    for i in range(1, layers - 1):  # the first and last launches start / end the chain
        t0 = st[i, :, 0].min()  # the layer's first program start
        x_in = heads[i, :, 1].min()
        rows.append({
            "launch_gap": float(t0 - st[i - 1, :, 7].max()),
            **{f"head_{p}": float((heads[i, :, k] - x_in).median()) for k, p in enumerate(PHASES) if k >= 2},
            "head_stored_max": float(heads[i, :, 7].max() - x_in),
            "head_x_in_spread": float(heads[i, :, 1].max() - x_in),
            "kv_mma_done": float((kvs[i, :, 2] - x_in).median()),
            "kv_published_max": float(kvs[i, :, 7].max() - x_in),
            "partials_seen": float((kvs[i, :, 3] - x_in).median()),
            "x_updated_max": float(kvs[i, :, 4].max() - x_in),
            "start_to_x_in": float(x_in - t0),
        })
    res["timeline_us"] = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--T", type=int, nargs="+", default=[305], help="fixed keys (prefix + state); 305: one camera")
    ap.add_argument("--kvw", type=int, nargs="+", default=[16, 32], help="k | v columns per kv program")
    ap.add_argument("--xchg", type=int, nargs="+", default=[3, 4],
                    help="cluster exchanges (kernels/head_block.py XCHG): 0 remote stores + cluster barriers, 1 staged + "
                         "bulk copies, 2 local + a cluster barrier + 16-byte loads, 3 as 1 with bf16 partials, 4 through "
                         "global memory")
    ap.add_argument("--rounds", type=int, default=2, help="repeat every variant (they alternate)")
    ap.add_argument("--layers", type=int, default=18)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    results = []
    for _ in range(args.rounds):
        for T in args.T:
            for kvw in args.kvw:
                for xchg in args.xchg:
                    try:
                        r = run(T, kvw, args.layers, xchg)
                    except Exception as e:  # e.g. not enough resident clusters
                        r = {"T": T, "kvw": kvw, "xchg": xchg, "error": repr(e)[:300]}
                    print(r, flush=True)
                    results.append(r)
    print("\nT    kvw  xchg us/layer  err      | timeline (us after the first x lands): q, Q gathered, attention, scattered, "
          "o tile, stored (median / max), kv published (max), heads' partials seen, residual updated (max)")
    for r in results:
        if "us_per_layer" in r:
            t = r["timeline_us"]
            print(f"{r['T']:4d} {r['kvw']:3d}  {r['xchg']:4d} {r['us_per_layer']:8.2f}  {r['rel_err']:.1e} | {t['head_q_done']:5.2f} "
                  f"{t['head_Q_gathered']:5.2f} {t['head_attn_done']:5.2f} {t['head_scattered']:5.2f} "
                  f"{t['head_o_tile_gathered']:5.2f} {t['head_stored']:5.2f} / {t['head_stored_max']:5.2f}  "
                  f"kv {t['kv_published_max']:5.2f}  seen {t['partials_seen']:5.2f}  x {t['x_updated_max']:5.2f}  (launch gap {t['launch_gap']:.2f}, start->x {t['start_to_x_in']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
