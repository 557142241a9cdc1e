"""Time ONE flow step of the action expert (18 layers, 51 suffix rows, full-size random bf16 weights) on the GPU:
the per-kernel skinny path (5 launches per layer, PDL) vs the persistent kernel (kernels/action_stack.py) and its
variants, all in one process on the same weights. Each number: median over 7 rounds of 20 step launches captured in
a CUDA graph, per step in microseconds, and per layer-step. Phase probes switch one phase's work off (the barriers
stay), so `all - without phase X` is that phase's share.

    python benchmarks/stack_probe.py [--views 1 3] [--json out.json] [--variants '{"name": {...StackPlan kwargs...}}']
        [--pk '{"name": {"o": [16, 128, 4, 5, 4, 0], "off": ["attn"], "prefetch": 1, ...}}'] [--timeline]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from pi0_triton_policy.kernels import action_attention as AA
from pi0_triton_policy.kernels import action_stack as AS
from pi0_triton_policy.kernels import rmsnorm_qkv_rope as RQR
from pi0_triton_policy.kernels import skinny_matmul as SK
from pi0_triton_policy.kernels._common import Workspace

D, F, NQ, HD, L, S = 1024, 4096, 8, 256, 18, 51
DEFAULT = dict(bh_qkv=16, bh_gu=32, bh_res=16)
# the engine's per-kernel shapes (triton_engine.Tuning): (BH, BK, warps, stages, split[, peel]); attention per camera
# count (BM, BN, warps, stages, split) and whether its first prefix K/V block is loaded before the PDL wait
PK_BASE = dict(qkv=(16, 128, 4, 5, 1, 0), o=(16, 128, 4, 5, 4, 0), gu=(32, 128, 4, 5, 1, 0), down=(16, 128, 4, 5, 4, 0),
               attn1=(16, 128, 8, 2, 4, 0), attn2=(16, 64, 8, 3, 8, 0), attn3=(16, 128, 8, 2, 4, 0), preload=(True, True, True))


def time_graph(fn, n_inner=20, rounds=7, indexed=False):
    """us per fn() (fn(i), i = its position in the graph, when indexed): median over rounds of n_inner calls
    captured in one CUDA graph. Also used by slab_probe, cluster_probe and attention_probe."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(n_inner):
            fn(i) if indexed else fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        out.append(e0.elapsed_time(e1) * 1000 / n_inner)
    return statistics.median(out)


def summarize_stamps(ts, slots, layers=L):
    """Per kernel kind, medians over layers 1..layers-2 (us) of the 5 %globaltimer stamps per program (entry, wait
    returned, first activations ready, MMAs done, end) of one chain: previous kernel's last end -> first entry
    (negative: resident early) / wait returned (median), wait -> activations, -> MMAs done, -> end (median and max),
    and the kernel's span. slots: (kind, layer, first program, programs) per launch, in launch order."""
    st = ts.view(-1, 5).cpu().double() / 1000.0
    rows, prev_end = {}, None
    for k, i, off, n in slots:
        t = st[off:off + n]
        if prev_end is not None and 1 <= i <= layers - 2:
            rows.setdefault(k, []).append([t[:, 0].min() - prev_end, t[:, 1].median() - prev_end,
                                           (t[:, 2] - t[:, 1]).median(), (t[:, 3] - t[:, 2]).median(),
                                           (t[:, 4] - t[:, 3]).median(), (t[:, 4] - t[:, 3]).max(),
                                           t[:, 4].max() - max(prev_end, t[:, 0].min())])
        prev_end = t[:, 4].max()
    names = ["prev_end->entry", "prev_end->wait_done", "wait->A", "A->mma_done", "mma->end_med", "mma->end_max", "span"]
    return {k: dict(zip(names, [round(float(torch.tensor(v)[:, j].median()), 2) for j in range(len(names))]))
            for k, v in rows.items()}


