"""Each fused kernel in kernels/ against its plain-PyTorch reference, on fresh random inputs.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is
imported) in float32 and float16 (the interpreter's bf16 dot is wrong); with CUDA they also run in
bf16. Sizes are odd on purpose: a 37-token prompt, 1 and 3 views, row counts that are not multiples
of the block sizes. Errors are ||out - ref|| / ||ref|| against a float32 reference.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pi0_triton_policy.kernels import (  # noqa: E402
    action_attention as AA,
    action_out_euler as AOE,
    action_time_mlp as ATM,
    embed_tokens as ET,
    layernorm_linear as LNL,
    linear_residual as LR,
    patch_embed as PE,
    prefix_attention as PA,
    rmsnorm_geglu as RG,
    rmsnorm_qkv_rope as RQR,
    vision_attention as VA,
)
from pi0_triton_policy.kernels._common import Workspace  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
# bf16/fp16 operands: the error budget of a bf16 matmul vs float32 (DESIGN.md "Numerics")
TOL = {torch.float32: 2e-3 if DEV == "cuda" else 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.5e-2}


def rel(out, ref):
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), "non-finite output"
    e = ((out - ref).norm() / ref.norm()).item()
    print(f"rel err {e:.2e}, max abs {(out - ref).abs().max().item():.2e}")
    return e


def randn(*shape, scale=1.0, dtype=torch.float32, gen=None):
    return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype)


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(hash(request.node.name) % (2**31))


@pytest.mark.parametrize("views", [1, 3])
def test_patch_embed(views, gen):
    img = randn(views, 28, 28, 3, gen=gen)  # 2x2 patches of 14x14 (the kernel is shape-generic)
    w, add = randn(588, 40, scale=0.04, gen=gen), randn(4, 40, gen=gen)
    out = PE.patch_embed(img, w, add, block=(16, 32, 32))
    assert rel(out, PE.patch_embed_ref(img, w, add)) < (5e-4 if DEV == "cuda" else 1e-5)


@pytest.mark.parametrize("slots", [[2], [0, 2], [1, 2], [2, 0, 1]])
def test_patch_embed_picks_the_present_slots(slots, gen):
    """With a slot index the kernel reads view v from images[slots[v]] (every camera slot staged, absent ones never
    read): equal to embedding the gathered views."""
    img = randn(3, 28, 28, 3, gen=gen)
    w, add = randn(588, 40, scale=0.04, gen=gen), randn(4, 40, gen=gen)
    idx = torch.tensor(slots, dtype=torch.int32, device=DEV)
    out = PE.patch_embed(img, w, add, block=(16, 32, 32), slots=idx)
    assert out.shape == (4 * len(slots), 40)
    assert rel(out, PE.patch_embed_ref(img[idx.long()], w, add)) < (5e-4 if DEV == "cuda" else 1e-5)
    assert torch.equal(out, PE.patch_embed(img[idx.long()].contiguous(), w, add, block=(16, 32, 32)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_layernorm_linear(dtype, act, gen):
    M, K, N = 37, 72, 100
    x = randn(M, K, gen=gen) + 3.0  # a large mean: the centred variance must not cancel
    g, b = 1 + randn(K, scale=0.1, gen=gen), randn(K, scale=0.1, gen=gen)
    w, bias = randn(K, N, scale=K**-0.5, gen=gen), randn(N, scale=0.1, gen=gen)
    wf, bf = LNL.fold_layernorm(g, b, w, bias, dtype)
    out = LNL.layernorm_linear(x, wf, bf, act=act, out_dtype=torch.float32, block=(16, 32, 32))
    assert rel(out, LNL.layernorm_linear_ref(x, g, b, w, bias, act)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_linear_residual(dtype, split_k, gen):
    M, K, N = 37, 200, 48
    a, w = randn(M, K, dtype=dtype, gen=gen), randn(K, N, scale=K**-0.5, dtype=dtype, gen=gen)
    res, bias = randn(M, N, gen=gen), randn(N, gen=gen)
    ref = LR.linear_residual_ref(a, w, res, bias)
    out = LR.linear_residual(a, w, res.clone(), bias, split_k=split_k, block=(16, 16, 32))
    assert rel(out, ref) < TOL[dtype]
    again = LR.linear_residual(a, w, res.clone(), bias, split_k=split_k, block=(16, 16, 32))
    assert torch.equal(out, again), "split-K must be deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_qkv_rope(dtype, gen):
    M, D, NQ, H = 37, 64, 8, 16  # the dummy Gemma's heads
    x = randn(M, D, gen=gen)
    scale = randn(D, scale=0.1, gen=gen)
    wq, wk, wv = randn(NQ, D, H, scale=D**-0.5, gen=gen), randn(D, H, scale=D**-0.5, gen=gen), randn(D, H, scale=D**-0.5, gen=gen)
    pos = torch.randperm(100, generator=gen)[:M].to(DEV, torch.int32)
    cos, sin = RQR.rope_tables(128, H, device=DEV)
    w = RQR.fold_qkv(scale, wq, wk, wv, dtype)
    q = torch.full((M, NQ * H), float("nan"), dtype=torch.float32, device=DEV)
    k = torch.full((M + 5, H), float("nan"), dtype=torch.float32, device=DEV)
    v = torch.full((M + 5, H), float("nan"), dtype=torch.float32, device=DEV)
    RQR.rmsnorm_qkv_rope(x, w, pos, cos, sin, q, k, v, NQ, H, block=(16, 8, 32))
    qr, kr, vr = RQR.rmsnorm_qkv_rope_ref(x, scale, wq, wk, wv, pos)
    for out, ref in ((q, qr), (k[:M], kr), (v[:M], vr)):
        assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_geglu(dtype, gen):
    M, D, F = 37, 64, 96
    x, scale = randn(M, D, gen=gen), randn(D, scale=0.1, gen=gen)
    gating = randn(2, D, F, scale=D**-0.5, gen=gen)
    out = RG.rmsnorm_geglu(x, RG.fold_gating(scale, gating, dtype), block=(16, 32, 32), group_m=2)
    assert rel(out, RG.rmsnorm_geglu_ref(x, scale, gating)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("hd,split_d", [(24, False), (24, True), (72, True), (72, False)])
@pytest.mark.parametrize("tma", [False, True])  # tma: tiles through tensor descriptors, boxes past the head masked
def test_vision_attention(dtype, views, hd, split_d, tma, gen):
    P, NH = 40, 2  # non-power-of-2 head_dim like So400m's 72 (split_d: 64 + a masked 16-column block)
    qkv = randn(views * P, 3 * NH * hd, dtype=dtype, gen=gen)
    out = VA.vision_attention(qkv, views, NH, block=(16, 16), split_d=split_d, tma=tma)
    assert rel(out, VA.vision_attention_ref(qkv, views, NH)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("split,tma", [(1, False), (2, False), (3, False), (1, True)])  # split-KV: key ranges merged
def test_prefix_attention(dtype, views, split, tma, gen):  # by the last program; tma: tiles through tensor descriptors
    P, L, NQ, HD = 16, 37, 8, 16
    T = views * P + L
    q, k, v = randn(T, NQ * HD, dtype=dtype, gen=gen), randn(T, HD, dtype=dtype, gen=gen), randn(T, HD, dtype=dtype, gen=gen)
    valid = torch.ones(T, dtype=torch.int32)
    valid[views * P + 20 :] = 0  # a 20-token prompt padded to 37: the last key range holds only padding at 1 cam
    valid = valid.to(DEV)
    ws = Workspace(DEV, numel=16)  # grows on demand: the split's partials
    out = PA.prefix_attention(q, k, v, valid, NQ, block=(16, 16), split=split, workspace=ws, tma=tma)
    ref = PA.prefix_attention_ref(q, k, v, valid, NQ)
    rows = valid.bool()
    assert rel(out[rows], ref[rows]) < TOL[dtype]
    assert torch.isfinite(out.float()).all()
    assert int(ws.counters.abs().sum()) == 0  # the arrival counters are back to 0 for the next launch
    again = PA.prefix_attention(q, k, v, valid, NQ, block=(16, 16), split=split, workspace=ws, tma=tma)
    assert torch.equal(again, out)  # fixed-order merge: bitwise repeatable


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_start", [0, 1])
@pytest.mark.parametrize("split", [1, 3, 0])
@pytest.mark.parametrize("pdl", [False] + ([True] if DEV == "cuda" else []))  # PDL: first prefix K/V block preloaded
@pytest.mark.parametrize("peel", [True, False])  # False: every key block through the pipelined loop
def test_action_attention(dtype, row_start, split, pdl, peel, gen):
    P, L, NQ, HD, S = 16, 37, 8, 16, 11  # S = state + 10 actions
    t_pre = 2 * P + L
    q = randn(S - row_start, NQ * HD, dtype=dtype, gen=gen)
    k, v = randn(t_pre + S, HD, dtype=dtype, gen=gen), randn(t_pre + S, HD, dtype=dtype, gen=gen)
    valid = torch.ones(t_pre, dtype=torch.int32)
    valid[2 * P + 5 :] = 0
    valid = valid.to(DEV)
    kw = dict(split=split, block=(16, 16), pdl=pdl, preload=pdl, peel=peel)
    out = AA.action_attention(q, k, v, valid, t_pre, row_start, NQ, **kw)
    assert rel(out, AA.action_attention_ref(q, k, v, valid, t_pre, row_start, NQ)) < TOL[dtype]
    again = AA.action_attention(q, k, v, valid, t_pre, row_start, NQ, **kw)
    assert torch.equal(out, again)


def test_action_time_mlp(gen):
    R, A, W = 50, 32, 64
    x = randn(R, A, gen=gen)
    in_w, in_b = randn(A, W, scale=A**-0.5, gen=gen), randn(W, scale=0.1, gen=gen)
    mi_w, mi_b = randn(2 * W, W, scale=(2 * W) ** -0.5, gen=gen), randn(W, scale=0.1, gen=gen)
    mo_w, mo_b = randn(W, W, scale=W**-0.5, gen=gen), randn(W, scale=0.1, gen=gen)
    times = torch.tensor([1.0, 0.9, 0.3], device=DEV)
    w1, tb = ATM.fold_action_time(in_w, in_b, mi_w, mi_b, times)
    for i, t in enumerate(times.tolist()):
        out = ATM.action_time_mlp(x, w1, tb[i], mo_w, mo_b, block=(16, 32, 32))
        assert rel(out, ATM.action_time_mlp_ref(x, t, in_w, in_b, mi_w, mi_b, mo_w, mo_b)) < (3e-3 if DEV == "cuda" else 1e-5)


@pytest.mark.parametrize("split", [1, 3])
def test_action_out_euler(split, gen):
    R, D, A = 50, 96, 32
    x, s = randn(R, D, gen=gen), randn(D, scale=0.1, gen=gen)
    w, b, xt = randn(D, A, scale=D**-0.5, gen=gen), randn(A, scale=0.1, gen=gen), randn(R, A, gen=gen)
    ref = AOE.action_out_euler_ref(x, s, w, b, xt, -0.1)
    wf = ((1 + s)[:, None] * w).contiguous()
    out = AOE.action_out_euler(x, wf, b, xt.clone(), -0.1, block=(16, 32), split=split)
    assert rel(out, ref) < (1e-3 if DEV == "cuda" else 1e-6)
    assert torch.equal(out, AOE.action_out_euler(x, wf, b, xt.clone(), -0.1, block=(16, 32), split=split))
    # with two buffers zeroed on the way (the next flow step's persistent-kernel counters and norm-sum slots): the
    # same actions, every element of both zero, nothing past them touched
    ctr = torch.full((18 * 128 + 1,), 3, dtype=torch.int32, device=DEV)
    ss = torch.full((30, 50), 5.0, device=DEV)
    out2 = AOE.action_out_euler(x, wf, b, xt.clone(), -0.1, block=(16, 32), split=split, zero=(ctr[:-1], ss[16:]))
    assert torch.equal(out2, out) and ctr[:-1].eq(0).all() and ctr[-1] == 3
    assert ss[16:].eq(0).all() and ss[:16].eq(5.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_tokens(dtype, gen):
    table = randn(500, 64, dtype=dtype, gen=gen)
    tokens = torch.randint(0, 500, (37,), generator=gen).to(DEV, torch.int32)
    out = torch.full((40, 64), float("nan"), device=DEV)
    ET.embed_tokens(tokens, table, out[3:], block=32)
    assert torch.equal(out[3:], ET.embed_tokens_ref(tokens, table))


from pi0_triton_policy.kernels import add_norm as AN, geglu as GG, rope_qkv as RK  # noqa: E402


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("has_y", [False, True])
def test_add_norm(norm, has_y, gen):
    M, D = 37, 72
    x, y, b = randn(M, D, gen=gen) + 2.0, randn(M, D, dtype=torch.float16, gen=gen), randn(D, gen=gen)
    xr, nr = AN.add_norm_ref(x, y if has_y else None, b if has_y else None, norm)
    xn = torch.empty(M, D, device=DEV)
    x2 = x.clone()
    AN.add_norm(x2, xn, y if has_y else None, b if has_y else None, norm)
    assert rel(x2, xr) < 1e-6 and rel(xn, nr) < 1e-5


@pytest.mark.parametrize("splits", [2, 3])
def test_add_norm_split_k(splits, gen):
    """A matmul split over K as one batched call (mm_split_k) + add_norm summing its partials == the whole matmul +
    add_norm (SigLIP's o / fc2 at one camera)."""
    M, K, D = 37, 48 * splits, 72
    a, w = randn(M, K, dtype=torch.float16, gen=gen), randn(K, D, scale=K**-0.5, dtype=torch.float16, gen=gen)
    x, b = randn(M, D, gen=gen), randn(D, gen=gen)
    if DEV == "cpu":  # CPU half bmm may be missing on old torch: the same split in float32
        a, w = a.float(), w.float()
    parts = AN.mm_split_k(a, w, torch.empty(splits, M, D, dtype=a.dtype, device=DEV))
    assert rel(parts.float().sum(0), a.float() @ w.float()) < 2e-3
    xr, nr = AN.add_norm_ref(x, a.float() @ w.float(), b, "layer")
    xn = torch.empty(M, D, device=DEV)
    AN.add_norm(x, xn, parts, b, "layer")
    assert rel(x, xr) < 2e-3 and rel(xn, nr) < 2e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_geglu(dtype, interleaved, gen):
    gu = randn(37, 2 * 100, dtype=dtype, gen=gen)
    out = GG.geglu(gu, block=64, interleaved=interleaved)
    assert rel(out, GG.geglu_ref(gu, interleaved)) < TOL[dtype] / 2
    if interleaved:  # the same gating as the split layout over the same pairs
        assert rel(out, GG.geglu_ref(torch.cat([gu[:, 0::2], gu[:, 1::2]], 1))) < TOL[dtype] / 2


from pi0_triton_policy.kernels import gemm_geglu as GEG  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,block,persistent", [(37, (16, 32, 16), False), (37, (16, 32, 16), True),
                                                (130, (64, 64, 32), True), (37, (128, 256, 64), True)])
