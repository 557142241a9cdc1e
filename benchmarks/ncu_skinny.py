"""One action-expert layer-step's kernels (skinny path, default Tuning) at the engine's shapes, for Nsight
Compute:  ncu --clock-control none -k regex:"_skinny|_action_att" --launch-skip 5 --launch-count 5 \
              --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
              python3 benchmarks/ncu_skinny.py
Order per repeat: qkv+RoPE, attention (1 camera), o+residual, gate|up+GeGLU, down+residual."""

import torch

from pi0_triton_policy.kernels import action_attention as AA, rmsnorm_qkv_rope as RQR, skinny_matmul as SK
from pi0_triton_policy.kernels._common import Workspace
from pi0_triton_policy.triton_engine import Tuning

BF, dev, M, D, F, T = torch.bfloat16, "cuda", 50, 1024, 4096, 304
t = Tuning()
ws = Workspace(dev, numel=1 << 24, counters=1 << 14)
kw = lambda c: dict(block=(64, c[0], c[1]), num_warps=c[2], num_stages=c[3], split=c[4], workspace=ws)  # noqa: E731
xs = torch.randn(M, D, device=dev)
xa = xs.to(BF)
ss = torch.rand(D // (2 * t.sk_o[0]), M, device=dev) + 1.0
cos, sin = RQR.rope_tables(1024, 256, device=dev)
pos = torch.arange(T, T + M, device=dev, dtype=torch.int32)
kc, vc = torch.randn(T + 51, 256, device=dev, dtype=BF), torch.randn(T + 51, 256, device=dev, dtype=BF)
q, o, h = torch.empty(M, 2048, device=dev, dtype=BF), torch.empty(M, 2048, device=dev, dtype=BF), torch.empty(M, F, device=dev, dtype=BF)
valid = torch.ones(T, device=dev, dtype=torch.int32)
wq = SK.transpose_weight(torch.randn(D, 2560, device=dev, dtype=BF) * 0.03, SK.pair_perm_qkv(8, 256, t.sk_qkv[0]))
wo = SK.transpose_weight(torch.randn(2048, D, device=dev, dtype=BF) * 0.02)
wg = SK.transpose_weight(torch.randn(D, 2 * F, device=dev, dtype=BF) * 0.03, SK.pair_perm_geglu(F, t.sk_gu[0]))
wd = SK.transpose_weight(torch.randn(F, D, device=dev, dtype=BF) * 0.02)
norm = dict(ss_in=ss, nss_in=ss.shape[0], d_norm=D)
for _ in range(3):
    SK.skinny_qkv_rope(xa, wq, pos, cos, sin, q, kc[T + 1:], vc[T + 1:], 8, 256, **norm, **kw(t.sk_qkv))
    c = t.sk_attn1
    AA.action_attention(q, kc, vc, valid, T, 1, 8, out=o, split=c[4], block=c[:2], num_warps=c[2], num_stages=c[3], workspace=ws)
    SK.skinny_residual(o, wo, xs, xa, ss, **kw(t.sk_o))
    SK.skinny_geglu(xa, wg, h, **norm, **kw(t.sk_gu))
    SK.skinny_residual(h, wd, xs, xa, ss, **kw(t.sk_down))
torch.cuda.synchronize()
print("done")
