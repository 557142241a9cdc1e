"""Does a persistent kernel whose weight stream never stops (kernels/mega_chain.py) beat the kernel-per-op chain?
Same four matmuls, shapes and weights as slab_probe / cluster_probe (qkv, o, gate|up, down; 50 rows; 18 layers):
checks the kernel against torch (1 and 18 layers, bitwise repeatability), times one flow step in a CUDA graph, and
prints a per-op timeline (%globaltimer per program). Compare with
`stack_probe.py --views 1 --pk '{"noattn": {"off": ["attn"]}}'` (the engine's Triton chain) run in the same call.

    python benchmarks/mega_probe.py [--json out.json] [--layer] [--ahead 0 2 4] [--a-pipe 0 1] [--pub 0 1 2] [--wgd 1 2 3] [--loader 0 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pi0_triton_policy.kernels import mega_chain as MC
from slab_probe import L, chain_setup  # noqa: E402 (benchmarks/ is the script's directory)
from stack_probe import time_graph  # noqa: E402

OPS = ("qkv", "o", "gu", "down")
COLS = dict(x=1024, q=2560, x2=1024, h8=8192)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def timeline(ts, programs, layers=L):
    """Per op, medians over layers 1..layers-2 (us): previous op's last publish -> this unit's activations ready
    (median over programs), activation load, MMAs (incl. any wait for the ring), reduce + store + publish (median,
    max), and the span: previous op's last publish -> this op's last publish (the link cost on the critical path)."""
    st = ts.view(programs, layers, 4, 8).cpu().double() / 1000.0
    rows = {op: [] for op in OPS}
    for i in range(1, layers - 1):
        for p, op in enumerate(OPS):
            t = st[:, i, p]
            pl, pp = (i, p - 1) if p > 0 else (i - 1, 3)
            prev_last = st[:, pl, pp, 3].max()
            rows[op].append([(t[:, 0] - prev_last).median(), (t[:, 1] - t[:, 0]).median(), (t[:, 2] - t[:, 1]).median(),
                             (t[:, 3] - t[:, 2]).median(), (t[:, 3] - t[:, 2]).max(), t[:, 3].max() - prev_last])
    names = ["prev_pub->ready", "A_load", "mma", "pub_med", "pub_max", "span"]
    return {op: dict(zip(names, [round(float(torch.tensor(v)[:, j].median()), 2) for j in range(len(names))]))
            for op, v in rows.items()}


STAMPS_DIR = None  # --stamps DIR
T0 = time.time()


_SOURCE = MC._SOURCE
_BLOAT_AT = "    const unsigned aparity = au & 1;\n    ++au;\n    if (!LOADER) {"


def set_bloat(k: int):
    """--bloat K: K extra straight-line instructions (mad.lo over 8 registers, nothing ptxas can fold) at the start of
    every program's qkv unit, executed once per layer by the consumer warpgroup. Warm in the instruction cache they
    cost ~K cycles; fetched anew every layer, ~10x that (NOTES.md session 12). Patches the kernel source in this
    process only; the compiled kernels are re-made."""
    assert _SOURCE.count(_BLOAT_AT) == 1, "the qkv unit's start moved: update _BLOAT_AT"
    src = _SOURCE
    if k:
        regs = ", ".join(f"d{i} = tid + {i}" for i in range(8))
        body = "".join(f'asm volatile("mad.lo.u32 %0, %0, %1, %2;" : "+r"(d{i % 8}) : "r"(d{(i + 3) % 8}), '
                       f'"r"(d{(i + 5) % 8}));' for i in range(k))
        src = src.replace(_BLOAT_AT, f"    if (P == 0) {{ unsigned {regs}; {body}\n"
                          "        if (d0 + d1 + d2 + d3 + d4 + d5 + d6 + d7 == 0x7fffffffu) asm volatile(\"trap;\"); }\n"
                          + _BLOAT_AT)
    MC._SOURCE = src
    MC._kernel_and_programs.cache_clear()


def layer_mode(weights, ctr, attn=0, T=304, shared_kv=False, pub=MC.PUB, ahead=MC.AHEAD, mcast=MC.MCAST, gelu=MC.GELU,
               pf=MC.PF, rcp=MC.RCP, pair=MC.PAIR, spack=MC.SPACK, ns=MC.NS, tail=MC.TAIL, stamp_code=0, roll=MC.ROLL,
               exp=MC.EXP):
    """The chain with the real layer's epilogues (MegaPlan(layer=True)): checked against mega_layer_reference (1 and
    18 layers, bitwise repeat), then timed like the plain chain. attn: the attention link too (1: session 7's unit,
    2: packed rows on 100 programs; kernels/mega_chain.py) over a T-key prefix (304: 1 camera, 816: 3)."""
    bf, dev = torch.bfloat16, "cuda"
    from pi0_triton_policy.kernels.rmsnorm_qkv_rope import rope_tables

    plan = MC.plan_for_this_gpu(layer=True, pair=pair)
    if attn:  # queries scaled by HD^-0.5 as the engine folds it into the weights
        weights = dict(weights, qkv=weights["qkv"].clone())
        weights["qkv"][:, :2048] = (weights["qkv"][:, :2048].float() / 16).to(bf)
    prepared = {op: plan.prepare(weights[op], op) for op in OPS}
    cols = dict(x=1024, q=2560, x2=1024, h8=4096)
    acts = {k: torch.zeros(MC.blocked_size(c), dtype=bf, device=dev) for k, c in cols.items()}
    cos, sin = rope_tables(1024, 256, device=dev)
    pos = torch.arange(T, T + MC.R, dtype=torch.int32, device=dev)  # the suffix after the prefix
    st = dict(xs=torch.zeros(MC.R, 1024, device=dev), ss=torch.zeros(2, plan.programs // 4, MC.R, device=dev),
              pos=pos, cos=cos, sin=sin, eps=1e-6)
    kv_prefix = None
    if attn:  # a prefix of T keys (the last 11 prompt keys padding) shared by every layer
        g = torch.Generator(device=dev).manual_seed(1)
        kv_shape = (L, T, 256) if attn >= 2 and not shared_kv else (T, 256)  # ATTN 2 / 3: a cache per layer, as the engine
        kp = torch.randn(*kv_shape, device=dev, generator=g).to(bf)
        vp = torch.randn(*kv_shape, device=dev, generator=g).to(bf)
        valid = torch.ones(T, dtype=torch.int32, device=dev)
        valid[T - 11:] = 0
        pad = MC.kv_rows(T, MC.R, attn) - T  # the suffix rows (+ ATTN 2 / 3's zero rows past the keys)
        sw = lambda t: MC.kv_layout(t, attn)  # noqa: E731 (ATTN 2 kv_swizzle's layout, ATTN 3 kv_blocked's)
        def cache(p):  # the prefix, then the suffix rows and zero rows, per layer for ATTN 2 / 3
            if p.dim() == 2:
                return sw(torch.cat([p, torch.zeros(pad, 256, dtype=bf, device=dev)]))
            return torch.stack([sw(torch.cat([x, torch.zeros(pad, 256, dtype=bf, device=dev)])) for x in p])

        st.update(T=T, kc=cache(kp), vc=cache(vp),
                  key_valid=torch.cat([valid, torch.ones(MC.R, dtype=torch.int32, device=dev),
                                       torch.zeros(16, dtype=torch.int32, device=dev)]),
                  att=torch.zeros(MC.blocked_size(2048), dtype=bf, device=dev), attn_mode=attn)
        kv_prefix = (kp, vp, valid)
    x0 = torch.randn(MC.R, 1024, device=dev)

    def reset():
        st["xs"].copy_(x0)
        st["ss"].zero_()
        st["ss"][0, 0] = x0.pow(2).sum(1)
        MC.to_blocked(x0.to(bf), acts["x"])

    out = {"variant": (f"mega_layer_attn{attn}_T{T}{'_shared_kv' if shared_kv else ''}" if attn else "mega_layer")
           + (f"_pub{pub}" if pub != MC.PUB else "") + (f"_ahead{ahead}" if ahead != MC.AHEAD else "")
           + (f"_mcast{mcast}" if mcast != MC.MCAST else "") + (f"_gelu{gelu}" if gelu != MC.GELU else "")
           + (f"_pf{pf}" if pf != MC.PF else "") + (f"_rcp{rcp}" if rcp != MC.RCP else "")
           + (f"_pair{pair}" if pair != MC.PAIR else "") + (f"_spack{spack}" if spack != MC.SPACK else "")
           + (f"_ns{ns}" if ns != MC.NS else "") + (f"_tail{tail}" if tail != MC.TAIL else "")
           + ("_stampcode" if stamp_code else "") + (f"_roll{roll}" if roll != MC.ROLL else "")
           + (f"_exp{exp}" if exp != MC.EXP else "")}
    for layers in (1, L):
        reset()
        MC.mega_chain(plan, prepared, acts, ctr, layers, layer_state=st, pub=pub, ahead=ahead, mcast=mcast, gelu=gelu, pf=pf, rcp=rcp, spack=spack, ns=ns, tail=tail, roll=roll, exp=exp)
        torch.cuda.synchronize()
        ref = MC.mega_layer_reference(x0, weights, layers, pos, cos, sin, st["eps"], kv_prefix)
        got = dict(xs=st["xs"].clone(), q=MC.from_blocked(acts["q"], 2560), h=MC.from_blocked(acts["h8"], 4096))
        out[f"err_{layers}"] = {k: round(rel(got[k], ref[k]), 5) for k in got}
        reset()
        MC.mega_chain(plan, prepared, acts, ctr, layers, layer_state=st, pub=pub, ahead=ahead, mcast=mcast, gelu=gelu, pf=pf, rcp=rcp, spack=spack, ns=ns, tail=tail, roll=roll, exp=exp)
        torch.cuda.synchronize()
        out[f"bitwise_repeat_{layers}"] = bool(torch.equal(st["xs"], got["xs"]))
    print("layer mode vs torch:", out, f"({time.time() - T0:.0f} s since start)", flush=True)
    t = time_graph(lambda: MC.mega_chain(plan, prepared, acts, ctr, L, layer_state=st, pub=pub, ahead=ahead, mcast=mcast, gelu=gelu, pf=pf, rcp=rcp, spack=spack, ns=ns, tail=tail,
                                         ts_code=stamp_code, roll=roll, exp=exp))
    ts = torch.zeros(plan.programs * L * 32, dtype=torch.int64, device=dev)
    MC.mega_chain(plan, prepared, acts, ctr, L, timestamps=ts, layer_state=st, pub=pub, ahead=ahead, mcast=mcast, gelu=gelu, pf=pf, rcp=rcp, spack=spack, ns=ns, tail=tail, roll=roll, exp=exp)
    torch.cuda.synchronize()
    out.update(us_step=t, us_layer=t / L, timeline=timeline(ts, plan.programs))
    if STAMPS_DIR:  # every program's stamps [programs, layers, 4 ops, 8] (ns) and the plan's columns, for offline study
        torch.save({"ts": ts.view(plan.programs, L, 4, 8).cpu(), "meta": plan.meta},
                   f"{STAMPS_DIR}/{out['variant']}.pt")
    if attn:  # the attention units (programs 0..31 / 0..99, o's stamp slots 4..7): Q in -> keys done -> merged -> published
        na = 100 if attn == 2 else 32  # ATTN 1 / 3: the 8 head clusters
        st_ = ts.view(plan.programs, L, 4, 8)[:na, 1:L - 1, 1].cpu().double() / 1000.0
        qkv_last = ts.view(plan.programs, L, 4, 8)[:, 1:L - 1, 0, 3].cpu().double().max(0).values / 1000.0
        out["attention_unit_us"] = {
            "qkv_last_pub->Q_in": round(float((st_[:, :, 4] - qkv_last).median()), 2),
            "keys_loop": round(float((st_[:, :, 5] - st_[:, :, 4]).median()), 2),
            "merge+store": round(float((st_[:, :, 6] - st_[:, :, 5]).median()), 2),
            "merge+store_max": round(float((st_[:, :, 6] - st_[:, :, 5]).max()), 2),
            "publish": round(float((st_[:, :, 7] - st_[:, :, 6]).median()), 2)}
        s0 = ts.view(plan.programs, L, 4, 8)[:na, 1:L - 1, 0].cpu().double() / 1000.0
        out["attention_unit_us"].update({
            "keys_done->partials_in": round(float((s0[:, :, 4] - st_[:, :, 5]).median()), 2),
            "partials_in_max_over_cluster_minus_min_keys_done": round(float((s0[:, :, 4] - st_[:, :, 5]).max()), 2),
            "owner_merge": round(float((s0[:, :, 5] - s0[:, :, 4]).median()), 2)})
        if attn == 2:  # keys_done->partials_in split: the rank's 4 warps merged, then the other ranks' slices in
            out["attention_unit_us"].update({
                "keys_done->rank_merged": round(float((s0[:, :, 6] - st_[:, :, 5]).median()), 2),
                "rank_merged->partials_in": round(float((s0[:, :, 4] - s0[:, :, 6]).median()), 2),
                "Q_in_spread_over_programs": round(float((st_[:, :, 4].max(0).values - st_[:, :, 4].min(0).values).median()), 2),
                "keys_done_spread_over_programs": round(float((st_[:, :, 5].max(0).values - st_[:, :, 5].min(0).values).median()), 2)})
        print("attention unit:", out["attention_unit_us"], flush=True)
    print(f"mega_chain LAYER{f' + ATTN {attn}, {T} prefix keys' if attn else ''}{' (shared K/V)' if shared_kv else ''} (norm, RoPE, GeGLU, residual epilogues): {t:8.1f} us/step "
          f"{t / L:6.2f} us/layer")
    for op, v in out["timeline"].items():
        print(f"    {op:5s} " + "  ".join(f"{a} {b:6.2f}" for a, b in v.items()), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--ahead", type=int, nargs="+", default=[MC.AHEAD], help="L2 prefetch distances (ops) to time")
    ap.add_argument("--a-pipe", type=int, nargs="+", default=[MC.A_PIPE], help="activation load in 4 groups (1) or whole (0)")
    ap.add_argument("--pub", type=int, nargs="+", default=[MC.PUB], help="publish variants (kernels/mega_chain.py)")
    ap.add_argument("--loader", type=int, nargs="+", default=[MC.LOADER], help="activation loader warp (1) or not (0)")
    ap.add_argument("--layer", action="store_true", help="also the real layer's epilogues (RMSNorm, RoPE, GeGLU, residual)")
    ap.add_argument("--attn", type=int, nargs="*", default=[], help="also the layer with its attention link: modes (1, 2, 3)")
    ap.add_argument("--prefix-keys", type=int, nargs="+", default=[304], help="prefix keys for --attn (304: 1 camera)")
    ap.add_argument("--shared-kv", action="store_true", help="ATTN 2 also with one K / V cache for every layer")
    ap.add_argument("--mcast", type=int, nargs="+", default=[MC.MCAST], help="--layer / --attn runs: activations multicast (1) or not (0)")
    ap.add_argument("--stamps", default=None, help="directory: save every program's stamps of the layer runs")
    ap.add_argument("--stamp-code", type=int, nargs="+", default=[0],
                    help="--layer / --attn runs: time the kernel with the stamps' code compiled in (1) or out (0)")
    ap.add_argument("--roll", type=int, nargs="+", default=[MC.ROLL],
                    help="--layer / --attn runs: qkv's / gate|up's epilogues rolled (1) or unrolled (0) (kernels/mega_chain.py ROLL)")
    ap.add_argument("--bloat", type=int, nargs="+", default=[0],
                    help="--layer / --attn runs: K extra straight-line instructions per layer in the qkv unit (set_bloat)")
    ap.add_argument("--gelu", type=int, nargs="+", default=[MC.GELU], help="--layer / --attn runs: gate|up's GELU variant")
    ap.add_argument("--pf", type=int, nargs="+", default=[MC.PF], help="--layer / --attn runs: lazy L2 prefetch lookahead (chunks)")
    ap.add_argument("--rcp", type=int, nargs="+", default=[MC.RCP], help="--attn 2 runs: softmax normalisers (0 IEEE, 1 fast)")
    ap.add_argument("--pair", type=int, nargs="+", default=[MC.PAIR], help="--layer / --attn runs: qkv / gate|up unit half-width (8, 4)")
    ap.add_argument("--spack", type=int, nargs="+", default=[MC.SPACK], help="--layer / --attn runs: two narrow chunks per ring slot (1)")
    ap.add_argument("--tail", type=int, nargs="+", default=[MC.TAIL], help="--layer / --attn runs: L2 prefetch past the ring (0, 1 gate|up, 2 all)")
    ap.add_argument("--exp", type=int, nargs="+", default=[MC.EXP],
                    help="--layer / --attn runs: exponentials (0 __expf, 1 ex2.approx.ftz; kernels/mega_chain.py fexp)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the --layer / --attn runs (variants alternate)")
    ap.add_argument("--skip-plain", action="store_true", help="only the --layer / --attn runs")
    ap.add_argument("--wgd", type=int, nargs="+", default=[MC.WGD], help="wgmma groups in flight before a slot is freed")
    args = ap.parse_args()
    global STAMPS_DIR
    STAMPS_DIR = args.stamps
    bf = torch.bfloat16
    weights, _, _ = chain_setup("cuda")
    plan = MC.plan_for_this_gpu()
    prepared = {op: plan.prepare(weights[op], op) for op in OPS}
    acts = {k: torch.zeros(MC.blocked_size(c), dtype=bf, device="cuda") for k, c in COLS.items()}
    ctr = torch.zeros(L * 128, dtype=torch.int32, device="cuda")
    res = {"card": torch.cuda.get_device_name(), "rows": []}
    print(f"card {res['card']}  mega_chain: {plan.programs} programs, ring {MC.NS} x {MC.SLOT // 1024} KB, "
          f"smem {MC.SMEM // 1024} KB", flush=True)

    errs = {}
    for layers in (1, L):
        x0 = torch.randn(MC.R, 1024, device="cuda").to(bf)
        MC.to_blocked(x0, acts["x"])
        MC.mega_chain(plan, prepared, acts, ctr, layers)
        torch.cuda.synchronize()
        ref = MC.mega_chain_reference(x0, weights, layers)
        errs[layers] = {k: round(rel(MC.from_blocked(acts[k], c), ref[k]), 5) for k, c in COLS.items()}
        first = {k: v.clone() for k, v in acts.items()}
        MC.to_blocked(x0, acts["x"])
        MC.mega_chain(plan, prepared, acts, ctr, layers)
        torch.cuda.synchronize()
        errs[f"{layers}_bitwise_repeat"] = all(torch.equal(first[k], acts[k]) for k in COLS)
    print("max rel err vs torch:", errs, flush=True)

    variants = [dict(ahead=a, a_pipe=p, pub=u, wgd=w, loader=d) for a in args.ahead for p in args.a_pipe
                for u in args.pub for w in args.wgd for d in args.loader]
    for v in ([] if args.skip_plain else variants):
        name = "_".join(f"{k}{x}" for k, x in v.items())
        if v != dict(ahead=MC.AHEAD, a_pipe=MC.A_PIPE, pub=MC.PUB, wgd=MC.WGD, loader=MC.LOADER):  # must match the default's result
            x0 = torch.randn(MC.R, 1024, device="cuda").to(bf)
            MC.to_blocked(x0, acts["x"])
            MC.mega_chain(plan, prepared, acts, ctr, L)
            ref = {k: v.clone() for k, v in acts.items()}
            MC.to_blocked(x0, acts["x"])
            MC.mega_chain(plan, prepared, acts, ctr, L, **v)
            torch.cuda.synchronize()
            errs[f"{name}_equal_to_default"] = all(torch.equal(ref[k], acts[k]) for k in COLS)
            print(f"{name} bitwise equal to the default: {errs[f'{name}_equal_to_default']}", flush=True)
        t = time_graph(lambda: MC.mega_chain(plan, prepared, acts, ctr, L, **v))
        ts = torch.zeros(plan.programs * L * 32, dtype=torch.int64, device="cuda")
        MC.mega_chain(plan, prepared, acts, ctr, L, timestamps=ts, **v)
        torch.cuda.synchronize()
        tl = timeline(ts, plan.programs)
        print(f"mega_chain {name}: {t:8.1f} us/step {t / L:6.2f} us/layer (4 matmuls, "
              f"{sum(w[0].numel() for w in weights.values()) * 2 / 1e6:.1f} MB of weights per layer)")
        for op, v in tl.items():
            print(f"    {op:5s} " + "  ".join(f"{a} {b:6.2f}" for a, b in v.items()), flush=True)
        res["rows"].append({"variant": f"mega_chain_{name}", "us_step": t, "us_layer": t / L, "errors": errs,
                            "timeline": tl, "ring": [MC.NS, MC.SLOT], "ops": MC.OPS, "programs": plan.programs,
                            "wait": plan.wait})
    for rnd in range(args.rounds):  # --pub / --ahead variants alternate, so an A/B sees the same drift
        for pub, ahead, mcast, gelu, pf, rcp, pair, spack, tail, sc in [
                (p, a, m, u, f, r, w, k, t, c) for p in args.pub for a in args.ahead for m in args.mcast for u in args.gelu
                for f in args.pf for r in args.rcp for w in args.pair for k in args.spack for t in args.tail
                for c in args.stamp_code]:
            v = dict(pub=pub, ahead=ahead, mcast=mcast, gelu=gelu, pf=pf, rcp=rcp, pair=pair, spack=spack, tail=tail,
                     stamp_code=sc)
            for bloat, roll, exp in [(b, r, e) for b in args.bloat for r in args.roll for e in args.exp]:
                set_bloat(bloat)
                v["roll"], v["exp"] = roll, exp
                if args.layer:
                    res["rows"].append(dict(layer_mode(weights, ctr, **v), bloat=bloat))
                for T in args.prefix_keys:
                    for mode in args.attn:
                        res["rows"].append(dict(layer_mode(weights, ctr, attn=mode, T=T, **v), bloat=bloat))
                        if mode == 2 and args.shared_kv:
                            res["rows"].append(dict(layer_mode(weights, ctr, attn=mode, T=T, shared_kv=True, **v),
                                                    bloat=bloat))
                if bloat or len(args.roll) > 1:
                    print(f"(the rows above: --bloat {bloat} --roll {roll})", flush=True)
            set_bloat(0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