def test_gemm_geglu(dtype, M, block, persistent, gen):
    """gate/up matmul + GeGLU epilogue over the interleaved layout vs the cuBLAS-layout matmul + geglu reference;
    a 37-row prompt-sized M, more tiles than programs (persistent), and the engine's block on a small matrix."""
    K, F = 64, 80
    x, w_gu = randn(M, K, dtype=dtype, gen=gen), randn(K, 2 * F, scale=K**-0.5, dtype=dtype, gen=gen)
    w_il = GEG.interleave_gate_up(w_gu)
    ref = GG.geglu_ref(x.float() @ w_gu.float())
    assert rel(GEG.gemm_geglu_ref(x, w_il), ref) < 1e-5  # the same math over the interleaved layout
    if DEV == "cuda" and dtype == torch.float32 and block[1] >= 256:
        pytest.skip("float32 128x256 tiles do not fit in shared memory (the engine's block is for bf16)")
    out = GEG.gemm_geglu(x, w_il, block=block, num_warps=4, num_stages=2, group_m=2, persistent=persistent)
    assert out.shape == (M, F) and rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,block,persistent", [(37, (16, 32, 16, 16), True),   # < one group: no tail
                                                (70, (16, 32, 16, 16), True),   # 2 groups + a 6-token tail
                                                (70, (16, 32, 16, 16), False),  # one program per tile
                                                (96, (16, 32, 16, 16), True),   # 3 whole groups, no tail
                                                (304, (64, 256, 64, 64), True)])  # the engine's 1-camera shape
def test_gemm_geglu_t(dtype, M, block, persistent, gen):
    """The transposed gate/up + GeGLU (weight rows x tokens, the tail tokens on the last group's weight tiles) vs the
    cuBLAS-layout matmul + geglu reference; token counts with and without a tail, more tiles than programs."""
    K, F = 64, 80 if block[0] < 64 else 128
    x, w_gu = randn(M, K, dtype=dtype, gen=gen), randn(K, 2 * F, scale=K**-0.5, dtype=dtype, gen=gen)
    w_il = GEG.interleave_gate_up(w_gu)
    ref = GG.geglu_ref(x.float() @ w_gu.float())
    if DEV == "cuda" and dtype == torch.float32 and block[1] >= 256:
        pytest.skip("float32 256-token tiles do not fit in shared memory (the engine's block is for bf16)")
    out = GEG.gemm_geglu_t(x, w_il, block=block, num_warps=4, num_stages=2, persistent=persistent)
    assert out.shape == (M, F) and rel(out, ref) < TOL[dtype]


