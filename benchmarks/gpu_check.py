"""One GPU call's worth of diagnosis: per-kernel time of a real engine run (torch.profiler), then an
op-level sweep of launch shapes for every kernel at the engine's real sizes, with cuBLAS (torch.mm)
at the same matmul shapes as the yardstick. Prints short tables; `--out DIR` gets the full logs.

    python benchmarks/gpu_check.py [--skip-sweep] [--skip-profile] [--only act,pre,vis]
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch
import triton

from pi0_triton_policy.config import get_variant
from pi0_triton_policy.kernels import (
    action_attention as AA,
    layernorm_linear as LNL,
    linear_residual as LR,
    prefix_attention as PA,
    rmsnorm_geglu as RG,
    rmsnorm_qkv_rope as RQR,
    skinny_matmul as SK,
    vision_attention as VA,
)
from pi0_triton_policy.kernels._common import Workspace

BF = torch.bfloat16


def bench(fn):
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # us
    except Exception as e:  # out of resources etc.
        return float("nan") if "resources" in str(e) or "shared" in str(e).lower() else float("nan")


def profile_engine(eng, views, log):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from benchmark import inputs

    args = [torch.from_numpy(a[None]).cuda() for a in inputs(eng.cfg, views, 48, seed=1)]
    args[0] = args[0].float()
    g = eng.graph_for(views)
    imgs = args[0][0][args[1][0].cpu().bool()]
    g.set_inputs(imgs, args[2][0], args[3][0], args[4][0], args[5][0])
    g.run()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.run()
        torch.cuda.synchronize()
    agg = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[ev.name[:40]]
            a[0] += 1
            a[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    tot = sum(v[1] for v in agg.values())
    log(f"\n### kernel time, one eager run, {views} view(s): {tot / 1e3:.2f} ms of GPU time")
    for name, (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        log(f"  {name:40s} x{n:4d}  {us / 1e3:7.3f} ms  {us / n:7.1f} us/call")


def sweep(only, log, out_dir="."):
    dev = "cuda"
    ws = Workspace(dev, numel=1 << 24, counters=1 << 14)
    rows = []

    def rec(group, op, cfg, us, bytes_=None, flops=None):
        extra = ""
        if bytes_:
            extra += f"  {bytes_ / us / 1e3:6.0f} GB/s"
        if flops:
            extra += f"  {flops / us / 1e6:6.0f} TFLOP/s"
        log(f"  {group:4s} {op:28s} {str(cfg):32s} {us:8.1f} us{extra}")
        rows.append({"group": group, "op": op, "cfg": str(cfg), "us": us})

    pc = get_variant("pi0")
    p, a, v = pc.prefix, pc.action, pc.vision
    if "skinny" in only:
        sweep_skinny(rec, ws, a, log, out_dir)
    if "act" in only:
        log("\n### action expert (M = 50 rows)")
        M = 50
        for D, g in ((a.width, a),):
            x = torch.randn(M, D, device=dev)
            xb = x.to(BF)
            wqkv = torch.randn(D, 10 * 256, device=dev, dtype=BF) * 0.03
            pos = torch.arange(M, device=dev, dtype=torch.int32)
            cos, sin = RQR.rope_tables(1024, 256, device=dev)
            q = torch.empty(M, 2048, device=dev, dtype=BF)
            kc = torch.empty(M, 256, device=dev, dtype=BF)
            vc = torch.empty(M, 256, device=dev, dtype=BF)
            nb = wqkv.numel() * 2
            rec("act", "cublas qkv 50x1024x2560", "-", bench(lambda: xb @ wqkv), nb)
            for cfg in ((64, 16, 128, 4, 4), (64, 32, 128, 4, 4), (64, 64, 128, 4, 4), (64, 32, 64, 4, 4), (64, 16, 256, 4, 3), (64, 32, 256, 4, 3)):
                rec("act", "qkv_rope", cfg, bench(lambda: RQR.rmsnorm_qkv_rope(x, wqkv, pos, cos, sin, q, kc, vc, 8, 256,
                    block=cfg[:3], num_warps=cfg[3], num_stages=cfg[4])), nb)
            wg = torch.randn(2, D, g.mlp_dim, device=dev, dtype=BF) * 0.03
            h = torch.empty(M, g.mlp_dim, device=dev, dtype=BF)
            nb = wg.numel() * 2
            wcat = torch.cat([wg[0], wg[1]], 1)
            rec("act", "cublas gate+up 50x1024x8192", "-", bench(lambda: xb @ wcat), nb)
            for cfg in ((64, 32, 128, 4, 4), (64, 64, 128, 4, 4), (64, 32, 64, 4, 4), (64, 16, 128, 4, 4), (64, 32, 256, 4, 3), (64, 64, 64, 4, 5)):
                rec("act", "geglu", cfg, bench(lambda: RG.rmsnorm_geglu(x, wg, out=h, block=cfg[:3], num_warps=cfg[3], num_stages=cfg[4])), nb)
            for K, name in ((2048, "o"), (g.mlp_dim, "down")):
                aa = torch.randn(M, K, device=dev, dtype=BF)
                w = torch.randn(K, D, device=dev, dtype=BF) * 0.02
                res = torch.randn(M, D, device=dev)
                nb = w.numel() * 2
                rec("act", f"cublas {name} 50x{K}x{D}", "-", bench(lambda: aa @ w), nb)
                for cfg in ((64, 32, 128, 4, 4, 4), (64, 32, 128, 4, 4, 8), (64, 64, 128, 4, 4, 8), (64, 64, 64, 4, 4, 8),
                            (64, 32, 64, 4, 4, 8), (64, 64, 128, 4, 4, 16), (64, 128, 128, 4, 4, 16), (64, 32, 256, 4, 3, 4)):
                    rec("act", f"linear_residual {name}", cfg, bench(lambda: LR.linear_residual(aa, w, res, split_k=cfg[5],
                        block=cfg[:3], num_warps=cfg[3], num_stages=cfg[4], workspace=ws)), nb)
        for views in (1, 3):
            T = views * 256 + 48
            kk = torch.randn(T + 51, 256, device=dev, dtype=BF)
            vv = torch.randn(T + 51, 256, device=dev, dtype=BF)
            qq = torch.randn(50, 2048, device=dev, dtype=BF)
            valid = torch.ones(T, device=dev, dtype=torch.int32)
            o = torch.empty(50, 2048, device=dev, dtype=BF)
            for cfg in ((32, 64, 4, 2, 8), (16, 64, 4, 2, 8), (16, 64, 4, 2, 16), (32, 64, 8, 2, 8), (16, 32, 4, 2, 16), (32, 64, 4, 2, 4), (16, 64, 4, 3, 8)):
                rec("act", f"action_attention T={T}", cfg, bench(lambda: AA.action_attention(qq, kk, vv, valid, T, 1, 8, out=o,
                    split=cfg[4], block=cfg[:2], num_warps=cfg[2], num_stages=cfg[3], workspace=ws)))
    if "pre" in only:
        for views in (1, 3):
            T = views * 256 + 48
            log(f"\n### prefix (T = {T})")
            D, F = p.width, p.mlp_dim
            x = torch.randn(T, D, device=dev)
            xb = x.to(BF)
            wg = torch.randn(2, D, F, device=dev, dtype=BF) * 0.02
            wcat = torch.cat([wg[0], wg[1]], 1)
            h = torch.empty(T, F, device=dev, dtype=BF)
            fl = 2 * T * D * 2 * F
            rec("pre", f"cublas gate+up {T}x{D}x{2 * F}", "-", bench(lambda: xb @ wcat), None, fl)
            for cfg in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 4)):
                rec("pre", "geglu", cfg, bench(lambda: RG.rmsnorm_geglu(x, wg, out=h, block=cfg[:3], num_warps=cfg[3], num_stages=cfg[4])), None, fl)
            for K, name in ((2048, "o"), (F, "down")):
                aa = torch.randn(T, K, device=dev, dtype=BF)
                w = torch.randn(K, D, device=dev, dtype=BF) * 0.02
                res = torch.randn(T, D, device=dev)
                fl = 2 * T * K * D
                rec("pre", f"cublas {name} {T}x{K}x{D}", "-", bench(lambda: aa @ w), None, fl)
                for cfg in ((128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2), (128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 3, 2), (64, 128, 64, 4, 4, 2), (128, 64, 64, 4, 4, 2)):
                    rec("pre", f"linear_residual {name}", cfg, bench(lambda: LR.linear_residual(aa, w, res, split_k=cfg[5],
                        block=cfg[:3], num_warps=cfg[3], num_stages=cfg[4], workspace=ws)), None, fl)
            wqkv = torch.randn(D, 2560, device=dev, dtype=BF) * 0.02
            pos = torch.arange(T, device=dev, dtype=torch.int32)
            cos, sin = RQR.rope_tables(1024, 256, device=dev)
            q = torch.empty(T, 2048, device=dev, dtype=BF)
            kc = torch.empty(T, 256, device=dev, dtype=BF)
            vc = torch.empty(T, 256, device=dev, dtype=BF)
            fl = 2 * T * D * 2560
            rec("pre", f"cublas qkv {T}x{D}x2560", "-", bench(lambda: xb @ wqkv), None, fl)
            for cfg in ((64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 32, 64, 4, 4)):
                rec("pre", "qkv_rope", cfg, bench(lambda: RQR.rmsnorm_qkv_rope(x, wqkv, pos, cos, sin, q, kc, vc, 8, 256,
                    block=cfg[:3], num_warps=cfg[3], num_stages=cfg[4])), None, fl)
            valid = torch.ones(T, device=dev, dtype=torch.int32)
            fl = 4 * T * T * 2048
            for cfg in ((64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 3), (64, 64, 4, 2)):
                rec("pre", "prefix_attention", cfg, bench(lambda: PA.prefix_attention(q, kc, vc, valid, 8, out=q.clone() if False else h[:, :2048],
                    block=cfg[:2], num_warps=cfg[2], num_stages=cfg[3])), None, fl)
    if "vis" in only:
        for views in (1, 3):
            M = views * 256
            log(f"\n### vision (M = {M})")
            W, F = v.width, v.mlp_dim
            x = torch.randn(M, W, device=dev)
            xb = x.to(BF)
            for N, name in ((3 * W, "qkv"), (F, "fc1")):
                w = torch.randn(W, N, device=dev, dtype=BF) * 0.02
                b = torch.zeros(N, device=dev)
                out = torch.empty(M, N, device=dev, dtype=BF)
                fl = 2 * M * W * N
                rec("vis", f"cublas {name} {M}x{W}x{N}", "-", bench(lambda: xb @ w), None, fl)
                for cfg in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4)):
                    rec("vis", f"layernorm_linear {name}", cfg, bench(lambda: LNL.layernorm_linear(x, w, b, out=out, act="gelu" if name == "fc1" else "none",
                        block=cfg[:3], num_warps=cfg[3], num_stages=cfg[4])), None, fl)
            for K, name in ((W, "o"), (F, "fc2")):
                aa = torch.randn(M, K, device=dev, dtype=BF)
                w = torch.randn(K, W, device=dev, dtype=BF) * 0.02
                res = torch.randn(M, W, device=dev)
                fl = 2 * M * K * W
                rec("vis", f"cublas {name} {M}x{K}x{W}", "-", bench(lambda: aa @ w), None, fl)
                for cfg in ((64, 64, 64, 4, 3, 1), (64, 64, 64, 4, 3, 2), (64, 64, 64, 4, 3, 4), (128, 64, 64, 4, 3, 2), (64, 128, 64, 4, 3, 2), (128, 128, 64, 8, 3, 4)):
                    rec("vis", f"linear_residual {name}", cfg, bench(lambda: LR.linear_residual(aa, w, res, split_k=cfg[5],
                        block=cfg[:3], num_warps=cfg[3], num_stages=cfg[4], workspace=ws)), None, fl)
            qkv = torch.randn(M, 3 * W, device=dev, dtype=BF)
            o = torch.empty(M, W, device=dev, dtype=BF)
            for cfg in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2)):
                rec("vis", "vision_attention", cfg, bench(lambda: VA.vision_attention(qkv, views, 16, out=o, block=cfg[:2],
                    num_warps=cfg[2], num_stages=cfg[3])))
    return rows


def sweep_skinny(rec, ws, a, log, out_dir):
    """The weight-streaming skinny matmuls (kernels/skinny_matmul.py) at the action expert's shapes vs cuBLAS,
    and the action attention per camera count; the fastest launch shapes go to OUT/best_tuning.json
    (Tuning fields, for $PI0_TUNING). do_bench medians, L2 flushed, one kernel at a time (no PDL overlap)."""
    dev, M, D, F = "cuda", 50, a.width, a.mlp_dim
    log("\n### skinny matmuls, M = 50 (us, GB/s of weights); cfg = (BH, BK, warps, stages, split)")
    best = {}

    def keep(op, c, us):
        if us == us and (op not in best or us < best[op][1]):
            best[op] = (c, us)

    xs = torch.randn(M, D, device=dev)
    xa = xs.to(BF)
    ss = torch.rand(D // 64, M, device=dev) + 1.0
    cos, sin = RQR.rope_tables(1024, 256, device=dev)
    pos = torch.arange(M, device=dev, dtype=torch.int32)
    q = torch.empty(M, 2048, device=dev, dtype=BF)
    kc, vc = torch.empty(M, 256, device=dev, dtype=BF), torch.empty(M, 256, device=dev, dtype=BF)
    h = torch.empty(M, F, device=dev, dtype=BF)
    w = torch.randn(D, 2560, device=dev, dtype=BF) * 0.03
    nb = w.numel() * 2
    rec("sk", "cublas qkv 50x1024x2560", "-", bench(lambda: xa @ w), nb)
    for c in ((32, 128, 4, 4, 2), (32, 128, 4, 2, 2), (32, 128, 4, 3, 2), (32, 128, 4, 2, 4), (16, 128, 4, 2, 2), (16, 128, 4, 3, 1),
              (16, 256, 4, 2, 2), (32, 256, 4, 2, 1), (64, 128, 4, 2, 2), (32, 64, 4, 3, 2), (16, 64, 4, 4, 1)):
        wt = SK.transpose_weight(w, SK.pair_perm_qkv(8, 256, c[0]))
        us = bench(lambda: SK.skinny_qkv_rope(xa, wt, pos, cos, sin, q, kc, vc, 8, 256, ss_in=ss, nss_in=16,
                   d_norm=D, block=(64, c[0], c[1]), num_warps=c[2], num_stages=c[3], split=c[4], workspace=ws))
        rec("sk", "skinny qkv+rope", c, us, nb)
        keep("sk_qkv", c, us)
    w = torch.randn(D, 2 * F, device=dev, dtype=BF) * 0.03
    nb = w.numel() * 2
    rec("sk", "cublas gate+up 50x1024x8192", "-", bench(lambda: xa @ w), nb)
    for c in ((32, 128, 4, 4, 1), (16, 128, 4, 4, 1), (32, 128, 4, 2, 1), (32, 128, 4, 3, 1), (32, 256, 4, 2, 1), (64, 128, 4, 3, 1),
              (16, 256, 4, 2, 1), (32, 64, 4, 4, 1), (32, 128, 8, 3, 1), (32, 128, 4, 2, 2)):
        wt = SK.transpose_weight(w, SK.pair_perm_geglu(F, c[0]))
        us = bench(lambda: SK.skinny_geglu(xa, wt, h, ss_in=ss, nss_in=16, d_norm=D,
                   block=(64, c[0], c[1]), num_warps=c[2], num_stages=c[3], split=c[4], workspace=ws))
        rec("sk", "skinny gate|up+geglu", c, us, nb)
        keep("sk_gu", c, us)
    res = {}  # (op, BH) -> (cfg, us)
    cands = {"o": ((32, 128, 4, 4, 4), (32, 128, 4, 2, 4), (32, 256, 4, 2, 4), (32, 128, 4, 2, 8), (32, 256, 4, 2, 2), (32, 512, 4, 2, 2),
                   (16, 128, 4, 2, 4), (16, 256, 4, 2, 4), (16, 256, 4, 2, 2), (16, 128, 4, 3, 2)),
             "down": ((32, 128, 4, 4, 4), (32, 128, 4, 2, 8), (32, 256, 4, 2, 4), (32, 256, 4, 3, 4), (32, 512, 4, 2, 2), (32, 256, 4, 2, 8),
                      (16, 256, 4, 2, 4), (16, 128, 4, 2, 8), (16, 256, 4, 3, 2), (16, 512, 4, 2, 2))}
    for K, name in ((2048, "o"), (F, "down")):
        aa = torch.randn(M, K, device=dev, dtype=BF)
        w = torch.randn(K, D, device=dev, dtype=BF) * 0.02
        wt = SK.transpose_weight(w)
        nb = w.numel() * 2
        rec("sk", f"cublas {name} 50x{K}x{D}", "-", bench(lambda: aa @ w), nb)
        for c in cands[name]:
            sso = torch.empty(D // (2 * c[0]), M, device=dev)
            us = bench(lambda: SK.skinny_residual(aa, wt, xs, xa, sso, block=(64, c[0], c[1]),
                       num_warps=c[2], num_stages=c[3], split=c[4], workspace=ws))
            rec("sk", f"skinny {name}+residual", c, us, nb)
            if us == us and ((name, c[0]) not in res or us < res[(name, c[0])][1]):
                res[(name, c[0])] = (c, us)
    ht = torch.randn(M, D, device=dev)
    w = torch.randn(D, D, device=dev) * 0.03
    wt = SK.transpose_weight(w)
    b = torch.randn(D, device=dev)
    xt, w1, tb = torch.randn(M, 32, device=dev), torch.randn(32, D, device=dev) * 0.1, torch.randn(D, device=dev)
    rec("sk", "swish_in 50x32x1024", "-", bench(lambda: SK.swish_in(xt, w1, tb, ht)))
    for c in ((32, 64, 4, 4, 8), (32, 64, 4, 2, 8), (32, 128, 4, 2, 8), (32, 64, 4, 2, 4), (32, 32, 4, 2, 8),
              (16, 64, 4, 4, 8), (16, 64, 4, 2, 8), (16, 128, 4, 2, 4)):
        sso = torch.empty(D // (2 * c[0]), M, device=dev)
        us = bench(lambda: SK.skinny_residual(ht, wt, xs, xa, sso, bias=b, store=True,
                   block=(64, c[0], c[1]), num_warps=c[2], num_stages=c[3], split=c[4], workspace=ws))
        rec("sk", "skinny time_out fp32", c, us, w.numel() * 4)
        if us == us and (("time", c[0]) not in res or us < res[("time", c[0])][1]):
            res[("time", c[0])] = (c, us)
    # one BH for the three residual matmuls (they share the norm-statistics tiles): 18 o + 18 down + 1 time per step
    score = {bh: 18 * res[("o", bh)][1] + 18 * res[("down", bh)][1] + res[("time", bh)][1]
             for bh in (16, 32) if all((n, bh) in res for n in ("o", "down", "time"))}
    if score:
        bh = min(score, key=score.get)
        best["sk_o"], best["sk_down"], best["sk_time"] = res[("o", bh)], res[("down", bh)], res[("time", bh)]
    for views in (1, 2, 3):
        T = views * 256 + 48
        kk = torch.randn(T + 51, 256, device=dev, dtype=BF)
        vv = torch.randn(T + 51, 256, device=dev, dtype=BF)
        qq = torch.randn(50, 2048, device=dev, dtype=BF)
        valid = torch.ones(T, device=dev, dtype=torch.int32)
        o = torch.empty(50, 2048, device=dev, dtype=BF)
        for cfg in ((32, 64, 4, 2, 8), (16, 64, 4, 2, 8), (16, 64, 4, 2, 0), (16, 128, 4, 2, 0), (32, 128, 8, 2, 0), (16, 64, 4, 2, 4),
                    (32, 64, 4, 2, 4), (16, 128, 4, 2, 4), (32, 128, 8, 2, 4), (64, 64, 8, 2, 4)):
            us = bench(lambda: AA.action_attention(qq, kk, vv, valid, T, 1, 8, out=o,
                       split=cfg[4], block=cfg[:2], num_warps=cfg[2], num_stages=cfg[3], workspace=ws))
            rec("sk", f"action_attention T={T}", cfg, us)
            keep(f"sk_attn{views}", cfg, us)
    log("\n### best launch shapes (written to best_tuning.json)")
    for k, (c, us) in best.items():
        log(f"  {k:10s} {str(c):24s} {us:7.1f} us")
    with open(os.path.join(out_dir, "best_tuning.json"), "w") as f:
        json.dump({k: list(c) for k, (c, _) in best.items()}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--only", default="act,pre,vis")
    ap.add_argument("--profile-views", default="1,3")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"card {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if not args.skip_profile:
        from pi0_triton_policy.triton_engine import TritonPi0
        from pi0_triton_policy.weights import random_params

        cfg = get_variant("pi0")
        params = random_params(cfg, seed=0, device="cuda", dtype=BF)
        eng = TritonPi0(cfg, params, device="cuda", use_graphs=False)
        del params
        for views in map(int, args.profile_views.split(",")):
            profile_engine(eng, views, log)
        del eng
        torch.cuda.empty_cache()
    rows = [] if args.skip_sweep else sweep(args.only.split(","), log, args.out)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(rows, f, indent=0)
    with open(os.path.join(args.out, "gpu_check.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
