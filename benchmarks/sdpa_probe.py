"""Are torch's fused attention kernels (scaled_dot_product_attention: cuDNN, memory-efficient, flash) faster than the
engine's Triton prefix / vision attention at the engine's shapes? Same inputs, errors against the float32 references,
timed as 17 (prefix) / 27 (vision) calls in a CUDA graph, including the layout copies SDPA needs around it.

    python benchmarks/sdpa_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pi0_triton_policy.kernels import prefix_attention as PA, vision_attention as VA
from pi0_triton_policy.triton_engine import Tuning
from stack_probe import time_graph  # noqa: E402 (benchmarks/ is the script's directory)

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION}


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def prefix_sdpa(q, k, v, valid, nh, out, backend):
    T = q.shape[0]
    qh = q.view(T, nh, -1).transpose(0, 1).unsqueeze(0)
    mask = valid[:T].bool().view(1, 1, 1, T)
    with sdpa_kernel([backend]):
        o = F.scaled_dot_product_attention(qh, k[:T].view(1, 1, T, -1), v[:T].view(1, 1, T, -1), attn_mask=mask,
                                           scale=1.0, enable_gqa=True)
    out.view(T, nh, -1).copy_(o[0].transpose(0, 1))


def vision_sdpa(qkv, V, nh, out, backend):
    M, W3 = qkv.shape
    q, k, v = qkv.view(V, M // V, 3, nh, W3 // 3 // nh).permute(2, 0, 3, 1, 4).unbind(0)
    with sdpa_kernel([backend]):
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    out.view(V, M // V, nh, -1).copy_(o.transpose(1, 2))


def start(dev="cuda"):
    """A probe's result record (card name first) and its seeded generator (also used by the session 8 probes)."""
    res = {"card": torch.cuda.get_device_name(), "rows": []}
    print(f"card {res['card']}")
    return res, torch.Generator(device=dev).manual_seed(0)


def configs_start(default):
    """The --json / --configs probes' start (geglu_probe, qkv_rope_probe): (args, launch configs, result record,
    generator) on the GPU."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", default=None)
    args = ap.parse_args()
    return (args, configs_arg(args.configs, default)) + start("cuda")


def configs_arg(text, default):
    """--configs / --prefix ...: a JSON list of launch tuples, or the probe's default list."""
    return [tuple(c) for c in json.loads(text)] if text else default


def fastest(res, phase, views, top=4):
    """The `top` fastest rows of one phase and camera count."""
    rows = (r for r in res["rows"] if r["phase"] == phase and r["views"] == views and "us_per_call" in r)
    return sorted(rows, key=lambda r: r["us_per_call"])[:top]


def finish(res, path):
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


def prefix_inputs(V, g, dev="cuda"):
    """The prefix attention at V cameras: q (pre-scaled), one K/V head, a 37-token prompt's padding, the float32
    reference and an output buffer (also used by attn_shapes_probe)."""
    bf = torch.bfloat16
    T, nh, hd = 256 * V + 48, 8, 256
    q = (torch.randn(T, nh * hd, device=dev, generator=g) / 16).to(bf)
    k = torch.randn(T, hd, device=dev, generator=g).to(bf)
    v = torch.randn(T, hd, device=dev, generator=g).to(bf)
    valid = torch.ones(T, dtype=torch.int32, device=dev)
    valid[T - 11:] = 0  # a 37-token prompt
    ref = PA.prefix_attention_ref(q, k, v, valid, nh)
    return q, k, v, valid, ref, torch.empty(T, nh * hd, dtype=bf, device=dev), nh


def vision_inputs(V, g, dev="cuda"):
    """SigLIP attention at V cameras: the fused qkv (q pre-scaled), the float32 reference, an output buffer, heads."""
    bf = torch.bfloat16
    nhv, hdv = 16, 72
    qkv = torch.randn(V * 256, 3 * nhv * hdv, device=dev, generator=g).to(bf)
    qkv[:, :nhv * hdv] *= hdv ** -0.5
    vref = VA.vision_attention_ref(qkv, V, nhv)
    return qkv, vref, torch.empty(V * 256, nhv * hdv, dtype=bf, device=dev), nhv


def measure(phase, views, runs, out, ref, calls):
    """Each implementation once against the reference (output NaN-filled first), then `calls` of it in a graph."""
    rows = []
    for name, fn in runs.items():
        try:
            out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = rel(out, ref)
            us = time_graph(lambda: [fn() for _ in range(calls)]) / calls
            row = {"phase": phase, "views": views, "impl": name, "us_per_call": round(us, 2), "rel_err": err}
        except Exception as e:  # a backend that refuses the shape or the mask
            row = {"phase": phase, "views": views, "impl": name, "error": repr(e)[:200]}
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t = Tuning()
    res, g = start()
    for V in (1, 2, 3):
        q, k, v, valid, ref, out, nh = prefix_inputs(V, g)
        pa = t.pre_attn[min(V, 3) - 1]
        runs = {"triton": lambda: PA.prefix_attention(q, k, v, valid, nh, out=out, block=pa[:2], num_warps=pa[2],
                                                      num_stages=pa[3], split=pa[4])}
        for name, b in BACKENDS.items():
            runs[name] = lambda b=b: prefix_sdpa(q, k, v, valid, nh, out, b)
        res["rows"] += measure("prefix", V, runs, out, ref, calls=17)
        qkv, vref, vout, nhv = vision_inputs(V, g)
        va = t.vis_attn[min(V, 3) - 1]
        runs = {"triton": lambda: VA.vision_attention(qkv, V, nhv, out=vout, block=va[:2], num_warps=va[2],
                                                      num_stages=va[3], split_d=bool(va[4]), tma=bool(va[5]))}
        for name, b in BACKENDS.items():
            runs[name] = lambda b=b: vision_sdpa(qkv, V, nhv, vout, b)
        res["rows"] += measure("vision", V, runs, vout, vref, calls=27)
    finish(res, args.json)


if __name__ == "__main__":
    main()