def test_wgmma_token_split():
    """kernels/wgmma_geglu.py puts the tokens on wgmma's N side: the fewest tiles of <= 304 tokens, each two
    instructions of N multiples of 8 (<= 256); the engine's 256 * views + 48 tokens without a padded row."""
    from pi0_triton_policy.kernels import wgmma_geglu as WG

    assert [WG.token_split(256 * v + 48) for v in (1, 2, 3)] == [(1, 152, 152), (2, 144, 136), (3, 136, 136)]
    for M in range(1, 2049):
        tiles, nh, n2 = WG.token_split(M)
        tn = nh + n2
        assert (tiles - 1) * tn < M <= tiles * tn and nh % 8 == 0 and n2 % 8 == 0 and 8 <= n2 <= nh <= 256 and tn <= 304
        assert tiles == -(-M // 304)


def test_wgmma_toolchain_fallback(monkeypatch):
    """Without NVRTC (or the driver's tensor maps) the wgmma kernels report themselves unavailable, so the engine keeps
    its Triton / cuBLAS paths instead of failing at capture."""
    from pi0_triton_policy.kernels import wgmma_geglu as WG

    def no_nvrtc(*args):
        raise RuntimeError("NVRTC failed")

    WG._toolchain_ok.cache_clear()
    try:
        monkeypatch.setattr(WG, "_kernel", no_nvrtc)
        assert WG._toolchain_ok() is False
    finally:
        WG._toolchain_ok.cache_clear()
    assert not WG.available("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [37, 304, 560, 816, 1000])
def test_wgmma_geglu(M):
    """The tokens-as-N wgmma gate/up + GeGLU (CUDA C++, sm_90a) against the float32 reference on fresh random data:
    the engine's 1 / 2 / 3-camera token counts, a 37-token one (one tile of 24 + 16, 3 rows past M; 256 h columns)
    and 1000 (4 tiles of 256, the last one 232 rows); 2 F / 128 x token tiles > 132 SMs (persistent programs take
    several tiles); bitwise repeatable, persistent or not."""
    from pi0_triton_policy.kernels import wgmma_geglu as WG

    if not WG.available("cuda"):
        pytest.skip("needs sm_90a (wgmma, TMA)")
    g = torch.Generator(device="cuda").manual_seed(M)
    K, F = 2048, 4096 if M > 37 else 256
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    w_gu = (torch.randn(K, 2 * F, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    w_il = GEG.interleave_gate_up(w_gu)
    out = torch.full((M, F), float("nan"), dtype=torch.bfloat16, device="cuda")
    WG.wgmma_geglu(x, w_il, out=out)
    assert rel(out, GG.geglu_ref(x.float() @ w_gu.float())) < 5e-3
    for stages, persistent in ((3, True), (4, False)):  # a program per tile: the same sums
        again = WG.wgmma_geglu(x, w_il, stages=stages, persistent=persistent)
        assert torch.equal(out, again), f"not deterministic ({stages} stages, persistent {persistent})"


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,gelu", [(256, 4304, 1152, True), (512, 4304, 1152, True), (768, 4304, 1152, True),
                                        (37, 200, 1152, False), (768, 3456, 1152, False), (256, 1152, 4304, False)])
def test_wgmma_linear(M, N, K, gelu):
    """The one-wave wgmma linear (CUDA C++, sm_90a) against the float32 reference on fresh random data: SigLIP's fc1
    (GELU) at 1 / 2 / 3 cameras, its qkv, its fc2 (K = 4304: a zero-filled K tail) and 37 tokens (a partial token
    tile); another ring depth gives the same bits, another tile width the reference's error."""
    from pi0_triton_policy.kernels import wgmma_linear as WL

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs sm_90a (wgmma, TMA)")
    g = torch.Generator(device="cuda").manual_seed(M + N)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    b = torch.randn(N, device="cuda", generator=g) * 0.1
    ref = WL.linear_ref(x, w, b, gelu)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    WL.wgmma_linear(x, w, b, out=out, gelu=gelu)
    assert rel(out, ref) < 5e-3
    again = WL.wgmma_linear(x, w, b, gelu=gelu, stages=3)
    assert torch.equal(out, again), "not deterministic (or the ring depth changed the result)"
    assert rel(WL.wgmma_linear(x, w, b, gelu=gelu, bn=128), ref) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,split", [(256, 1152, 4304, 4), (256, 1152, 1152, 8), (768, 1152, 4304, 2),
                                         (37, 200, 1152, 3), (304, 2048, 2048, 4)])