def timeline(per_kernel, res, key):
    """Per-program %globaltimer stamps of layers 1-2's kernels (eager launches, one step)."""
    SK.TIMESTAMPS = torch.zeros(1 << 16, dtype=torch.int64, device="cuda")
    SK.TS_LOG.clear()
    per_kernel()
    torch.cuda.synchronize()
    stamps = SK.TIMESTAMPS.cpu()
    SK.TIMESTAMPS = None
    log = SK.TS_LOG[5:15]  # layers 1 and 2: qkv, attention, o, gate|up, down
    t_ref = stamps[log[0][1]:log[0][1] + 4 * log[0][2]].view(-1, 4)[:, 0].min().item()
    print("  timeline (us from layer 1's first qkv program; per kernel min/median/max over programs)")
    tl_rows = []
    for (name, first, n), label in zip(log, ["qkv", "attn", "o", "gu", "down"] * 2):
        st = (stamps[first:first + 4 * n].view(n, 4).double() - t_ref) / 1000
        mm = lambda c: (st[:, c].min().item(), st[:, c].median().item(), st[:, c].max().item())  # noqa: E731
        row = {"kernel": label, "programs": n, "entry": mm(0), "after_wait": mm(1), "loop_end": mm(2), "end": mm(3)}
        tl_rows.append(row)
        print(f"  {label:5s} n={n:3d} entry {row['entry'][0]:6.2f}/{row['entry'][1]:6.2f}/{row['entry'][2]:6.2f}"
              f"  wait-done {row['after_wait'][0]:6.2f}/{row['after_wait'][1]:6.2f}/{row['after_wait'][2]:6.2f}"
              f"  loop-end {row['loop_end'][0]:6.2f}/{row['loop_end'][1]:6.2f}/{row['loop_end'][2]:6.2f}"
              f"  end {row['end'][0]:6.2f}/{row['end'][1]:6.2f}/{row['end'][2]:6.2f}")
    res.setdefault("timeline", {})[key] = tl_rows
    SK.TS_LOG.clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", default=None, help="JSON {name: StackPlan kwargs (+ 'work': phase bit mask)}")
    ap.add_argument("--timeline", action="store_true", help="also print per-program timestamps of the per-kernel path")
    ap.add_argument("--pk", default=None, help='JSON {name: overrides of PK_BASE} for the per-kernel path ("base" is always run)')
    args = ap.parse_args()
    pk_variants = {"base": {}}
    pk_variants.update(json.loads(args.pk) if args.pk else {})
    dev = "cuda"
    torch.manual_seed(0)
    bf = torch.bfloat16
    w = lambda n, k: (torch.randn(L, n, k, device=dev) * k**-0.5).to(bf)  # noqa: E731
    wqkv, wo, wgu, wdn = w((NQ + 2) * HD, D), w(D, NQ * HD), w(2 * F, D), w(D, F)
    variants = {"stack": {}, "flag_barrier": {"barrier": 1}, "line_prefetch": {"prefetch": 1}, "bulk_prefetch": {"prefetch": 2},
                "bulk_ahead1": {"prefetch": 2, "ahead": 1}, "bulk_ahead3": {"prefetch": 2, "ahead": 3},
                "barriers_only": {"work": 0}, "flag_barriers_only": {"work": 0, "barrier": 1},
                "no_qkv": {"work": 31 - 1}, "no_attn": {"work": 31 - 2},
                "no_o": {"work": 31 - 4}, "no_gu": {"work": 31 - 8}, "no_down": {"work": 31 - 16}}
    if args.variants is not None:
        variants = json.loads(args.variants)
    res = {"card": torch.cuda.get_device_name(), "rows": []}
    print(f"card {res['card']}  (one flow step = {L} layers; us per step / per layer)")
    for V in args.views:
        T = 256 * V + 48
        TK = T + S
        kc = (torch.randn(L, TK, HD, device=dev)).to(bf)
        vc = (torch.randn(L, TK, HD, device=dev)).to(bf)
        valid = torch.ones(T, dtype=torch.int32, device=dev)
        pos = torch.arange(TK, dtype=torch.int32, device=dev)
        cos, sin = RQR.rope_tables(TK + 8, HD, device=dev)
        xs0 = torch.randn(S, D, device=dev)
        nss = D // 32
        xs, xa, ss = xs0.clone(), torch.empty(S, D, dtype=bf, device=dev), torch.empty(nss, S, device=dev)
        q, o, h = (torch.empty(S, n, dtype=bf, device=dev) for n in (NQ * HD, NQ * HD, F))
        r0, R = 1, S - 1

        def reset():
            xs.copy_(xs0)
            SK.prep_rows(xs, xa, ss)

        # per-kernel skinny path (the engine's default: 5 launches per layer, PDL), with the engine's shapes
        # (triton_engine.Tuning) or the --pk variants' overrides
        wsp = Workspace(dev, numel=1 << 22)
        wq32 = torch.stack([SK.transpose_weight(wqkv[i].t()) for i in range(L)])  # any column order: timing only
        kw = lambda c: dict(block=(64, c[0], c[1]), num_warps=c[2], num_stages=c[3], split=c[4], workspace=wsp,  # noqa: E731
                            pdl=True, peel=c[5] if len(c) > 5 else 1)

        def per_kernel_fn(cfg):
            att = cfg["attn%d" % min(V, 3)]
            gu_gluon = None
            if cfg.get("gu_gluon"):  # gate|up on the Gluon slab matmul (plain bf16 store, no GeGLU): does the early
                from pi0_triton_policy.kernels import slab_matmul as SM  # weight stream pay inside the real chain?

                bn, split, nw, na = cfg["gu_gluon"]
                plans = [SM.SlabPlan(wgu[i], bn, split, nw, na) for i in range(L)]
                h8 = torch.empty(S, 2 * F, dtype=bf, device=dev)
                gu_gluon = (plans, plans[0].a_desc(xa[r0:]), h8)
            preload = cfg["preload"][min(V, 3) - 1]
            nss_pk = D // (2 * cfg["o"][0])
            ss_pk = torch.zeros(nss_pk, S, device=dev)
            norm = dict(ss_in=ss_pk[:, r0:], nss_in=nss_pk, d_norm=D, eps=1e-6)
            assert cfg["o"][0] == cfg["down"][0]

            off = set(cfg.get("off", ()))  # kernels left out: `base - without X` is X's share of the chain

            def per_kernel(_i=0):
                SK.PREFETCH = cfg.get("prefetch", 0)  # read at launch: 1 / 2 = L2 prefetch of each program's weights
                for i in range(L):
                    if "qkv" not in off:
                        SK.skinny_qkv_rope(xa[r0:], wq32[i], pos[T + r0:], cos, sin, q[:R], kc[i, T + r0:], vc[i, T + r0:],
                                           NQ, HD, **norm, **kw(cfg["qkv"]))
                    if "attn" not in off:
                        AA.action_attention(q[:R], kc[i], vc[i], valid, T, r0, NQ, out=o[:R], split=att[4], block=att[:2],
                                            num_warps=att[2], num_stages=att[3], workspace=wsp, pdl=True, preload=preload,
                                            peel=bool(att[5]) if len(att) > 5 else True)
                    if "o" not in off:
                        SK.skinny_residual(o[:R], wo[i], xs[r0:], xa[r0:], ss_pk[:, r0:], **kw(cfg["o"]))
                    if "gu" not in off and gu_gluon is not None:
                        SM.slab_matmul(gu_gluon[0][i], gu_gluon[1], R, gu_gluon[2][:R], pdl=True)
                    elif "gu" not in off:
                        SK.skinny_geglu(xa[r0:], wgu[i], h[:R], **norm, **kw(cfg["gu"]))
                    if "down" not in off:
                        SK.skinny_residual(h[:R], wdn[i], xs[r0:], xa[r0:], ss_pk[:, r0:], **kw(cfg["down"]))
            return per_kernel, ss_pk

        for pk_name, over in pk_variants.items():
            cfg = dict(PK_BASE, **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()})
            per_kernel, ss_pk = per_kernel_fn(cfg)
            xs.copy_(xs0)
            SK.prep_rows(xs, xa, ss_pk)
            t = time_graph(per_kernel)
            res["rows"].append({"views": V, "variant": "pk_" + pk_name, "us_step": t, "cfg": cfg})
            print(f"views={V} pk_{pk_name:11s} {t:8.1f} us/step  {t / L:6.2f} us/layer", flush=True)
            if args.timeline and not cfg.get("off"):  # per-program stamps of layers 1-2 (eager, one step)
                timeline(per_kernel, res, f"{V}/{pk_name}")
        for name, kwv in variants.items():
            kwv = dict(kwv)
            work = kwv.pop("work", 31)
            p = dict(DEFAULT, attn=(16, 128, 2, 4) if V == 1 else (16, 64, 2, 4))
            p.update(kwv)
            plan = AS.StackPlan(D, F, NQ, HD, TK, p.pop("bh_qkv"), p.pop("bh_gu"), p.pop("bh_res"), device=dev, **p)
            plan.work = work
            n_ws, n_aws = plan.workspace_numel()
            ws, aws = torch.empty(n_ws, device=dev), torch.empty(n_aws, device=dev)
            cnt = torch.zeros(4096, dtype=torch.int32, device=dev)
            bars = torch.zeros(64, 256, dtype=torch.int32, device=dev)

            def stack(i=0):
                if i == 0:
                    bars.zero_()
                AS.action_stack(plan, xs[r0:], xa[r0:], ss[:, r0:], q[:R], o[:R], h[:R], kc, vc, valid, pos[T + r0:], cos,
                                sin, wqkv, wo, wgu, wdn, ws, cnt, aws, bars[i], T, r0, 1e-6)

            reset()
            t = time_graph(stack, indexed=True)
            res["rows"].append({"views": V, "variant": name, "us_step": t, "nprog": plan.nprog})
            print(f"views={V} {name:14s} {t:8.1f} us/step  {t / L:6.2f} us/layer", flush=True)
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