def test_wgmma_linear_split(M, N, K, split):
    """wgmma_linear split over K (SigLIP's fc2 / o at 1 and 3 cameras, the prefix's o, 37 tokens with 18 K steps in 3
    parts): the parts, summed in order, against the float32 reference; the bias only in part 0; bf16 parts carry the
    same sums to bf16 precision; repeatable bit for bit."""
    from pi0_triton_policy.kernels import wgmma_linear as WL

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs sm_90a (wgmma, TMA)")
    g = torch.Generator(device="cuda").manual_seed(M + N + split)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    b = torch.randn(N, device="cuda", generator=g) * 0.1
    ref = WL.linear_ref(x, w, b)
    parts = torch.full((split, M, N), float("nan"), device="cuda")
    WL.wgmma_linear(x, w, b, out=parts, split=split)
    assert rel(parts.sum(0), ref) < 1e-5 * K**0.5 + 2e-6
    steps = -(-K // 64)
    first = steps // split  # part 0's K steps: its product plus the bias
    k0 = min(K, 64 * first)
    assert rel(parts[0], WL.linear_ref(x[:, :k0], w[:, :k0], b)) < 1e-4
    assert torch.equal(parts, WL.wgmma_linear(x, w, b, split=split, stages=3)), "not deterministic"
    half = WL.wgmma_linear(x, w, b, split=split, out=torch.empty(split, M, N, dtype=torch.bfloat16, device="cuda"))
    assert rel(half.float().sum(0), ref) < 5e-3


def test_wgmma_linear_bad_arguments():
    """Clear errors before any launch: more K parts than 64-column K steps, GELU on partial sums, a wrong out."""
    from pi0_triton_policy.kernels import wgmma_linear as WL

    x, w, b = torch.zeros(8, 128, dtype=torch.bfloat16), torch.zeros(16, 128, dtype=torch.bfloat16), torch.zeros(16)
    with pytest.raises(ValueError, match="1 .. 2 parts"):
        WL.wgmma_linear(x, w, b, split=3)
    with pytest.raises(ValueError, match="activation"):
        WL.wgmma_linear(x, w, b, split=2, gelu=True)
    with pytest.raises(ValueError, match=r"shape \(2, 8, 16\)"):
        WL.wgmma_linear(x, w, b, split=2, out=torch.zeros(8, 16))


def test_wgmma_linear_one_wave():
    """SigLIP's fc1 at 1 / 2 / 3 cameras on 132 SMs: 72 / 136 / 200 columns per tile, 120 / 128 / 132 programs."""
    from pi0_triton_policy.kernels import wgmma_linear as WL

    assert [WL.one_wave_width(256 * v, 4304, 132) for v in (1, 2, 3)] == [72, 136, 200]
    assert [WL.one_wave_width(256, 1152, 132, s) for s in (1, 2, 4, 8)] == [24, 40, 72, 144]  # o / fc2 split over K
    for M in (37, 256, 768, 2000):
        for N in (8, 1152, 3456, 4304):
            bn = WL.one_wave_width(M, N, 132)
            assert bn % 8 == 0 and 8 <= bn <= 256
            assert bn == 256 or -(-M // 128) * -(-N // bn) <= 132


def test_token_groups():
    """The engine's prefix (256 * views + 48 tokens) runs as `views` groups of 256 plus a 64-token tail."""
    assert [GEG.token_groups(256 * v + 48, 256, 64) for v in (1, 2, 3)] == [(1, True), (2, True), (3, True)]
    assert GEG.token_groups(512, 256, 64) == (2, False) and GEG.token_groups(400, 256, 64) == (2, False)
    assert GEG.token_groups(48, 256, 64) == (1, False)


from pi0_triton_policy.kernels import gemm_splitk as GSK  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["none", "gelu", "residual"])
@pytest.mark.parametrize("M,K,N,block,split,persistent", [
    (37, 72, 80, (16, 32, 16), 1, True),     # prompt-sized M, K and N not multiples of the block
    (37, 72, 80, (16, 32, 16), 3, True),     # split-K: 5 K blocks in ranges of 2 / 2 / 1
    (130, 200, 96, (64, 32, 32), 4, False),  # one program per unit, the last K block partly past K
    (64, 64, 48, (32, 16, 16), 4, True),     # more units than programs: the persistent loop walks several
])
def test_gemm_splitk(dtype, act, M, K, N, block, split, persistent, gen):
    """split-K matmul + bias / GELU / residual epilogue vs the float32 reference on fresh random inputs; the fixed-order
    split sum is bitwise repeatable and the counters are back to zero after each call (CUDA-graph replays)."""
    a, w = randn(M, K, dtype=dtype, gen=gen), randn(K, N, scale=K**-0.5, dtype=dtype, gen=gen)
    bias = randn(N, dtype=dtype, gen=gen)
    res0 = randn(M, N, gen=gen)
    ref = GSK.gemm_splitk_ref(a, w, bias, act, res0)
    ws = GSK.default_workspace(DEV)
    outs = []
    for _ in range(2):
        res = res0.clone()
        out = GSK.gemm_splitk(a, w, bias=bias, act=act, res=res if act == "residual" else None, block=block,
                              num_warps=4, num_stages=2, split=split, group_m=2, persistent=persistent, workspace=ws)
        assert ws.counters.eq(0).all()
        outs.append(out.clone())
    assert out.shape == (M, N) and out.dtype == (torch.float32 if act == "residual" else dtype)
    assert rel(out, ref) < TOL[dtype]
    assert torch.equal(outs[0], outs[1])


def test_gemm_splitk_rejects_mismatched_shapes():
    a, w = torch.zeros(4, 8, device=DEV), torch.zeros(6, 8, device=DEV)
    with pytest.raises(ValueError, match="expected w with 8 rows"):
        GSK.gemm_splitk(a, w)
    with pytest.raises(ValueError, match="act must be one of"):
        GSK.gemm_splitk(a, torch.zeros(8, 8, device=DEV), act="relu")


from pi0_triton_policy.kernels import gemm_rope_qkv as GRQ  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,block", [(37, (16, 16, 16)), (130, (64, 32, 32)), (37, (64, 128, 64))])
def test_gemm_rope_qkv(dtype, M, block, gen):
    """QKV matmul + RoPE epilogue over the pair-interleaved layout vs matmul + rope reference; K / V rows go into a
    longer cache (rows past M untouched), a 37-row prompt-sized M, more tiles than programs, the engine's block."""
    D, NQ, HD = 64, 4, 32
    x, w = randn(M, D, dtype=dtype, gen=gen), randn(D, (NQ + 2) * HD, scale=D**-0.5, dtype=dtype, gen=gen)
    pos = torch.randperm(200, generator=gen)[:M].to(DEV, torch.int32)
    cos, sin = RQR.rope_tables(256, HD, device=DEV)
    qr, kr, vr = RK.rope_qkv_ref(x.float() @ w.float(), pos, NQ, HD)
    q = torch.zeros(M, NQ * HD, dtype=dtype, device=DEV)
    kc, vc = torch.zeros(M + 7, HD, dtype=dtype, device=DEV), torch.zeros(M + 7, HD, dtype=dtype, device=DEV)
    GRQ.gemm_rope_qkv(x, GRQ.interleave_rope_pairs(w, NQ, HD), pos, cos, sin, q, kc, vc, NQ, HD, block=block,
                      num_warps=4, num_stages=2, group_m=2)
    assert rel(q, qr) < TOL[dtype] and rel(kc[:M], kr) < TOL[dtype] and rel(vc[:M], vr) < TOL[dtype]
    assert kc[M:].eq(0).all() and vc[M:].eq(0).all()
    # cuBLAS on the same layout + the interleaved RoPE pass (the engine's unfused path)
    qkv = x @ GRQ.interleave_rope_pairs(w, NQ, HD).t()
    q2, k2, v2 = torch.zeros_like(q), torch.zeros(M, HD, dtype=dtype, device=DEV), torch.zeros(M, HD, dtype=dtype, device=DEV)
    RK.rope_qkv(qkv, pos, cos, sin, q2, k2, v2, NQ, HD, interleaved=True)
    assert rel(q2, qr) < TOL[dtype] and rel(k2, kr) < TOL[dtype] and rel(v2, vr) < TOL[dtype]


def test_rope_qkv(gen):
    M, NQ, H = 37, 8, 16
    qkv = randn(M, (NQ + 2) * H, gen=gen)
    pos = torch.randperm(100, generator=gen)[:M].to(DEV, torch.int32)
    cos, sin = RQR.rope_tables(128, H, device=DEV)
    q, k, v = torch.empty(M, NQ * H, device=DEV), torch.empty(M, H, device=DEV), torch.empty(M, H, device=DEV)
    RK.rope_qkv(qkv, pos, cos, sin, q, k, v, NQ, H)
    for out, ref in zip((q, k, v), RK.rope_qkv_ref(qkv, pos, NQ, H)):
        assert rel(out, ref) < 1e-5


from pi0_triton_policy.kernels import skinny_matmul as SK  # noqa: E402


def _ss_parts(a, parts=2):
    """Per-column-chunk row sums of squares [parts, M] (what a residual epilogue writes for the next matmul)."""
    return torch.stack([c.float().square().sum(1) for c in a.float().chunk(parts, 1)]).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("mode", ["add", "store_bias_norm"])
@pytest.mark.parametrize("peel", [0, 1])
def test_skinny_residual(dtype, split, mode, peel, gen):
    M, K, N, BH = 37, 200, 96, 16
    a, w = randn(M, K, dtype=dtype, gen=gen), randn(K, N, scale=K**-0.5, dtype=dtype, gen=gen)
    x0, bias = randn(M, N, gen=gen), randn(N, gen=gen)
    store = mode != "add"
    kw = dict(ss_in=_ss_parts(a), nss_in=2, d_norm=K) if store else {}
    ref = SK.skinny_residual_ref(a, w, x0, bias if store else None, store=store, norm=store)
    outs = []
    for _ in range(2):
        x, xa = x0.clone(), torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
        ss = torch.full((N // (2 * BH), M), float("nan"), device=DEV)
        SK.skinny_residual(a, SK.transpose_weight(w), x, xa, ss, bias=bias if store else None, store=store, split=split,
                           block=(64, BH, 32), peel=peel, **kw)
        assert rel(x, ref) < TOL[dtype]
        assert rel(xa, x) < 5e-3 and rel(ss.sum(0), x.square().sum(1)) < 1e-5
        outs.append(x)
    assert torch.equal(outs[0], outs[1]), "split-K must be deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("peel", [0, 1])
def test_skinny_geglu(dtype, split, peel, gen):
    M, K, F, BH = 37, 72, 64, 16
    a = randn(M, K, dtype=dtype, gen=gen)
    wg, wu = randn(K, F, scale=K**-0.5, dtype=dtype, gen=gen), randn(K, F, scale=K**-0.5, dtype=dtype, gen=gen)
    wt = SK.transpose_weight(torch.cat([wg, wu], 1), SK.pair_perm_geglu(F, BH))
    h = torch.full((M, F), float("nan"), dtype=dtype, device=DEV)
    SK.skinny_geglu(a, wt, h, ss_in=_ss_parts(a), nss_in=2, d_norm=K, split=split, block=(64, BH, 32),
                    peel=peel)
    assert rel(h, SK.skinny_geglu_ref(a, wg, wu, norm=True)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("peel", [0, 1])
def test_skinny_qkv_rope(dtype, peel, gen):
    M, K, NQ, H, BH = 37, 72, 2, 32, 16
    a, w = randn(M, K, dtype=dtype, gen=gen), randn(K, (NQ + 2) * H, scale=K**-0.5, dtype=dtype, gen=gen)
    pos = torch.randperm(100, generator=gen)[:M].to(DEV, torch.int32)
    cos, sin = RQR.rope_tables(128, H, device=DEV)
    q = torch.full((M, NQ * H), float("nan"), dtype=dtype, device=DEV)
    k = torch.full((M + 5, H), float("nan"), dtype=dtype, device=DEV)
    v = torch.full((M + 5, H), float("nan"), dtype=dtype, device=DEV)
    SK.skinny_qkv_rope(a, SK.transpose_weight(w, SK.pair_perm_qkv(NQ, H, BH)), pos, cos, sin, q, k, v, NQ, H,
                       ss_in=_ss_parts(a), nss_in=2, d_norm=K, split=2, block=(64, BH, 32), peel=peel)
    y = ((a.float() @ w.float()) * SK.rstd_ref(a)).reshape(M, NQ + 2, H)
    for out, ref in ((q, RQR.rope_ref(y[:, :NQ], pos).reshape(M, -1)), (k[:M], RQR.rope_ref(y[:, NQ:NQ + 1], pos)[:, 0]),
                     (v[:M], y[:, -1])):
        assert rel(out, ref) < TOL[dtype]


def test_prep_rows_and_swish_in(gen):
    M, D, A = 37, 72, 32
    x = randn(M, D, gen=gen)
    xa, ss = torch.empty(M, D, device=DEV), torch.full((3, M + 2), float("nan"), device=DEV)
    SK.prep_rows(x, xa, ss)
    assert torch.equal(xa, x) and rel(ss[0, :M], x.square().sum(1)) < 1e-6 and (ss[1:, :M] == 0).all()
    xt, w1, tb = randn(M, A, gen=gen), randn(A, D, scale=A**-0.5, gen=gen), randn(D, gen=gen)
    h = SK.swish_in(xt, w1, tb, torch.empty(M, D, device=DEV), block_n=32)
    assert rel(h, torch.nn.functional.silu(xt @ w1 + tb)) < (3e-3 if DEV == "cuda" else 1e-6)


@pytest.mark.parametrize("split,peel", [(1, 1), (4, 0)])
def test_skinny_time_mlp_with_swish_in_fused(gen, split, peel):
    """The action-time MLP in one launch (skinny_residual(swish=...)): the A operand swish(x_t @ w1 + tb) computed
    block by block in the K loop equals swish_in's output fed to the same matmul (store epilogue with bias, split-K
    and not); float32 weights as the engine's."""
    M, A, D = 37, 32, 128
    xt, w1, tb = randn(M, A, gen=gen), randn(A, D, scale=A**-0.5, gen=gen), randn(D, gen=gen)
    w, bias = randn(D, D, scale=D**-0.5, gen=gen), randn(D, gen=gen)
    wt = SK.transpose_weight(w)
    cfg = dict(split=split, block=(64, 16, 32), num_warps=4, num_stages=2, peel=peel)
    outs = []
    for fused in (False, True):
        x, xa = torch.full((M, D), float("nan"), device=DEV), torch.empty(M, D, device=DEV)
        ss = torch.empty(D // 32, M, device=DEV)
        if fused:
            SK.skinny_residual(xt, wt, x, xa, ss, bias=bias, store=True, swish=(w1, tb), **cfg)
        else:
            h = SK.swish_in(xt, w1, tb, torch.empty(M, D, device=DEV), block_n=32)
            SK.skinny_residual(h, wt, x, xa, ss, bias=bias, store=True, **cfg)
        outs.append((x, ss))
    ref = torch.nn.functional.silu(xt @ w1 + tb) @ w + bias
    tol = 3e-3 if DEV == "cuda" else 1e-6  # tf32 dots on the GPU
    assert rel(outs[1][0], ref) < tol and rel(outs[1][0], outs[0][0]) < tol and rel(outs[1][1], outs[0][1]) < tol


from pi0_triton_policy.kernels import action_stack as AS  # noqa: E402


def _stack_case(dtype, row_start, gen, L=2, D=64, F=128, NQ=2, HD=32, T=37, S=7):
    """Random weights in the skinny layouts + a KV cache with filled prefix rows, for L action-expert layers."""
    bq, bg, br = 8, 16, 16
    sc = lambda k: k**-0.5  # noqa: E731
    wqkv = torch.stack([SK.transpose_weight(randn(D, (NQ + 2) * HD, scale=sc(D), gen=gen), SK.pair_perm_qkv(NQ, HD, bq))
                        for _ in range(L)]).to(dtype)
    wo = torch.stack([SK.transpose_weight(randn(NQ * HD, D, scale=sc(NQ * HD), gen=gen)) for _ in range(L)]).to(dtype)
    wgu = torch.stack([SK.transpose_weight(randn(D, 2 * F, scale=sc(D), gen=gen), SK.pair_perm_geglu(F, bg))
                       for _ in range(L)]).to(dtype)
    wdn = torch.stack([SK.transpose_weight(randn(F, D, scale=sc(F), gen=gen)) for _ in range(L)]).to(dtype)
    kc, vc = randn(L, T + S, HD, dtype=dtype, gen=gen), randn(L, T + S, HD, dtype=dtype, gen=gen)
    valid = (torch.rand(T, generator=gen) > 0.2).to(DEV, torch.int32)
    pos = torch.arange(T, T + S, device=DEV, dtype=torch.int32)
    cos, sin = RQR.rope_tables(T + S + 4, HD, device=DEV)
    R = S - row_start
    xs = randn(S, D, gen=gen)
    return dict(D=D, F=F, NQ=NQ, HD=HD, T=T, S=S, R=R, bq=bq, bg=bg, br=br, weights=(wqkv, wo, wgu, wdn), kc=kc, vc=vc,
                valid=valid, pos=pos, cos=cos, sin=sin, xs=xs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_start", [0, 1])
def test_action_stack_matches_per_kernel_path(dtype, row_start, gen):
    """The persistent kernel (one launch per step on a GPU, per phase here) == the per-kernel skinny path."""
    c = _stack_case(dtype, row_start, gen)
    D, F, NQ, HD, T, S, R, r0 = c["D"], c["F"], c["NQ"], c["HD"], c["T"], c["S"], c["R"], row_start
    wqkv, wo, wgu, wdn = c["weights"]
    L = wqkv.shape[0]
    nss = D // (2 * c["br"])
    split_o, split_dn, attn = 2, 4, (16, 16, 2, 3)

    def fresh():
        xs = c["xs"].clone()
        xa, ss = torch.empty(S, D, dtype=dtype, device=DEV), torch.empty(nss, S, device=DEV)
        SK.prep_rows(xs, xa, ss)
        return xs, xa, ss, c["kc"].clone(), c["vc"].clone()

    # per-kernel path (already tested against the PyTorch references above)
    xs, xa, ss, kc, vc = fresh()
    q, o, h = (torch.empty(R, n, dtype=dtype, device=DEV) for n in (NQ * HD, NQ * HD, F))
    norm = dict(ss_in=ss[:, r0:], nss_in=nss, d_norm=D, eps=1e-6)
    for i in range(L):
        SK.skinny_qkv_rope(xa[r0:], wqkv[i], c["pos"][r0:], c["cos"], c["sin"], q, kc[i, T + r0:], vc[i, T + r0:], NQ, HD,
                           **norm, block=(64, c["bq"], 32))
        AA.action_attention(q, kc[i], vc[i], c["valid"], T, r0, NQ, out=o, split=attn[3], block=attn[:2])
        SK.skinny_residual(o, wo[i], xs[r0:], xa[r0:], ss[:, r0:], split=split_o, block=(64, c["br"], 32))
        SK.skinny_geglu(xa[r0:], wgu[i], h, **norm, block=(64, c["bg"], 32))
        SK.skinny_residual(h, wdn[i], xs[r0:], xa[r0:], ss[:, r0:], split=split_dn, block=(64, c["br"], 32))
    want = xs[r0:].clone(), kc.clone(), vc.clone()

    plan = AS.StackPlan(D, F, NQ, HD, T + S, c["bq"], c["bg"], c["br"], bk_qkv=32, bk_gu=32, bk_o=32, split_o=split_o,
                        bk_dn=32, split_dn=split_dn, attn=attn, nprog=5, device=DEV)
    n_ws, n_aws = plan.workspace_numel()
    ws, aws = torch.empty(n_ws, device=DEV), torch.empty(n_aws, device=DEV)
    cnt, bar = torch.zeros(4096, dtype=torch.int32, device=DEV), torch.zeros(256, dtype=torch.int32, device=DEV)
    for _ in range(2):  # twice: counters must be back at zero, results identical
        xs, xa, ss, kc, vc = fresh()
        q, o, h = (torch.full((R, n), float("nan"), dtype=dtype, device=DEV) for n in (NQ * HD, NQ * HD, F))
        bar.zero_()
        AS.action_stack(plan, xs[r0:], xa[r0:], ss[:, r0:], q, o, h, kc, vc, c["valid"], c["pos"][r0:], c["cos"], c["sin"],
                        wqkv, wo, wgu, wdn, ws, cnt, aws, bar, T, r0, 1e-6)
        assert torch.equal(cnt, torch.zeros_like(cnt)), "arrival counters not reset"
        for got, ref in zip((xs[r0:], kc, vc), want):
            assert rel(got, ref) < 1e-6
        assert torch.isfinite(xs).all()


@pytest.mark.gpu
def test_cublaslt_gelu_epilogue_is_tanh_form():
    """The engine puts SigLIP's tanh-GELU into cuBLASLt's epilogue (torch._addmm_activation) on CUDA: it must be the
    tanh approximation there (on CPU it is the erf form, which the engine does not use)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 1152, device="cuda", generator=g)  # float32: the GELU's form shows above rounding
    w = torch.randn(1152, 4304, device="cuda", generator=g) * 1152**-0.5
    b = torch.randn(4304, device="cuda", generator=g)
    y = torch._addmm_activation(b, x, w, use_gelu=True)
    pre = torch.addmm(b, x, w)
    tanh_err = (y - torch.nn.functional.gelu(pre, approximate="tanh")).abs().max().item()
    erf_err = (y - torch.nn.functional.gelu(pre)).abs().max().item()
    assert tanh_err < 1e-4 < erf_err, (tanh_err, erf_err)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bn,split,nw,na", [(2560, 1024, 32, 2, 0, 0), (1024, 2048, 16, 2, 16, 8),
                                                 (8192, 1024, 64, 1, 10, 10), (1024, 4096, 32, 4, 6, 6)])
@pytest.mark.parametrize("rows", [1, 37, 50])
def test_slab_matmul_gluon(n, k, bn, split, nw, na, rows):
    """The Gluon weight-slab matmul (experimental, benchmarks/slab_probe.py; not used by the engine) against its
    reference: whole-slab and ring buffering, split-K with the deterministic last-arriver sum, odd row counts."""
    from pi0_triton_policy.kernels import slab_matmul as SM

    if not SM.HAS_GLUON or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs Gluon and a Hopper GPU")
    g = torch.Generator(device="cuda").manual_seed(rows + n)
    wt = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    a = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
    plan = SM.SlabPlan(wt, bn, split, nw, na)
    ws = torch.empty(split * 64 * n, device="cuda")
    cnt = torch.zeros(n // bn, dtype=torch.int32, device="cuda")
    out = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
    outs = []
    for pdl in (False, True):
        out.zero_()
        SM.slab_matmul(plan, plan.a_desc(a), rows, out, ws, cnt, pdl=pdl)
        outs.append(out.clone())
    assert rel(outs[0], SM.slab_matmul_reference(a, wt)) < 5e-3
    assert torch.equal(outs[0], outs[1]), "not deterministic"
    assert torch.equal(cnt, torch.zeros_like(cnt)), "arrival counters not reset"


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bn,split", [(2560, 1024, 32, 1), (1024, 2048, 32, 4), (1024, 4096, 32, 8),
                                          (2560, 1024, 64, 4), (1024, 2048, 64, 8), (1024, 1024, 64, 2)])
@pytest.mark.parametrize("rows", [1, 37, 50])
def test_cluster_matmul_cuda(n, k, bn, split, rows):
    """The CUDA C++ cluster matmul (experimental, benchmarks/cluster_probe.py; not used by the engine) against its
    reference: split-K summed through distributed shared memory in fixed order (bitwise deterministic), with and
    without PDL, odd row counts."""
    from pi0_triton_policy.kernels import cluster_matmul as CM

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need Hopper")
    g = torch.Generator(device="cuda").manual_seed(rows + n + split)
    wt = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    a = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
    outs = []
    for pdl in (False, True, True):
        out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        CM.cluster_matmul(a, wt, out, bn, split, pdl=pdl)
        outs.append(out)
    assert rel(outs[0], CM.cluster_matmul_reference(a, wt)) < 5e-3
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]), "not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("row_start", [0, 1])
@pytest.mark.parametrize("kc", [64, 128])
@pytest.mark.parametrize("rows", [16, 32])
def test_cluster_attention_cuda(views, row_start, kc, rows):
    """The CUDA C++ cluster attention (experimental, benchmarks/attention_probe.py; not used by the engine) against the
    float32 reference: prompt padding, the state row's mask (row_start 0), 1 and 3 cameras, bitwise deterministic."""
    from pi0_triton_policy.kernels import cluster_attention as CA

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need Hopper")
    g = torch.Generator(device="cuda").manual_seed(views * 10 + row_start)
    T, S, NQ = 256 * views + 48, 51, 8
    R = S - row_start
    k = torch.randn(T + S, 256, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(T + S, 256, device="cuda", generator=g).to(torch.bfloat16)
    q = (torch.randn(R, NQ * 256, device="cuda", generator=g) / 16).to(torch.bfloat16)
    valid = torch.ones(T, dtype=torch.int32, device="cuda")
    valid[T - 11:] = 0  # a 37-token prompt
    outs = [torch.empty(R, NQ * 256, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    for o, pdl in zip(outs, (False, True)):
        CA.cluster_attention(q, k, v, valid, T, row_start, NQ, o, kc=kc, rows=rows, pdl=pdl)
    assert rel(outs[0], AA.action_attention_ref(q, k, v, valid, T, row_start, NQ)) < 1e-2
    assert torch.equal(outs[0], outs[1]), "not deterministic"


def test_mega_chain_kv_blocked():
    """ATTN 3's cache layout: a permutation within each 16-key sub-block (8 KB: one bulk copy), element (key, d) at
    [key / 16][d / 64][key % 16][64] with the 16-byte groups XOR key % 8; per-layer caches alike; inverse undoes it."""
    from pi0_triton_policy.kernels import mega_chain as MC

    kv = torch.arange(48 * 256, dtype=torch.float32).view(48, 256)
    b = MC.kv_blocked(kv)
    assert torch.equal(MC.kv_blocked(b, inverse=True), kv) and torch.equal(b.flatten().sort().values, kv.flatten())
    for key, d in ((0, 0), (5, 70), (17, 255), (47, 129)):
        pos = (key // 16) * 4096 + (d // 64) * 1024 + (key % 16) * 64 + (((d % 64) // 8) ^ (key % 8)) * 8 + d % 8
        assert b.flatten()[pos] == kv[key, d]
    assert torch.equal(b[:16], MC.kv_blocked(kv[:16]))  # sub-blocks are independent
    assert torch.equal(MC.kv_blocked(torch.stack([kv, 2 * kv])), torch.stack([b, 2 * b]))
    assert MC.kv_rows(305, 50, 3) % 16 == 0 and MC.kv_rows(305, 50, 3) >= 305 + 50 + 16 > MC.kv_rows(305, 50, 3) - 16


def test_mega_chain_kv_swizzle():
    """ATTN 2's K / V cache layout: a permutation of the 16-byte groups inside each 128-byte half of a key row (its own
    inverse), with group g of key k at g ^ (k % 8), which is where the kernel's epilogue writes the suffix keys."""
    from pi0_triton_policy.kernels import mega_chain as MC

    kv = torch.arange(37 * 256, dtype=torch.float32).view(37, 256)
    sw = MC.kv_swizzle(kv)
    assert torch.equal(MC.kv_swizzle(sw), kv) and torch.equal(sw.sort(1).values, kv)
    assert torch.equal(MC.kv_swizzle(torch.stack([kv, 2 * kv])), torch.stack([sw, 2 * sw]))  # per-layer caches
    assert torch.equal(MC.kv_swizzle(kv, MC.kv_swizzle_groups(37, kv.device)), sw)  # the index made beforehand
    for k in (0, 5, 36):
        for e in (0, 7, 8, 100, 255):
            assert sw[k, e ^ ((k % 8) << 3)] == kv[k, e]


def test_mega_chain_plan_layout():
    """The persistent chain's work plan (kernels/mega_chain.py, experimental; CPU): every weight element is dealt to
    exactly one program and lands in its chunk at the swizzled position wgmma reads; the arrival counts each unit
    waits for match the units that publish; the blocked activation layout round-trips."""
    from pi0_triton_policy.kernels import mega_chain as MC

    g = torch.Generator().manual_seed(7)
    for programs, layer, pair in ((120, False, 8), (128, False, 8), (120, True, 8), (120, True, 4), (128, True, 4)):
        plan = MC.MegaPlan(programs, layer, pair)
        for op, (n, k, split, ck, njmax) in MC.OPS.items():
            paired = layer and op in MC.PAIRED[pair]
            wt = torch.randn(1, n, k, generator=g)
            prepared = plan.prepare(wt, op)
            if paired:  # the kernel's column order: RoPE partners / gate and up side by side
                cols = plan.paired_columns(op)
                assert torch.equal(torch.sort(cols).values, torch.arange(n))
                wt = wt[:, cols]
            kc = k // split
            cover = torch.zeros(n, k, dtype=torch.int32)
            seen = set()
            for p in range(programs):
                n0, bn, off = plan.meta[op][p]
                rank = 0 if split == 1 else p % MC.CLUSTER
                assert bn in ((8 * w for w in MC.PAIRED[pair][op]) if paired else (8 * njmax, 8 * njmax - 8))
                if (n0, rank) in seen:
                    continue
                seen.add((n0, rank))
                cover[n0:n0 + bn, rank * kc:(rank + 1) * kc] += 1
                blk = prepared[0, off:off + bn * kc].view(kc // ck, bn, ck // 8, 8)
                groups = torch.arange(ck // 8).view(1, -1) ^ (torch.arange(bn).view(-1, 1) % 8)  # logical group held
                expect = wt[0, n0:n0 + bn, rank * kc:(rank + 1) * kc].reshape(bn, kc // ck, ck // 8, 8).permute(1, 0, 2, 3)
                assert torch.equal(blk, torch.gather(expect, 2, groups.view(1, bn, ck // 8, 1).expand_as(expect))), (op, p)
            assert (cover == 1).all(), op
        # quarter r of a unit's K range waits for the publishing units whose columns touch it (every program of the
        # producing op publishes once per counter it touches; the 4 ranks of a split unit each do)
        for nxt, prev in enumerate(("down", "qkv", "o", "gu")):
            width = MC.RANGE[prev]
            for r in range(MC.OPS[prev][0] // width):
                if layer and prev in MC.PAIRED[pair]:  # the output columns a unit writes, from the pair order
                    cols = plan.paired_columns(prev)
                    out_cols = lambda n0, bn: [c for c in cols[n0:n0 + bn].tolist() if prev == "qkv" or c < 4096]  # noqa: E731
                    if prev == "gu" and r >= 16:
                        continue  # h has 4096 columns
                    touching = sum(1 for n0, bn, _ in plan.meta[prev] if any(c // width == r for c in out_cols(n0, bn)))
                else:
                    touching = sum(1 for n0, bn, _ in plan.meta[prev] if n0 < (r + 1) * width and n0 + bn > r * width)
                assert plan.wait[nxt][r] == touching > 0, (nxt, r)
        if layer:  # o's stand-in for attention: every qkv unit
            assert plan.wait[1][31] == programs
    x = torch.randn(MC.R, 2560, generator=g)
    assert torch.equal(MC.from_blocked(MC.to_blocked(x), 2560), x)


@pytest.mark.gpu
@pytest.mark.parametrize("layers", [1, 2])
def test_mega_chain_cuda(layers):
    """The persistent four-matmul chain (CUDA C++, wgmma; experimental, benchmarks/mega_probe.py; not used by the
    engine) against its float32 reference with bf16 rounding after every op; bitwise repeatable."""
    from pi0_triton_policy.kernels import mega_chain as MC

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma / sm_90a")
    g = torch.Generator(device="cuda").manual_seed(layers)
    bf = torch.bfloat16
    weights = {op: (torch.randn(layers, n, k, device="cuda", generator=g) * k**-0.5).to(bf)
               for op, (n, k, *_) in MC.OPS.items()}
    plan = MC.plan_for_this_gpu()
    prepared = {op: plan.prepare(w, op) for op, w in weights.items()}
    cols = dict(x=1024, q=2560, x2=1024, h8=8192)
    x0 = torch.randn(MC.R, 1024, device="cuda", generator=g).to(bf)
    ctr = torch.zeros(layers * 128, dtype=torch.int32, device="cuda")
    runs = []
    for _ in range(2):
        acts = {k: torch.full((MC.blocked_size(c),), float("nan"), dtype=bf, device="cuda") for k, c in cols.items()}
        MC.to_blocked(x0, acts["x"])
        MC.mega_chain(plan, prepared, acts, ctr, layers)
        runs.append({k: MC.from_blocked(acts[k], c) for k, c in cols.items()})
    ref = MC.mega_chain_reference(x0, weights, layers)
    for k in cols:
        assert rel(runs[0][k], ref[k]) < 1e-2, k
        assert torch.equal(runs[0][k], runs[1][k]), f"{k} not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("attn", [2, 3])
def test_mega_chain_state_row_cuda(layers, attn):
    """Flow step 0 in the persistent kernel (mega_chain's state): 51 rows, the last the state token, whose key is the
    first suffix key and which attends to the prefix (a 37-token prompt's padding) and itself only, while the
    actions attend to everything; against mega_layer_reference(state=True), bitwise repeatable, and the state row's
    K / V land where the later steps' fixed keys expect them (key T)."""
    from pi0_triton_policy.kernels import mega_chain as MC
    from pi0_triton_policy.kernels.rmsnorm_qkv_rope import rope_tables

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma / sm_90a")
    g = torch.Generator(device="cuda").manual_seed(30 + layers)
    bf, rows, T = torch.bfloat16, MC.R + 1, 304
    weights = {op: (torch.randn(layers, n, k, device="cuda", generator=g) * k**-0.5).to(bf)
               for op, (n, k, *_) in MC.OPS.items()}
    weights["qkv"][:, :2048] = (weights["qkv"][:, :2048].float() / 16).to(bf)
    kp = torch.randn(layers, T, 256, device="cuda", generator=g).to(bf)
    vp = torch.randn(layers, T, 256, device="cuda", generator=g).to(bf)
    valid = torch.ones(T, dtype=torch.int32, device="cuda")
    valid[T - 11:] = 0
    plan = MC.plan_for_this_gpu(layer=True)
    prepared = {op: plan.prepare(w, op) for op, w in weights.items()}
    cols = dict(x=1024, q=2560, x2=1024, h8=4096)
    cos, sin = rope_tables(1024, 256, device="cuda")
    pos = torch.cat([torch.arange(561, 611), torch.tensor([560])]).to(torch.int32).cuda()  # the state first in position
    x0 = torch.randn(rows, 1024, device="cuda", generator=g) * 3
    ctr = torch.zeros(layers * 128, dtype=torch.int32, device="cuda")
    zeros = torch.zeros(MC.kv_rows(T, rows, attn) - T, 256, dtype=bf, device="cuda")
    runs = []
    for _ in range(2):
        acts = {k: torch.full((MC.blocked_size(c),), float("nan"), dtype=bf, device="cuda") for k, c in cols.items()}
        st = dict(xs=x0.clone(), ss=torch.zeros(2, plan.programs // 4, MC.ss_stride(rows), device="cuda"), pos=pos,
                  cos=cos, sin=sin, eps=1e-6, T=T, state=True, attn_mode=attn,
                  kc=torch.stack([MC.kv_layout(torch.cat([k, zeros]), attn) for k in kp]),
                  vc=torch.stack([MC.kv_layout(torch.cat([v, zeros]), attn) for v in vp]),
                  key_valid=torch.cat([valid, torch.ones(rows, dtype=torch.int32, device="cuda"),
                                       torch.zeros(16, dtype=torch.int32, device="cuda")]),
                  att=torch.full((MC.blocked_size(2048),), float("nan"), dtype=bf, device="cuda"))
        st["ss"][0, 0, :rows] = x0.pow(2).sum(1)
        MC.to_blocked(x0.to(bf), acts["x"])
        MC.mega_chain(plan, prepared, acts, ctr, layers, layer_state=st)
        runs.append(dict(xs=st["xs"], q=MC.from_blocked(acts["q"], 2560, rows), h=MC.from_blocked(acts["h8"], 4096, rows),
                         kc=MC.kv_unlayout(st["kc"][-1], attn)[T:T + rows]))
    ref = MC.mega_layer_reference(x0, weights, layers, pos, cos, sin, 1e-6, (kp, vp, valid), state=True)
    for k in ("xs", "q", "h"):
        assert rel(runs[0][k], ref[k]) < 1e-2, k
        assert rel(runs[0][k][-1:], ref[k][-1:]) < 1e-2, f"{k}: the state row"
        assert torch.equal(runs[0][k], runs[1][k]), f"{k} not deterministic"
    k_own = runs[0]["q"][:, 2048:2304]  # the last layer's keys as the kernel stored them: the state token's at T
    assert torch.equal(runs[0]["kc"][0], k_own[-1]) and torch.equal(runs[0]["kc"][1:], k_own[:-1])


@pytest.mark.gpu
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("attn", [0, 1, 2, 3])
@pytest.mark.parametrize("pair", [8, 4])
def test_mega_chain_layer_cuda(layers, attn, pair):
    """The persistent chain with the real layer's epilogues (RMSNorm row scale from the clusters' sums of squares,
    RoPE on q/k, GeGLU, fp32 residual; experimental) against mega_layer_reference; with attn, the attention link
    too (a 37-token prompt's padding in a 1-camera prefix; ATTN 2 with one K / V cache per layer, as the engine has
    them); bitwise repeatable."""
    from pi0_triton_policy.kernels import mega_chain as MC
    from pi0_triton_policy.kernels.rmsnorm_qkv_rope import rope_tables

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma / sm_90a")
    g = torch.Generator(device="cuda").manual_seed(10 + layers)
    bf = torch.bfloat16
    weights = {op: (torch.randn(layers, n, k, device="cuda", generator=g) * k**-0.5).to(bf)
               for op, (n, k, *_) in MC.OPS.items()}
    weights["qkv"][:, :2048] = (weights["qkv"][:, :2048].float() / 16).to(bf)  # queries pre-scaled, as the engine
    T = 304
    kv_shape = (layers, T, 256) if attn >= 2 else (T, 256)
    kp = torch.randn(*kv_shape, device="cuda", generator=g).to(bf)
    vp = torch.randn(*kv_shape, device="cuda", generator=g).to(bf)
    valid = torch.ones(T, dtype=torch.int32, device="cuda")
    valid[T - 11:] = 0
    plan = MC.plan_for_this_gpu(layer=True, pair=pair)
    prepared = {op: plan.prepare(w, op) for op, w in weights.items()}
    cols = dict(x=1024, q=2560, x2=1024, h8=4096)
    cos, sin = rope_tables(1024, 256, device="cuda")
    pos = torch.arange(560, 560 + MC.R, dtype=torch.int32, device="cuda")
    x0 = torch.randn(MC.R, 1024, device="cuda", generator=g) * 3
    ctr = torch.zeros(layers * 128, dtype=torch.int32, device="cuda")
    runs = []
    # twice the default, then the other activation delivery, the L2 prefetch on / off, the other ring packing (same
    # bits: data movement only), the other softmax normaliser, the rolled epilogues and the other two EXP variants
    # (other bits: checked against the reference only)
    variants = [{}, {}, dict(mcast=1 - MC.MCAST), dict(pf=16 if MC.PF == 0 else 0, spack=0, tail=2 - MC.TAIL),
                dict(spack=1 - MC.SPACK, pf=0), dict(rcp=1 - MC.RCP), dict(roll=1 - MC.ROLL),
                dict(exp=0 if MC.EXP else 2), dict(exp=1 if MC.EXP != 1 else 2)]
    for v in variants:
        acts = {k: torch.full((MC.blocked_size(c),), float("nan"), dtype=bf, device="cuda") for k, c in cols.items()}
        st = dict(xs=x0.clone(), ss=torch.zeros(2, plan.programs // 4, MC.R, device="cuda"), pos=pos, cos=cos, sin=sin,
                  eps=1e-6)
        st["ss"][0, 0] = x0.pow(2).sum(1)
        if attn:  # ATTN 2 / 3: zero rows past the keys and the link's cache layout
            zeros = torch.zeros(MC.kv_rows(T, MC.R, attn) - T, 256, dtype=bf, device="cuda")
            if attn >= 2:
                kc = torch.stack([MC.kv_layout(torch.cat([k, zeros]), attn) for k in kp])
                vc = torch.stack([MC.kv_layout(torch.cat([v, zeros]), attn) for v in vp])
            else:
                kc, vc = torch.cat([kp, zeros]), torch.cat([vp, zeros])
            st.update(T=T, kc=kc, vc=vc,
                      key_valid=torch.cat([valid, torch.ones(MC.R, dtype=torch.int32, device="cuda"),
                                           torch.zeros(16, dtype=torch.int32, device="cuda")]),
                      att=torch.full((MC.blocked_size(2048),), float("nan"), dtype=bf, device="cuda"), attn_mode=attn)
        MC.to_blocked(x0.to(bf), acts["x"])
        MC.mega_chain(plan, prepared, acts, ctr, layers, layer_state=st, **v)
        runs.append(dict(xs=st["xs"], q=MC.from_blocked(acts["q"], 2560), h=MC.from_blocked(acts["h8"], 4096)))
    ref = MC.mega_layer_reference(x0, weights, layers, pos, cos, sin, 1e-6, (kp, vp, valid) if attn else None)
    for k in ("xs", "q", "h"):
        assert rel(runs[0][k], ref[k]) < 1e-2, k
        assert torch.equal(runs[0][k], runs[1][k]), f"{k} not deterministic"
        assert torch.equal(runs[0][k], runs[2][k]), f"{k}: MCAST {1 - MC.MCAST} gives other bits"
        assert torch.equal(runs[0][k], runs[3][k]), f"{k}: {variants[3]} gives other bits"
        assert torch.equal(runs[0][k], runs[4][k]), f"{k}: {variants[4]} gives other bits"
        assert rel(runs[5][k], ref[k]) < 1e-2, (k, variants[5])
        # ROLL: the same math, laid out as a loop (the compiler may contract other multiply-adds: other bits)
        assert rel(runs[6][k], ref[k]) < 1e-2, (k, variants[6])
        for r in (7, 8):  # the other exponentials / row-scale rsqrt: other bits
            assert rel(runs[r][k], ref[k]) < 1e-2, (k, variants[r])



@pytest.mark.parametrize("T", [5, 305, 817])
def test_mega_stage_fixed_keys(T, gen):
    """The fixed keys of every layer into the persistent kernel's key-swizzled caches, in one launch: equal to
    kv_swizzle of the row-major rows; the rows past T untouched, and the validity of the first `valid` keys copied."""
    from pi0_triton_policy.kernels import mega_chain as MC

    dt = torch.float16 if DEV == "cpu" else torch.bfloat16
    L, HD = 3, 256
    kc, vc = randn(L, T + 51, HD, gen=gen).to(dt), randn(L, T + 51, HD, gen=gen).to(dt)
    valid = (torch.arange(T + 51, device=DEV) % 3 != 0).to(torch.int32)
    kd = torch.full((L, T + 66, HD), 7.0, dtype=dt, device=DEV)
    vd = torch.full_like(kd, 7.0)
    vd_valid = torch.full((T + 66,), 9, dtype=torch.int32, device=DEV)
    MC.stage_fixed_keys(kc, vc, valid, kd, vd, vd_valid, T)
    assert torch.equal(kd[:, :T], MC.kv_swizzle(kc[:, :T])) and torch.equal(vd[:, :T], MC.kv_swizzle(vc[:, :T]))
    assert kd[:, T:].eq(7).all() and vd[:, T:].eq(7).all()
    assert torch.equal(vd_valid[:T - 1], valid[:T - 1]) and vd_valid[T - 1:].eq(9).all()
    # the engine's use: the prefix's T keys before flow step 0, every one's validity (the state token's comes later)
    vd_valid.fill_(9)
    MC.stage_fixed_keys(kc, vc, valid, kd, vd, vd_valid, T, valid=T)
    assert torch.equal(vd_valid[:T], valid[:T]) and vd_valid[T:].eq(9).all()
    # ATTN 3's layout (kv_blocked: whole 16-key sub-blocks): the first T keys as kv_blocked places them, the rest kept
    rows = MC.kv_rows(T, 50, 3)
    kd3 = torch.full((L, rows, HD), 7.0, dtype=dt, device=DEV)
    vd3 = torch.full_like(kd3, 7.0)
    MC.stage_fixed_keys(kc, vc, valid, kd3, vd3, vd_valid, T, valid=T, attn=3)
    for src, dst in ((kc, kd3), (vc, vd3)):
        full = torch.full((L, rows, HD), 7.0, dtype=dt, device=DEV)
        full[:, :T] = src[:, :T]
        ref = MC.kv_blocked(full)
        keep = MC.kv_blocked(torch.arange(rows, device=DEV).view(1, rows, 1).expand(1, rows, HD).float())[0] < T
        assert torch.equal(dst[:, keep], ref[:, keep]) and dst[:, ~keep].eq(7).all()


@pytest.mark.parametrize("rows", [50, 51])
def test_mega_stage_step_input(gen, rows):
    """The engine-side glue of the persistent chain: the fp32 residual -> its bf16 blocked copy (as `to_blocked`) and
    the first qkv's norm sums (the whole sum in cluster 0, zeros elsewhere), the chain's counters zeroed; 51 rows:
    flow step 0 with the state token last."""
    from pi0_triton_policy.kernels import mega_chain as MC

    xs = randn(rows, 1024, gen=gen)
    xb = torch.full((MC.blocked_size(1024),), 7.0, dtype=torch.float16 if DEV == "cpu" else torch.bfloat16, device=DEV)
    ss = torch.full((2, 30, MC.ss_stride(rows)), 5.0, device=DEV)
    ctr = torch.full((18 * 128,), 3, dtype=torch.int32, device=DEV)
    MC.stage_step_input(xs, xb, ss, ctr)
    assert ctr.eq(0).all()
    ref = MC.to_blocked(xs.to(xb.dtype))
    idx = MC._blocked_index(1024, xs.device, rows).view(-1)  # the rows past them are not part of the activations
    assert torch.equal(xb[idx], ref[idx])
    assert rel(ss[0, 0, :rows], xs.pow(2).sum(1)) < 1e-6 and ss[0, 1:, :rows].eq(0).all() and ss[1].eq(5.0).all()


@pytest.mark.parametrize("split", [1, 8])
def test_time_mlp_writes_mega_inputs(gen, split):
    """Tuning.mega_direct: the time MLP's epilogue writes the persistent kernel's inputs itself: its bf16 copy in the
    blocked layout equals what stage_step_input makes from the same residual (bitwise, every element the kernel
    reads), and its per-tile norm sums add up to the row sums of squares; 50 rows, the engine's 1024 columns."""
    from pi0_triton_policy.kernels import mega_chain as MC

    M, D = MC.R, 1024
    dt = torch.float16 if DEV == "cpu" else torch.bfloat16
    h, w, bias = randn(M, D, gen=gen), randn(D, D, scale=D**-0.5, gen=gen), randn(D, gen=gen)
    x = torch.full((M, D), float("nan"), device=DEV)
    xb = torch.full((MC.blocked_size(D),), 7.0, dtype=dt, device=DEV)
    ss = torch.full((30, M), 5.0, device=DEV)
    SK.skinny_residual(h, SK.transpose_weight(w), x, xb, ss[:16], bias=bias, store=True, xa_block=MC.A_BLOCK // 2,
                       split=split, block=(64, 32, 64), num_warps=4, num_stages=2)
    tol = 3e-3 if DEV == "cuda" else 1e-6  # tf32 dots on the GPU
    assert rel(x, h @ w + bias) < tol
    xb_ref = torch.full_like(xb, 7.0)
    MC.stage_step_input(x, xb_ref, torch.zeros(2, 30, M, device=DEV), torch.zeros(64, dtype=torch.int32, device=DEV))
    idx = MC._blocked_index(D, x.device, M).view(-1)
    assert torch.equal(xb[idx], xb_ref[idx])
    assert rel(ss[:16].sum(0), x.pow(2).sum(1)) < 1e-5 and ss[16:].eq(5.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("T,kvw,xchg", [(305, 16, 1), (305, 32, 0), (305, 16, 2), (305, 16, 3), (305, 16, 4),
                                         (49, 32, 1), (49, 32, 2), (49, 32, 3), (49, 32, 4)])
def test_head_block(T, kvw, xchg):
    """The per-head cluster attention block (CUDA C++, sm_90a; kernels/head_block.py) against its float32 reference on
    fresh random data: one camera's 305 fixed keys with a padded prompt (keys 200..299 masked), and 49 fixed keys (a
    rank with no keys at all, ranks with only suffix keys); every exchange variant; the suffix rows' k / v land in
    the caches (to bf16 rounding: another summation order), the fixed keys untouched; bitwise repeatable."""
    from pi0_triton_policy.kernels import head_block as HB
    from pi0_triton_policy.kernels import mega_chain as MC

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs sm_90a (wgmma, clusters)")
    if HB.resident_clusters(T, kvw) < HB.grid(kvw) // 8:
        pytest.skip("this GPU cannot hold every cluster of 8 at once")
    g = torch.Generator(device="cuda").manual_seed(T + kvw)
    bf = torch.bfloat16
    x = torch.randn(MC.R, 1024, device="cuda", generator=g).to(bf)
    wq = (torch.randn(1024, 2048, device="cuda", generator=g) * 1024**-0.5 * 1.4426950408889634 / 16).to(bf)
    wkv = (torch.randn(1024, 512, device="cuda", generator=g) * 1024**-0.5).to(bf)
    wo = (torch.randn(2048, 1024, device="cuda", generator=g) * 2048**-0.5).to(bf)
    k_fixed = torch.randn(T, 256, device="cuda", generator=g).to(bf)
    v_fixed = torch.randn(T, 256, device="cuda", generator=g).to(bf)
    n, _ = HB.nsb_for(T)
    valid = torch.zeros(16 * n, dtype=torch.int32, device="cuda")
    valid[: T + MC.R] = 1
    if T > 300:
        valid[200:300] = 0
    ref, k_suf, v_suf = HB.head_block_ref(x, wq, wkv, wo, k_fixed, v_fixed, valid)
    prep = HB.prepare(wq, wkv, wo, kvw)
    x0 = torch.randn(MC.R, 1024, device="cuda", generator=g)
    outs = []
    for _ in range(2):
        kc, vc = HB.caches(k_fixed, v_fixed)
        out = torch.full((8, MC.R, 1024), float("nan"), device="cuda")
        xres, ss = x0.clone(), torch.full((512 // kvw, MC.R), float("nan"), device="cuda")
        counter = torch.zeros(3, dtype=torch.int32, device="cuda")
        HB.head_block(MC.to_blocked(x), prep, kc, vc, valid, T, out, xres, ss, counter, xchg=xchg)
        torch.cuda.synchronize()
        assert counter.tolist() == [512 // kvw, 64, 512 // kvw]
        want = x0.clone()
        for h in range(8):  # the kernel's order: the residual, then head 0, 1, ... (float32)
            want += out[h]
        assert torch.equal(xres, want)
        assert rel(ss, xres.view(MC.R, 512 // kvw, -1).square().sum(-1).t()) < 1e-5
        k_all, v_all = MC.kv_blocked(kc, inverse=True), MC.kv_blocked(vc, inverse=True)
        assert rel(k_all[T: T + MC.R], k_suf) < 5e-3 and rel(v_all[T: T + MC.R], v_suf) < 5e-3
        assert torch.equal(k_all[:T], k_fixed) and torch.equal(v_all[:T], v_fixed)
        assert rel(out, ref) < 1e-2, rel(out, ref)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]), "not deterministic"


def test_head_block_pack_rows():
    """kernels/head_block.py's weight slices: element (row, k) of w at [k / 64][row][((k % 64) / 8 ^ row % 8) * 8 + k % 8],
    the 128-byte swizzle the wgmma descriptors assume; and the sub-blocks per rank (8 ranks)."""
    from pi0_triton_policy.kernels import head_block as HB

    w = torch.arange(24 * 128, dtype=torch.float32).reshape(24, 128)
    p = HB.pack_rows(w)
    assert p.shape == (2, 24, 8, 8)
    for row in (0, 5, 13, 23):
        for k in (0, 7, 8, 63, 64, 100, 127):
            g = ((k % 64) // 8) ^ (row % 8)
            assert p[k // 64, row, g, k % 8] == w[row, k]
    assert HB.nsb_for(305) == (23, 3) and HB.nsb_for(49) == (7, 1)
    assert HB.grid(8) == 128 and HB.grid(32) == 80
