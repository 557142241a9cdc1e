"""The `triton` backend: Pi0 inference from the fused kernels in kernels/, one CUDA graph per camera count.

Load (once): canonical OpenPI weights -> engine layouts (`EngineWeights`): fused QKV with Gemma's
(1 + scale) and the q scale folded in, LayerNorm scale/bias folded into SigLIP's matmuls, the
action-time MLP's time embeddings folded into one bias per flow step, the action expert's final norm
folded into action_out_proj, RoPE tables. Everything bf16 except the residual streams, norms'
statistics, softmax and the small state/action/time projections (float32, as OpenPI).

Per number of present cameras V (1, 2, 3) a `_ViewGraph` owns every buffer and one CUDA graph of the
whole `sample_actions`: SigLIP on the V present images only (a masked slot is invisible to every
other token and positions skip it, so dropping it is exact), the Gemma prefix (KV cache for
256*V + 48 tokens; the last layer stops after K/V), then the 10 action-expert steps. The prompt length
(1..48) is an input (a key-validity mask and positions), so it never re-captures. The state token's
keys/values do not depend on the actions, so they are computed on the first step only.

    sample_actions(images, image_mask, tokens, token_mask, state, noise) -> actions   (numpy, like `torch`)
    sample_actions_torch(...)                                                          (batched tensors)
    Pi0Inference(num_views=..., params=...).infer(images, state, noise, tokens)        (realtime-vla's face)
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from pi0_triton_policy.config import Pi0Config
from pi0_triton_policy.kernels import (
    action_attention as AA,
    add_norm as AN,
    geglu as GG,
    gemm_geglu as GEG,
    gemm_rope_qkv as GRQ,
    rope_qkv as RK,
    action_out_euler as AOE,
    action_time_mlp as ATM,
    embed_tokens as ET,
    layernorm_linear as LNL,
    linear_residual as LR,
    mega_chain as MC,
    patch_embed as PE,
    prefix_attention as PA,
    rmsnorm_geglu as RG,
    skinny_matmul as SK,
    action_stack as AS,
    rmsnorm_qkv_rope as RQR,
    vision_attention as VA,
    wgmma_geglu as WGG,
    wgmma_linear as WL,
)
from pi0_triton_policy.kernels._common import Workspace


def flow_times(num_steps: int) -> list[float]:
    """The reference's float32 while-loop: t = 1, 1 + dt, ... while t >= -dt/2."""
    dt = np.float32(-1.0 / num_steps)
    t, out = np.float32(1.0), []
    while t >= -dt / 2:
        out.append(float(t))
        t = np.float32(t + dt)
    return out


@dataclasses.dataclass
class Tuning:
    """Launch shapes per phase (block sizes, warps, split-K); see benchmarks/NOTES.md for how they were picked."""

    vis_ln: tuple = (64, 128, 64, 4, 3)  # BM, BN, BK, warps, stages
    vis_res: tuple = (64, 64, 64, 4, 3)
    vis_split: int = 2
    # per camera count 1, 2, 3: (BM, BN, warps, stages, split_d, tma) (kernels/vision_attention.py); (64, 64, 4, 3)
    # 6.9 / 7.2 / 9.7 us per call vs 7.4 / 7.7 / 9.9 with 2 stages (session 8); through tensor descriptors 5.9 / 6.5 /
    # 8.7 (3 cams: (128, 128, 8, 2) with the 64 + 16 head dim) vs 6.8 / 7.3 / 9.5; per-thread loads with the base-2
    # softmax 5.95 / 6.07 / 9.09 vs TMA 5.85 / 6.39 / 8.60 (NOTES.md session 13)
    vis_attn: tuple = ((64, 64, 4, 3, 0, 1), (64, 64, 4, 3, 0, 0), (128, 128, 8, 2, 1, 1))
    pre_qkv: tuple = (64, 64, 64, 4, 3)
    pre_mlp: tuple = (128, 128, 64, 8, 3)
    pre_res: tuple = (128, 128, 64, 8, 3)
    pre_split: int = 2
    # per camera count 1, 2, 3: (BM, BN, warps, stages, split[, tma]): split > 1 shares a (row block, head)'s key blocks
    # out over that many programs, merged by the last (measured slower: NOTES.md session 13); tma 1: the tiles through
    # tensor descriptors (kernels/prefix_attention.py). (64, 64) x 4 warps (one warpgroup): 11.4 / 17.5 / 24.3 us per
    # call vs 15.1 / 24.6 / 34.5 for (64, 64) x 8 warps (attn_shapes_probe, NOTES.md s8); with TMA and 3 stages 9.0 /
    # 13.5 / 17.9 vs 11.2 / 17.6 / 23.9 (the K / V tiles' intake was the limit, NOTES.md session 13)
    pre_attn: tuple = ((64, 64, 4, 3, 1, 1), (64, 64, 4, 3, 1, 1), (64, 64, 4, 3, 1, 1))
    # the prefix gate/up matmul with the GeGLU in its epilogue (kernels/gemm_geglu.py: persistent TMA matmul over
    # interleaved gate/up weight rows, no gate/up intermediate in DRAM): 72.7 / 119.6 / 161.8 us per layer vs cuBLAS +
    # the GeGLU pass 72.2 / 130.0 / 171.7 (benchmarks/geglu_probe.py). Per camera count 1, 2, 3; False: cuBLAS on the
    # same interleaved layout + the GeGLU pass. pre_gu: (BM, BN, BK, warps, stages, group_m)
    pre_gu_fused: tuple = (True, True, True)
    pre_gu: tuple = (128, 256, 64, 8, 4, 8)
    # the fused gate/up on kernels/wgmma_geglu.py instead (CUDA wgmma with the tokens as N: no padded rows; sm_90a),
    # per camera count, and its ring depth. geglu_probe (persistent, epilogue in 32-token chunks): 63.5 / 102.9 /
    # 147.5 us vs gemm_geglu 70.2 / 113.1 / 160.1 in the same call (3 stages, one program per tile, tokens multicast
    # in pairs of programs, h stored from the registers: all slower, NOTES.md session 14)
    pre_gu_wgmma: tuple = (True, True, True)
    pre_gu_wgmma_stages: int = 4
    pre_gu_wgmma_pdl: bool = True  # its first weight boxes asked for while the add_norm before it finishes (PDL)
    # the prefix QKV matmul with RoPE in its epilogue (kernels/gemm_rope_qkv.py, writes q and the K/V cache rows),
    # per camera count; False: cuBLAS on the same (pair-interleaved, i.e. transposed) layout + the RoPE pass, which
    # profiled at 11.7 + 3.8 / 14.6 + 7.1 us per layer (1 / 3 cams). Fused, benchmarks/qkv_rope_probe.py: 11.3 / 16.7 /
    # 15.8 us with these shapes; pre_qkv_g per camera count: (BM, BN, BK, warps, stages, group_m)
    pre_qkv_fused: tuple = (True, True, True)
    pre_qkv_g: tuple = ((64, 128, 64, 4, 4, 8), (128, 128, 64, 8, 4, 8), (64, 256, 64, 4, 4, 8))
    act_qkv: tuple = (64, 32, 64, 4, 4)
    act_mlp: tuple = (64, 32, 64, 4, 4)
    act_res: tuple = (64, 32, 256, 4, 3)
    act_split: int = 4
    act_attn: tuple = (32, 64, 4, 2)
    act_attn_split: int = 8
    # cuBLAS (torch.mm) for the matmuls + Triton glue (add_norm, rope_qkv, geglu), per phase: measured
    # faster for vision and prefix (compute-bound); see benchmarks/NOTES.md
    vis_cublas: bool = True
    vis_gelu_epilogue: bool = True  # vision fc1's tanh-GELU in cuBLASLt's epilogue (CUDA) instead of a separate pass
    vis_fc1_t: bool = True  # (load time) vision fc1's weights stored [N, K] for cuBLAS (the same [K, N] matrix)
    # per camera count 1, 2, 3: SigLIP's qkv (+ bias) on kernels/wgmma_linear.py (a one-wave output tile width; sm_90a),
    # which keeps a second copy of its weights stored [N, K] (+215 MB) when any is on. vision_gemm_probe (27 layers):
    # 9.14 / 12.35 us at 2 / 3 cams vs cuBLAS 12.22 / 13.63; at 1 cam 7.79 vs 7.05 (NOTES.md session 14)
    vis_qkv_wgmma: tuple = (False, True, True)
    # per camera count 1, 2, 3, (o, fc2): SigLIP's o / fc2 projection as S K-parts in one batched cuBLAS call (more
    # tiles for 132 SMs), the parts summed by the add_norm that follows (kernels/add_norm.py mm_split_k); 1: one mm.
    # vision_gemm_probe (27 layers, + add_norm): fc2 at 1 cam 11.8 us split 2 vs 13.2; o and 2-3 cams slower split
    # (NOTES.md session 13)
    vis_res_split: tuple = ((1, 2), (1, 1), (1, 1))
    # the same for the Gemma prefix's o / down, per camera count. vision_gemm_probe (+ add_norm): down 47.4 / 65.0 /
    # 96.2 us -> 38.3 (split 4) / 57.2 / 78.3 (split 2), o 11.3 / 15.8 / 18.9 -> 10.3 / 14.5 / 18.5 (split 2); engine
    # replay 9.27 / 11.11 / 13.01 ms vs 9.29 / 11.28 / 13.22 and 9.40 / 11.26 / 13.27 unsplit (NOTES.md session 13)
    pre_res_split: tuple = ((2, 4), (2, 2), (2, 2))
    # warps per row of the add_norm glue (kernels/add_norm.py: one row per program), SigLIP (D 1152) and Gemma (2048)
    vis_norm_warps: int = 4
    pre_norm_warps: int = 4
    # patch embedding (kernels/patch_embed.py): BM, BN, BK, warps, tl.dot input precision ("tf32x3": float32-accurate
    # on the tensor cores; "ieee": FMA units). patch_embed_probe, us at 1 / 2 / 3 cams: (64, 64, 32) ieee 36.8 / 52.5 /
    # 51.5, (32, 64, 32) tf32x3 30.1 / 39.6 / 50.6 (NOTES.md session 10)
    vis_patch: tuple = (32, 64, 32, 4, "tf32x3")
    act_cublas: bool = True  # 14.8 vs 16.7 ms at 1 cam (NOTES.md)
    # weight-streaming skinny matmuls (kernels/skinny_matmul.py) for the action expert; overrides act_cublas.
    # (BH, BK, warps, stages, split_k[, peel]): each program owns 2*BH output columns and K/split_k of K; peel 1 (the
    # default when absent): the first K block's weights are requested before the PDL wait (kernels/skinny_matmul.py).
    act_skinny: bool = True
    # PEEL 0 + 5 stages: nothing requested before the PDL wait, every weight and A tile of the first 4 K blocks in
    # the pipelined loop's prologue at once (replay 11.41 / 13.36 / 16.02 -> 11.16 / 13.21 / 15.75 ms, NOTES.md s5)
    sk_qkv: tuple = (16, 128, 4, 5, 1, 0)  # BH fixed at load (column pairing); no split-K (no reduction tail)
    sk_gu: tuple = (32, 128, 4, 5, 1, 0)  # BH fixed at load
    # o / down on half-tiles BH 16 (128 programs each; BH fixed at load: the norm-statistics tiles): replay
    # 10.74 / 12.85 / 15.41 -> 10.63 / 12.82 / 15.25 ms vs BH 32 (64 programs), NOTES.md session 5
    sk_o: tuple = (16, 128, 4, 5, 4, 0)
    sk_down: tuple = (16, 128, 4, 5, 4, 0)
    # float32 weights (tf32 dot); BH must equal sk_o's / sk_down's while step 0 runs on the skinny path (its norm
    # statistics tiles); with every step in the persistent kernel (mega_step0) nothing reads them and BH is free
    sk_time: tuple = (16, 64, 4, 4, 8)
    # the time MLP's first half (swish(x_t W1 + time bias)) computed inside its second matmul's K loop instead of by
    # swish_in: one launch less per flow step (kernels/skinny_matmul.py SWISH_A)
    time_fused: bool = False
    # action attention on the skinny path per camera count (BM, BN, warps, stages, split[, peel]; split 0: one key block
    # per split; peel 0: no key block loaded outside the pipelined loop, which also turns attn_preload off)
    # every key block through the pipelined loop (peel 0, so no preload), replay vs the peeled, preloaded first
    # block (NOTES.md session 5): 1 cam 11.08 -> 10.84, 2 cams 13.10 -> 12.95 ((16,64), 3 stages, split 8), 3 cams
    # 15.72 -> 15.43
    sk_attn1: tuple = (16, 128, 8, 2, 4, 0)
    sk_attn2: tuple = (16, 64, 8, 3, 8, 0)
    sk_attn3: tuple = (16, 128, 8, 2, 4, 0)
    # persistent action expert (kernels/action_stack.py): all layers of a flow step in one launch, grid barriers
    # between phases, optional L2 prefetch of the weights st_ahead phases ahead. Replaces act_skinny's per-layer
    # kernels when on (the time MLP and the output/Euler update stay separate kernels).
    act_stack: bool = False  # measured slower than the per-layer kernels with PDL (benchmarks/NOTES.md)
    # the action expert's flow steps in the persistent CUDA kernel of kernels/mega_chain.py (qkv, attention, o,
    # gate|up, down of all layers in one launch; ATTN 2), per camera count 1, 2, 3; step 0 (51 rows: the state token
    # last) too with mega_step0 (below), else on the skinny path. Needs sm_90a and 25 resident clusters of 4 (H100 /
    # H200; elsewhere the skinny path runs). Replay, same process (NOTES.md session 9, under PDL): 3 cams 14.79 / 14.80 -> 14.57 / 14.57 ms;
    # 1 cam equal, 2 cams 0.06-0.1 ms slower. With its publish's counter adds relaxed (PUB 3, NOTES.md session 10):
    # replay 10.56 / 12.41 / 14.05 (per-kernel at 1 / 2 cams) -> 10.21 / 12.11 / 14.05 ms, so on everywhere.
    act_mega: tuple = (True, True, True)
    # flow step 0 (51 rows: the state token last, kernels/mega_chain.py STATE) in the persistent kernel too; False:
    # on the skinny path
    mega_step0: bool = True
    mega_pub: int = MC.PUB  # the persistent kernel's publish variant (kernels/mega_chain.py, unit_body's comment)
    mega_gelu: int = MC.GELU  # its gate|up GELU variant (kernels/mega_chain.py, gelu_tanh_f)
    mega_pf: int = MC.PF  # its lazy L2 prefetch lookahead in ring chunks (kernels/mega_chain.py, prefetch_chunk)
    mega_rcp: int = MC.RCP  # its attention's softmax normalisers (0 IEEE reciprocal, 1 fast)
    mega_exp: int = MC.EXP  # its exponentials (kernels/mega_chain.py fexp: 0 __expf, 1 ex2.approx.ftz; 2 also frsqrt)
    mega_pair: int = MC.PAIR  # its qkv / gate|up column units (kernels/mega_chain.py, PAIRED)
    mega_spack: int = MC.SPACK  # its ring: two narrow weight chunks per slot (kernels/mega_chain.py, Pack)
    mega_tail: int = MC.TAIL  # its L2 prefetch of an op's chunks past the ring (kernels/mega_chain.py, TAIL)
    # its attention link: 2 mma.sync on 16-row tiles of the packed heads (100 programs), 3 wgmma on one head per
    # cluster (32 programs; kernels/mega_chain.py attention_unit3)
    mega_attn: int = 2
    # flow steps 1..: the time MLP's epilogue writes the persistent kernel's inputs itself (the blocked bf16 residual
    # and the first qkv's norm sums) and the previous step's output projection zeroes its counters, so no staging
    # launch (stage_step_input) sits between them
    mega_direct: bool = True
    st_qkv: tuple = (16, 128)  # BH (fixed at load: column pairing), BK
    st_gu: tuple = (32, 128)  # BH (fixed at load), BK
    st_res: tuple = (16, 128, 4, 128, 4)  # BH (o, down, time MLP: the norm-statistics tiles), BK_o, split_o, BK_down, split_down
    st_attn1: tuple = (16, 128, 2, 4)  # BM, BN, stages, split (key chunks)
    st_attn2: tuple = (16, 64, 2, 4)
    st_attn3: tuple = (16, 64, 2, 4)
    st_nprog: int = 0  # programs (0: one per SM)
    st_warps: int = 4
    st_stages: int = 4
    st_prefetch: int = 0  # 0 off (fastest measured), 1 per-line prefetch.global.L2, 2 cp.async.bulk.prefetch.L2 per row
    st_ahead: int = 2
    st_barrier: int = 0  # 0 one arrival counter (fastest measured), 1 per-program flags
    pdl: bool = True  # programmatic dependent launch between the skinny path's kernels (where Triton has it)
    # the BLAS library behind the engine's torch matmuls (vision, prefix) while run() issues / captures them: ""
    # torch's default, "cublas" or "cublaslt" (torch.backends.cuda.preferred_blas_library; restored afterwards).
    # "cublaslt" measured neutral: replay 9.02 / 10.77 / 12.66 and 9.09 / 10.81 / 12.69 ms vs the default's 9.05 /
    # 10.80 / 12.62 and 9.07 / 10.78 / 12.68 in the same process (NOTES.md session 16)
    blas: str = ""
    # calls from host memory (numpy: the policy server's) stage one observation in the graph's pinned input mirror
    # and move it with one copy (_InputBlock); False: torch tensors from the numpy arrays, a copy per tensor
    host_staging: bool = True
    # the same for the Triton kernels of the vision and prefix phases (norms, RoPE, GeGLU, attention): off, measured
    # neutral to slower (replay 11.47 / 13.45 / 16.30 ms on vs 11.54 / 13.40 / 16.16 off, NOTES.md session 5)
    pdl_glue: bool = False
    pdl_early: bool = False  # skinny matmuls signal their dependents at entry rather than after gdc_wait
    # skinny matmuls prefetch their whole weight slab into L2 at entry (before gdc_wait): 0 no, 1 one
    # prefetch.global.L2 per line, 2 cp.async.bulk.prefetch.L2 per row; attention likewise its K/V chunk
    prefetch: int = 0
    attn_prefetch: bool = False
    # action attention loads its first prefix K/V block before gdc_wait (PDL), per camera count 1, 2, 3
    attn_preload: tuple = (True, True, True)
    sk_early_epi: bool = True  # skinny matmuls request their epilogue operands before the K loop
    # final norm + output projection + Euler step (BM, BK, warps, split-K): split so that 64 programs share D
    # instead of one program walking it (16.6 us per step at (64, 64, 4, 1))
    out_euler: tuple = (16, 64, 4, 16)


    @classmethod
    def from_env(cls) -> "Tuning":
        import json
        import os

        over = json.loads(os.environ.get("PI0_TUNING", "{}") or "{}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()})


def _fit_bh(bh: int, n: int) -> int:
    """The largest power-of-2 half-tile <= bh that divides n (small test models)."""
    while bh > 1 and n % bh:
        bh //= 2
    return bh


class EngineWeights:
    """Canonical weights re-laid out for the kernels (built layer by layer to bound peak memory)."""

    def __init__(self, cfg: Pi0Config, params: dict[str, torch.Tensor], device, dtype=torch.bfloat16,
                 tuning: "Tuning | None" = None):
        dev = torch.device(device)
        tuning = tuning or Tuning()
        f32 = torch.float32
        get = lambda name: params[name].to(dev)  # noqa: E731
        v, p, a = cfg.vision, cfg.prefix, cfg.action
        img, blk = "PaliGemma/img", "PaliGemma/img/Transformer/encoderblock"
        att = f"{blk}/MultiHeadDotProductAttention_0"
        # SigLIP
        self.patch_w = get(f"{img}/embedding/kernel").to(f32).reshape(-1, v.width).contiguous()
        self.patch_add = (get(f"{img}/embedding/bias").to(f32) + get(f"{img}/pos_embedding").to(f32)[0]).contiguous()
        W = v.width
        qs = v.head_dim**-0.5
        self.v_qkv_w, self.v_qkv_b, self.v_o_w, self.v_o_b = [], [], [], []
        self.v_qkv_nk = []  # [N, K] copies for wgmma_linear (Tuning.vis_qkv_wgmma), else empty
        self.v_fc1_w, self.v_fc1_b, self.v_fc2_w, self.v_fc2_b = [], [], [], []
        for i in range(v.depth):
            w = torch.cat([get(f"{att}/query/kernel")[i].float().reshape(W, W) * qs,
                           get(f"{att}/key/kernel")[i].float().reshape(W, W),
                           get(f"{att}/value/kernel")[i].float().reshape(W, W)], 1)
            b = torch.cat([get(f"{att}/query/bias")[i].float().reshape(W) * qs,
                           get(f"{att}/key/bias")[i].float().reshape(W),
                           get(f"{att}/value/bias")[i].float().reshape(W)])
            wf, bf = LNL.fold_layernorm(get(f"{blk}/LayerNorm_0/scale")[i], get(f"{blk}/LayerNorm_0/bias")[i], w, b, dtype)
            self.v_qkv_w.append(wf)
            self.v_qkv_b.append(bf)
            if any(tuning.vis_qkv_wgmma) and tuning.vis_cublas and WL.available(dev):
                self.v_qkv_nk.append(wf.t().contiguous())
            self.v_o_w.append(get(f"{att}/out/kernel")[i].reshape(W, W).to(dtype).contiguous())
            self.v_o_b.append(get(f"{att}/out/bias")[i].to(f32).contiguous())
            wf, bf = LNL.fold_layernorm(get(f"{blk}/LayerNorm_1/scale")[i], get(f"{blk}/LayerNorm_1/bias")[i],
                                        get(f"{blk}/MlpBlock_0/Dense_0/kernel")[i], get(f"{blk}/MlpBlock_0/Dense_0/bias")[i], dtype)
            # cuBLAS runs fc1 faster on [N, K] storage ("TN"): 9.3 / 12.2 / 15.6 vs 9.7 / 12.6 / 16.3 us (NOTES.md s13)
            self.v_fc1_w.append(wf.t().contiguous().t() if tuning.vis_fc1_t and tuning.vis_cublas else wf)
            self.v_fc1_b.append(bf)
            self.v_fc2_w.append(get(f"{blk}/MlpBlock_0/Dense_1/kernel")[i].to(dtype).contiguous())
            self.v_fc2_b.append(get(f"{blk}/MlpBlock_0/Dense_1/bias")[i].to(f32).contiguous())
        n = f"{img}/Transformer/encoder_norm"
        self.head_w, self.head_b = LNL.fold_layernorm(get(f"{n}/scale"), get(f"{n}/bias"), get(f"{img}/head/kernel"),
                                                      get(f"{img}/head/bias"), dtype)
        self.embedding = get("PaliGemma/llm/embedder/input_embedding").to(dtype).contiguous()
        # Gemma experts: [prefix, action]
        lay = "PaliGemma/llm/layers"
        self.qkv, self.o, self.gating, self.down = [[], []], [[], []], [[], []], [[], []]
        for e, (sfx, g) in enumerate((("", p), ("_1", a))):
            for i in range(g.depth):
                kv = get(f"{lay}/attn/kv_einsum{sfx}/w")[i]  # [2, 1, D, H]
                w = RQR.fold_qkv(get(f"{lay}/pre_attention_norm{sfx}/scale")[i], get(f"{lay}/attn/q_einsum{sfx}/w")[i],
                                 kv[0, 0], kv[1, 0], dtype)
                # the prefix's weights in gemm_rope_qkv's layout [(NQ+2)*H, D] (RoPE pairs interleaved); cuBLAS: its transpose
                self.qkv[e].append(GRQ.interleave_rope_pairs(w, g.num_heads, g.head_dim) if e == 0 else w)
                self.o[e].append(get(f"{lay}/attn/attn_vec_einsum{sfx}/w")[i].reshape(-1, g.width).to(dtype).contiguous())
                self.gating[e].append(RG.fold_gating(get(f"{lay}/pre_ffw_norm{sfx}/scale")[i], get(f"{lay}/mlp{sfx}/gating_einsum")[i], dtype))
                self.down[e].append(get(f"{lay}/mlp{sfx}/linear")[i].to(dtype).contiguous())
        # cuBLAS layouts: bf16 biases for addmm, gate|up concatenated [D, 2F]
        self.v_qkv_bb = [b.to(dtype) for b in self.v_qkv_b]
        self.v_fc1_bb = [b.to(dtype) for b in self.v_fc1_b]
        self.head_bb = self.head_b.to(dtype)
        self.gu = [[torch.cat([g[0], g[1]], 1) for g in self.gating[e]] for e in (0, 1)]
        self.gating[0] = None  # the prefix runs on cuBLAS / gemm_geglu only: keep one copy
        # the prefix's gate|up in gemm_geglu's layout [2F, D] (gate/up rows interleaved); cuBLAS runs on its transpose
        self.gu[0] = [GEG.interleave_gate_up(w) for w in self.gu[0]]
        self.cos, self.sin = RQR.rope_tables(1024, p.head_dim, p.rope_max_wavelength, device=dev)
        # small float32 projections
        self.state_w, self.state_b = get("state_proj/kernel").to(f32).contiguous(), get("state_proj/bias").to(f32).contiguous()
        self.out_w = ((1.0 + get("PaliGemma/llm/final_norm_1/scale").float())[:, None] * get("action_out_proj/kernel").float()).contiguous()
        self.out_b = get("action_out_proj/bias").to(f32).contiguous()
        self.time_out_w = get("action_time_mlp_out/kernel").to(f32).contiguous()
        self.time_out_b = get("action_time_mlp_out/bias").to(f32).contiguous()
        self._time_src = {k: get(k).to(f32) for k in ("action_in_proj/kernel", "action_in_proj/bias",
                                                       "action_time_mlp_in/kernel", "action_time_mlp_in/bias")}
        self._time_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mega = {}  # pair -> (plan, prepared weights)
        # skinny-matmul layouts of the action expert: W^T [N, K], qkv / gate|up columns paired per half-tile
        t = tuning
        # (qkv and gate|up column pairings are baked into the layout; o/down/time_out are plain transposes,
        # so their half-tile BH is a launch-time choice)
        # (stacked [L, N, K]: the persistent kernel indexes layers; the per-layer path takes [i] views)
        bhq, bhg = (t.st_qkv[0], t.st_gu[0]) if t.act_stack else (t.sk_qkv[0], t.sk_gu[0])
        self.sk_bh = {"qkv": _fit_bh(bhq, a.head_dim // 2), "gu": _fit_bh(bhg, a.mlp_dim)}
        pq = SK.pair_perm_qkv(a.num_heads, a.head_dim, self.sk_bh["qkv"])
        pg = SK.pair_perm_geglu(a.mlp_dim, self.sk_bh["gu"])
        stack = lambda ws, perm=None: torch.stack([SK.transpose_weight(w, perm) for w in ws])  # noqa: E731
        self.sk_qkv = stack(self.qkv[1], pq)
        self.sk_o = stack(self.o[1])
        self.sk_gu = stack(self.gu[1], pg)
        self.sk_down = stack(self.down[1])
        self.sk_time = SK.transpose_weight(self.time_out_w)  # float32

    def mega(self, pair: int = MC.PAIR) -> tuple:
        """(plan, prepared weights) of the action expert for kernels/mega_chain.py's LAYER mode, made on first use:
        W^T [L, N, K] of the folded weights (RMSNorm (1 + scale) and the query scale in them) in its ring layout.
        One copy per column-unit width `pair` asked for (the default engine asks for one)."""
        if pair not in self._mega:
            plan = MC.plan_for_this_gpu(layer=True, pair=pair)
            wt = lambda ws: torch.stack([w.t() for w in ws])  # noqa: E731
            self._mega[pair] = (plan, {op: plan.prepare(wt(ws), op) for op, ws in
                                       (("qkv", self.qkv[1]), ("o", self.o[1]), ("gu", self.gu[1]), ("down", self.down[1]))})
        return self._mega[pair]

    def time_weights(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1 [32, W], per-step time biases [num_steps, W])."""
        if num_steps not in self._time_cache:
            s = self._time_src
            times = torch.tensor(flow_times(num_steps), dtype=torch.float32, device=self.state_w.device)
            self._time_cache[num_steps] = ATM.fold_action_time(s["action_in_proj/kernel"], s["action_in_proj/bias"],
                                                               s["action_time_mlp_in/kernel"], s["action_time_mlp_in/bias"], times)
        return self._time_cache[num_steps]


class _InputBlock:
    """A graph's raw inputs as views of one device block (fields in the given order, each 256-byte aligned), and a
    host mirror of the same layout for calls from host memory: numpy views to fill, then the used prefix of the
    block moves in ONE asynchronous copy from pinned memory (the per-tensor path from pageable memory costs a
    synchronous copy per tensor while the GPU waits). On a CPU device the mirror is the block itself."""

    ALIGN = 256

    def __init__(self, device: torch.device, fields: dict):
        self.layout, off = {}, 0
        for name, (shape, dtype) in fields.items():
            nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            self.layout[name] = (off, nbytes, shape, dtype)
            off += -(-nbytes // self.ALIGN) * self.ALIGN
        self.nbytes = off
        self.block = torch.zeros(off, dtype=torch.uint8, device=device)
        self.dev = {name: self._view(self.block, name) for name in fields}
        self.host_block, self.host = None, None

    def _view(self, block: torch.Tensor, name: str) -> torch.Tensor:
        off, nbytes, shape, dtype = self.layout[name]
        return block[off:off + nbytes].view(dtype).view(shape)

    def host_views(self) -> dict[str, np.ndarray]:
        """numpy views of the host mirror (pinned, made on first use; the device block itself on a CPU device)."""
        if self.host is None:
            cuda = self.block.is_cuda
            self.host_block = torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=True) if cuda else self.block
            self.host = {name: self._view(self.host_block, name).numpy() for name in self.layout}
        return self.host

    def offset(self, name: str) -> int:
        return self.layout[name][0]

    def upload(self, nbytes: int):
        """The mirror's first nbytes -> the device block, asynchronously on the current stream (nothing on a CPU
        device). The mirror may be refilled once the stream has passed this copy (a call ends after its graph)."""
        if self.host_block is not self.block:
            self.block[:nbytes].copy_(self.host_block[:nbytes], non_blocking=True)


class _ViewGraph:
    """Static buffers + one CUDA graph of sample_actions for V present cameras and a fixed step count."""

    def __init__(self, eng: "TritonPi0", num_views: int, num_steps: int):
        cfg, dev, dt = eng.cfg, eng.device, eng.dtype
        self.eng, self.V, self.num_steps = eng, num_views, num_steps
        v, p, a = cfg.vision, cfg.prefix, cfg.action
        P, L, S = v.num_patches, cfg.max_token_len, cfg.suffix_len
        self.P, self.L, self.S = P, L, S
        self.T = T = num_views * P + L
        z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=dev)  # noqa: E731
        # inputs: every camera slot (a call with its images on this device stages them in one copy), and which slots
        # are the present views (patch_embed reads through it: absent cameras are never computed). All of them are
        # views of one device block, small ones first, so that a call from host memory moves the present views
        # (packed into slots 0..V-1) and everything else with ONE copy from a pinned mirror (stage_host)
        self._inputs = _InputBlock(dev, dict(
            tokens=((L,), torch.int32), token_mask=((L,), torch.int32), state=((1, cfg.action_dim), torch.float32),
            x_t=((cfg.action_horizon, cfg.action_dim), torch.float32), slot_idx=((num_views,), torch.int32),
            images=((cfg.num_image_slots, v.image_size, v.image_size, 3), torch.float32)))
        self.images, self.slot_idx = self._inputs.dev["images"], self._inputs.dev["slot_idx"]
        self.slot_idx.copy_(torch.arange(num_views, dtype=torch.int32))
        self._slot_idx = {}  # present slots -> the same on the device (copied into slot_idx by a call)
        self.tokens, self.token_mask = self._inputs.dev["tokens"], self._inputs.dev["token_mask"]
        self.zero_prompt = z(L, dtype=torch.int32)  # copied over the unused prompt slots of a shorter prompt
        # positions and key validity: the image part is fixed, the prompt and suffix parts follow token_mask and are
        # computed inside the graph (run), so a call stages only raw inputs and never reads anything back
        VP = num_views * P
        self.key_valid = z(T, dtype=torch.int32)
        self.key_valid[:VP] = 1
        self.pos = z(T + S, dtype=torch.int32)
        self.pos[:VP] = torch.arange(VP, dtype=torch.int32, device=dev)
        self.suffix_pos0 = torch.arange(S, dtype=torch.int32, device=dev) + VP  # + number of valid prompt tokens
        self.prompt_cnt = z(L, dtype=torch.int32)
        self.state = self._inputs.dev["state"]
        self.x_t = self._inputs.dev["x_t"]  # noise in, actions out
        # views of the inputs with a batch dimension of 1 (stage_batch1), made once: on the H100's host every torch
        # call, a view included, costs 10-40 us of Python while the GPU waits (NOTES.md session 9)
        self.b1 = dict(images=self.images[None], tokens=self.tokens[None], token_mask=self.token_mask[None],
                       state=self.state, x_t=self.x_t[None])
        # activations
        M = num_views * P
        self.xv = z(M, v.width)
        self.v_qkv = z(M, 3 * v.width, dtype=dt)
        self.v_o = z(M, v.width, dtype=dt)
        self.v_h = z(M, v.mlp_dim, dtype=dt)
        self.xp = z(T, p.width)
        self.q = z(T, p.num_heads * p.head_dim, dtype=dt)
        self.o = z(T, p.num_heads * p.head_dim, dtype=dt)
        self.hp = z(T, p.mlp_dim, dtype=dt)
        self.kc = z(p.depth, T + S, p.head_dim, dtype=dt)
        self.vc = z(p.depth, T + S, p.head_dim, dtype=dt)
        self.xs = z(S, a.width)
        self.hs = z(S, a.mlp_dim, dtype=dt)
        self.xvn = z(M, v.width, dtype=dt)
        self.tmp_v = z(M, v.width, dtype=dt)
        self.v_parts = {}  # S -> [S, M, width]: the K-parts of o / fc2 (Tuning.vis_res_split), made on first use
        self.head_out = z(M, p.width, dtype=dt)
        self.xpn = z(T, p.width, dtype=dt)
        self.qkv = z(T, (p.num_heads + 2) * p.head_dim, dtype=dt)
        self.tmp_p = z(T, p.width, dtype=dt)
        self.p_parts = {}  # S -> [S, T, width]: the K-parts of the prefix's o / down (Tuning.pre_res_split)
        # gate|up output of the prefix MLP (only without the fused gemm_geglu)
        self.gu = None if self.gu_fused() else z(T, 2 * p.mlp_dim, dtype=dt)
        self.xsn = z(S, a.width, dtype=dt)
        self.tmp_s = z(S, a.width, dtype=dt)
        self.gus = z(S, 2 * a.mlp_dim, dtype=dt)
        self.w1, self.tb = eng.weights.time_weights(num_steps)
        t = eng.tuning
        # skinny path: the residual stream's A-operand copy, its per-tile sums of squares, the time MLP hidden
        assert t.act_stack or t.sk_o[0] == t.sk_down[0], "residual skinny matmuls share BH (norm statistics tiles)"
        self.bh_res = _fit_bh(t.st_res[0] if t.act_stack else t.sk_o[0], a.width // 2)
        self.nss = a.width // (2 * self.bh_res)
        self.xsa = z(S, a.width, dtype=dt)
        self.ss = z(self.nss, S)
        self.ht = z(S - 1, a.width)
        ws = max(t.vis_split * M * v.width, t.pre_split * T * p.width, t.act_split * S * a.width,
                 max(t.act_attn_split, (T + S) // 16 + 1) * p.num_heads * S * (p.head_dim + 2),
                 64 * 2 * a.mlp_dim * max(t.sk_gu[4], t.sk_qkv[4], t.sk_o[4], t.sk_down[4], t.sk_time[4]),
                 PA.workspace_numel(T, p.num_heads, p.head_dim, *(lambda c: (c[:2], c[4]))(t.pre_attn[min(num_views, 3) - 1])))
        self.ws = Workspace(dev, numel=ws, counters=4096)
        self.stack_plan = None
        if t.act_stack and t.act_skinny:
            sa = (t.st_attn1, t.st_attn2, t.st_attn3)[min(num_views, 3) - 1]
            bh_q, bh_g = eng.weights.sk_bh["qkv"], eng.weights.sk_bh["gu"]
            self.stack_plan = AS.StackPlan(a.width, a.mlp_dim, a.num_heads, a.head_dim, T + S, bh_q, bh_g, self.bh_res,
                                           bk_qkv=t.st_qkv[1], bk_gu=t.st_gu[1], bk_o=t.st_res[1], split_o=t.st_res[2],
                                           bk_dn=t.st_res[3], split_dn=t.st_res[4], attn=sa, nprog=t.st_nprog,
                                           stages=t.st_stages, num_warps=t.st_warps, prefetch=t.st_prefetch,
                                           ahead=t.st_ahead, pdl=t.pdl, barrier=t.st_barrier, device=dev)
            n_ws, n_aws = self.stack_plan.workspace_numel()
            self.st_ws, self.st_aws = z(n_ws), z(n_aws)
            self.st_cnt = z(4096, dtype=torch.int32)
            self.st_bars = z(max(1, self.tb.shape[0]), max(256, self.stack_plan.nprog), dtype=torch.int32)
        self.mega = None
        if t.act_skinny and t.act_mega[min(num_views, 3) - 1] and _MegaSteps.fits(cfg, S) and MC.attention_available(dev):
            self.mega = _MegaSteps(eng, T, S)
        self.graph = None
        self.capture_s = None
        self._out_host, self._out_done = None, None  # fetch_actions' pinned output and its event (made on first use)

    def mega0(self) -> bool:
        """Whether flow step 0 runs in the persistent kernel too (Tuning.mega_step0)."""
        return self.mega is not None and self.eng.tuning.mega_step0

    def gu_fused(self) -> bool:
        return bool(self.eng.tuning.pre_gu_fused[min(self.V, 3) - 1])

    def gu_wgmma(self) -> bool:
        """The fused gate/up on kernels/wgmma_geglu.py (Tuning.pre_gu_wgmma; sm_90a only)."""
        return (self.gu_fused() and bool(self.eng.tuning.pre_gu_wgmma[min(self.V, 3) - 1])
                and WGG.available(self.xpn.device))

    def positions(self):
        """Positions of the prompt and suffix tokens and the prompt keys' validity from token_mask (OPENPI_SPEC:
        cumsum(mask) - 1 after the image tokens; the suffix follows the last valid prompt token). Part of run()."""
        VP, T = self.V * self.P, self.T
        torch.cumsum(self.token_mask, 0, dtype=torch.int32, out=self.prompt_cnt)
        torch.add(self.prompt_cnt, VP - 1, out=self.pos[VP:T])
        torch.add(self.suffix_pos0, self.prompt_cnt[-1:], out=self.pos[T:])
        self.key_valid[VP:].copy_(self.token_mask)

    def run(self):
        """Issue the whole inference (eager); the CUDA graph captures exactly this."""
        blas = self.eng.tuning.blas
        if not blas or not self.images.is_cuda:
            return self._run()
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(blas)
        try:
            return self._run()
        finally:
            torch.backends.cuda.preferred_blas_library(before)

    def _run(self):
        cfg, W, t, ws = self.eng.cfg, self.eng.weights, self.eng.tuning, self.ws
        v, p, a = cfg.vision, cfg.prefix, cfg.action
        V, T, S, M = self.V, self.T, self.S, self.V * self.P
        self.gelu_epilogue = t.vis_gelu_epilogue and self.xvn.is_cuda
        pg = t.pdl_glue  # the Triton glue kernels between cuBLAS matmuls (vision, prefix) launch early under PDL
        self.positions()
        # ---- SigLIP on the present views: [V*256, 1152]
        pe = t.vis_patch
        PE.patch_embed(self.images, W.patch_w, W.patch_add, out=self.xv, patch_size=v.patch_size, slots=self.slot_idx,
                       block=pe[:3], num_warps=pe[3], precision=pe[4] if self.images.is_cuda else "ieee")
        bm, bn, bk, nw, ns = t.vis_ln
        rb = t.vis_res
        eps = v.layer_norm_eps
        if t.vis_cublas:
            AN.add_norm(self.xv, self.xvn, norm="layer", eps=eps, pdl=pg, num_warps=t.vis_norm_warps)
            vs = t.vis_res_split[min(self.V, 3) - 1]
            for s in vs:  # made by the eager run before a capture, reused by it
                if s > 1 and s not in self.v_parts:
                    self.v_parts[s] = torch.empty(s, M, v.width, dtype=self.tmp_v.dtype, device=self.tmp_v.device)

            qkv_wgmma = bool(t.vis_qkv_wgmma[min(self.V, 3) - 1]) and len(W.v_qkv_nk) == v.depth

            def project(a, w, s):  # o / fc2: the product (or its s K-parts) that add_norm adds to the residual
                return torch.mm(a, w, out=self.tmp_v) if s == 1 else AN.mm_split_k(a, w, self.v_parts[s])

            for i in range(v.depth):
                if qkv_wgmma:
                    WL.wgmma_linear(self.xvn, W.v_qkv_nk[i], W.v_qkv_b[i], out=self.v_qkv)
                else:
                    torch.addmm(W.v_qkv_bb[i], self.xvn, W.v_qkv_w[i], out=self.v_qkv)
                va = t.vis_attn[min(self.V, 3) - 1]
                VA.vision_attention(self.v_qkv, V, v.num_heads, out=self.v_o, block=va[:2], num_warps=va[2],
                                    num_stages=va[3], pdl=pg, split_d=bool(va[4]), tma=bool(va[5]))
                AN.add_norm(self.xv, self.xvn, project(self.v_o, W.v_o_w[i], vs[0]), W.v_o_b[i], norm="layer", eps=eps, pdl=pg,
                            num_warps=t.vis_norm_warps)
                if self.gelu_epilogue:  # cuBLASLt's GELU epilogue (tanh form on CUDA; tests/test_kernels.py checks)
                    torch._addmm_activation(W.v_fc1_bb[i], self.xvn, W.v_fc1_w[i], use_gelu=True, out=self.v_h)
                else:  # on CPU _addmm_activation's GELU is the erf form, SigLIP uses tanh
                    torch.addmm(W.v_fc1_bb[i], self.xvn, W.v_fc1_w[i], out=self.v_h)
                    torch._C._nn.gelu_(self.v_h, approximate="tanh")
                AN.add_norm(self.xv, self.xvn, project(self.v_h, W.v_fc2_w[i], vs[1]), W.v_fc2_b[i], norm="layer", eps=eps,
                            pdl=pg, num_warps=t.vis_norm_warps)  # last: encoder_norm
            torch.addmm(W.head_bb, self.xvn, W.head_w, out=self.head_out)
            self.xp[:M].copy_(self.head_out)
        else:
            for i in range(v.depth):
                LNL.layernorm_linear(self.xv, W.v_qkv_w[i], W.v_qkv_b[i], out=self.v_qkv, eps=eps,
                                     block=(bm, bn, bk), num_warps=nw, num_stages=ns)
                va = t.vis_attn[min(self.V, 3) - 1]
                VA.vision_attention(self.v_qkv, V, v.num_heads, out=self.v_o, block=va[:2], num_warps=va[2],
                                    num_stages=va[3], split_d=bool(va[4]), tma=bool(va[5]))
                LR.linear_residual(self.v_o, W.v_o_w[i], self.xv, W.v_o_b[i], split_k=t.vis_split, block=rb[:3],
                                   num_warps=rb[3], num_stages=rb[4], workspace=ws)
                LNL.layernorm_linear(self.xv, W.v_fc1_w[i], W.v_fc1_b[i], out=self.v_h, act="gelu", eps=eps,
                                     block=(bm, bn, bk), num_warps=nw, num_stages=ns)
                LR.linear_residual(self.v_h, W.v_fc2_w[i], self.xv, W.v_fc2_b[i], split_k=t.vis_split, block=rb[:3],
                                   num_warps=rb[3], num_stages=rb[4], workspace=ws)
            # encoder_norm + head -> the image rows of the prefix residual stream
            LNL.layernorm_linear(self.xv, W.head_w, W.head_b, out=self.xp[:M], eps=eps,
                                 block=(bm, bn, bk), num_warps=nw, num_stages=ns)
        ET.embed_tokens(self.tokens, W.embedding, out=self.xp[M:])
        # ---- Gemma prefix: KV cache for all 18 layers
        qb, mb, rb = t.pre_qkv, t.pre_mlp, t.pre_res
        ps = t.pre_res_split[min(self.V, 3) - 1]
        AN.add_norm(self.xp, self.xpn, eps=p.rms_eps, pdl=pg, num_warps=t.pre_norm_warps)
        for i in range(p.depth):
            if t.pre_qkv_fused[min(self.V, 3) - 1]:
                qg = t.pre_qkv_g[min(self.V, 3) - 1]
                GRQ.gemm_rope_qkv(self.xpn, W.qkv[0][i], self.pos, W.cos, W.sin, self.q, self.kc[i], self.vc[i], p.num_heads,
                                  p.head_dim, block=qg[:3], num_warps=qg[3], num_stages=qg[4], group_m=qg[5])
            else:
                torch.mm(self.xpn, W.qkv[0][i].t(), out=self.qkv)
                RK.rope_qkv(self.qkv, self.pos, W.cos, W.sin, self.q, self.kc[i], self.vc[i], p.num_heads, p.head_dim,
                            pdl=pg, interleaved=True)
            if i == p.depth - 1:
                break  # the last layer's attention output and MLP feed nothing: only its K/V are used
            pa = t.pre_attn[min(self.V, 3) - 1]
            PA.prefix_attention(self.q, self.kc[i], self.vc[i], self.key_valid, p.num_heads, out=self.o,
                                block=pa[:2], num_warps=pa[2], num_stages=pa[3], pdl=pg, split=pa[4], workspace=ws,
                                tma=len(pa) > 5 and bool(pa[5]))
            AN.add_norm(self.xp, self.xpn, self._prefix_project(self.o, W.o[0][i], ps[0]), eps=p.rms_eps, pdl=pg,
                        num_warps=t.pre_norm_warps)
            if self.gu_wgmma():
                WGG.wgmma_geglu(self.xpn, W.gu[0][i], out=self.hp, stages=t.pre_gu_wgmma_stages, pdl=t.pre_gu_wgmma_pdl)
            elif self.gu_fused():
                gb = t.pre_gu
                GEG.gemm_geglu(self.xpn, W.gu[0][i], out=self.hp, block=gb[:3], num_warps=gb[3], num_stages=gb[4],
                               group_m=gb[5])
            else:
                torch.mm(self.xpn, W.gu[0][i].t(), out=self.gu)
                GG.geglu(self.gu, out=self.hp, pdl=pg, interleaved=True)
            AN.add_norm(self.xp, self.xpn, self._prefix_project(self.hp, W.down[0][i], ps[1]), eps=p.rms_eps, pdl=pg,
                        num_warps=t.pre_norm_warps)
        # ---- action expert: 10 Euler steps over (state, 50 actions)
        # the state token's row (the persistent kernel keeps it last, after the actions: _MegaSteps.xs0)
        state_row = self.mega.xs0[MC.R:] if self.mega0() else self.xs[0:1]
        torch.addmm(W.state_b[None], self.state, W.state_w, out=state_row)
        dt = -1.0 / self.num_steps
        if t.act_skinny:
            self._run_action_skinny(T, dt)
            return
        qb, mb, rb = t.act_qkv, t.act_mlp, t.act_res
        for step in range(self.tb.shape[0]):
            r0 = 0 if step == 0 else 1  # the state token's K/V are computed once, on the first step
            ATM.action_time_mlp(self.x_t, self.w1, self.tb[step], W.time_out_w, W.time_out_b, out=self.xs[1:])
            xs, R = self.xs[r0:], S - r0
            q, o, h = self.q[:R], self.o[:R], self.hs[:R]
            if t.act_cublas:
                xn, qkv, tmp, gu = self.xsn[r0:], self.qkv[:R], self.tmp_s[r0:], self.gus[:R]
                AN.add_norm(xs, xn, eps=a.rms_eps)
            for i in range(a.depth):
                if t.act_cublas:
                    torch.mm(xn, W.qkv[1][i], out=qkv)
                    RK.rope_qkv(qkv, self.pos[T + r0:], W.cos, W.sin, q, self.kc[i, T + r0:], self.vc[i, T + r0:],
                                a.num_heads, a.head_dim)
                else:
                    RQR.rmsnorm_qkv_rope(xs, W.qkv[1][i], self.pos[T + r0:], W.cos, W.sin, q, self.kc[i, T + r0:],
                                         self.vc[i, T + r0:], a.num_heads, a.head_dim, a.rms_eps, block=qb[:3],
                                         num_warps=qb[3], num_stages=qb[4])
                AA.action_attention(q, self.kc[i], self.vc[i], self.key_valid, T, r0, a.num_heads, out=o,
                                    split=t.act_attn_split, block=t.act_attn[:2], num_warps=t.act_attn[2],
                                    num_stages=t.act_attn[3], workspace=ws)
                if t.act_cublas:
                    torch.mm(o, W.o[1][i], out=tmp)
                    AN.add_norm(xs, xn, tmp, eps=a.rms_eps)
                    torch.mm(xn, W.gu[1][i], out=gu)
                    GG.geglu(gu, out=h)
                    torch.mm(h, W.down[1][i], out=tmp)
                    AN.add_norm(xs, xn, tmp, eps=a.rms_eps)
                    continue
                LR.linear_residual(o, W.o[1][i], xs, split_k=t.act_split, block=rb[:3], num_warps=rb[3],
                                   num_stages=rb[4], workspace=ws)
                RG.rmsnorm_geglu(xs, W.gating[1][i], out=h, eps=a.rms_eps, block=mb[:3], num_warps=mb[3], num_stages=mb[4])
                LR.linear_residual(h, W.down[1][i], xs, split_k=t.act_split, block=rb[:3], num_warps=rb[3],
                                   num_stages=rb[4], workspace=ws)
            self._out_euler(dt)

    def _prefix_project(self, a: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
        """The prefix's o / down product (or its K-parts, Tuning.pre_res_split) that add_norm adds to the residual."""
        if splits == 1:
            return torch.mm(a, w, out=self.tmp_p)
        if splits not in self.p_parts:  # made by the eager run before a capture, reused by it
            self.p_parts[splits] = torch.empty(splits, *self.tmp_p.shape, dtype=self.tmp_p.dtype, device=self.tmp_p.device)
        return AN.mm_split_k(a, w, self.p_parts[splits])

    def _out_euler(self, dt: float, xs: torch.Tensor | None = None, zero=()):
        W, t, a = self.eng.weights, self.eng.tuning, self.eng.cfg.action
        c = t.out_euler
        AOE.action_out_euler(self.xs[1:] if xs is None else xs, W.out_w, W.out_b, self.x_t, dt, a.rms_eps, block=c[:2],
                             num_warps=c[2], split=c[3], workspace=self.ws, pdl=t.pdl and t.act_skinny, zero=zero)

    def _run_action_skinny(self, T: int, dt: float):
        """The 10 Euler steps on the weight-streaming skinny matmuls (kernels/skinny_matmul.py): per layer
        qkv+RoPE, attention, o+residual, gate|up+GeGLU, down+residual; the RMSNorms ride in the epilogues."""
        cfg, W, t, ws = self.eng.cfg, self.eng.weights, self.eng.tuning, self.ws
        a, S = cfg.action, self.S
        D, eps, nss = a.width, a.rms_eps, self.nss
        sk = lambda c, bh: dict(block=(64, bh, c[1]), num_warps=c[2], num_stages=c[3], split=c[4], workspace=ws,  # noqa: E731
                               pdl=t.pdl, peel=c[5] if len(c) > 5 else 1)
        bq, bg, br = W.sk_bh["qkv"], W.sk_bh["gu"], self.bh_res
        ca = (t.sk_attn1, t.sk_attn2, t.sk_attn3)[min(self.V, 3) - 1]
        pl = t.attn_preload
        preload = bool(pl[min(self.V, len(pl)) - 1] if isinstance(pl, (tuple, list)) else pl)
        SK.PDL_EARLY, SK.PREFETCH, SK.EARLY_EPI = t.pdl_early, t.prefetch, t.sk_early_epi
        mega, mega0 = self.mega, self.mega0()  # flow steps 1.. / also step 0 (the state token's row last) persistent
        xs_act = mega.xs0[:MC.R] if mega0 else self.xs[1:]  # the action rows' residual stream
        if not mega0:
            SK.prep_rows(self.xs[0:1], self.xsa[0:1], self.ss[:, 0:1])  # the state token's row
        bt = _fit_bh(t.sk_time[0], a.width // 2) if mega0 else br  # the time MLP's half-tile (Tuning.sk_time)
        direct = mega is not None and t.mega_direct  # steps 1..: the time MLP writes the persistent kernel's inputs
        if direct:  # its norm-sum tiles go to the kernel's per-cluster slots: at most one tile per cluster
            bt_d = bt
            while a.width // (2 * bt_d) > mega.ss.shape[1]:
                bt_d *= 2
            ss_tiles = a.width // (2 * bt_d)
        if self.stack_plan is not None:
            self.st_bars.zero_()  # one barrier counter per step launch (a memset node in the graph)
        for step in range(self.tb.shape[0]):
            r0 = 0 if step == 0 else 1
            if direct and step > 0:  # xs_act, the blocked bf16 copy and the first qkv's norm sums (the other slots
                # and the counters were zeroed by the previous step's output projection)
                out = dict(xa=mega.acts["x"], ss_out=mega.ss[0, :ss_tiles], xa_block=MC.A_BLOCK // 2)
                tb = bt_d
            else:
                out, tb = dict(xa=self.xsa[1:], ss_out=self.ss[:a.width // (2 * bt), 1:]), bt
            if t.time_fused:
                SK.skinny_residual(self.x_t, W.sk_time, xs_act, bias=W.time_out_b, store=True,
                                   swish=(self.w1, self.tb[step]), **out, **sk(t.sk_time, tb))
            else:
                SK.swish_in(self.x_t, self.w1, self.tb[step], self.ht)
                SK.skinny_residual(self.ht, W.sk_time, xs_act, bias=W.time_out_b, store=True, **out, **sk(t.sk_time, tb))
            xs, xa, ss, R = self.xs[r0:], self.xsa[r0:], self.ss[:, r0:], S - r0
            q, o, h = self.q[:R], self.o[:R], self.hs[:R]
            if mega is not None and (mega0 or step > 0):  # every layer in one persistent launch
                mk = dict(pdl=t.pdl, pub=t.mega_pub, gelu=t.mega_gelu, pf=t.mega_pf, rcp=t.mega_rcp, spack=t.mega_spack,
                          tail=t.mega_tail, exp=t.mega_exp)
                if step == 0:  # the prefix's keys are final: into the kernel's cache layout; then the actions and the
                    mega.fixed_keys(self.kc, self.vc, self.key_valid)  # state token (its keys: the later fixed keys)
                    mega.step0(self.pos, W.cos, W.sin, eps, **mk)
                else:  # the 50 action rows
                    if step == 1 and not mega0:  # the prefix's and (step 0 on the skinny path) the state token's keys
                        mega.fixed_keys(self.kc, self.vc, self.key_valid, with_state=True)
                    mega.step(xs_act, self.pos[T + 1:], W.cos, W.sin, eps, staged=direct, **mk)
                last = step == self.tb.shape[0] - 1
                self._out_euler(dt, xs_act, zero=(mega.ctr, mega.ss[0, ss_tiles:]) if direct and not last else ())
                continue
            if self.stack_plan is not None:  # every layer of the step in one persistent launch
                AS.action_stack(self.stack_plan, xs, xa, ss, q, o, h, self.kc, self.vc, self.key_valid, self.pos[T + r0:],
                                W.cos, W.sin, W.sk_qkv, W.sk_o, W.sk_gu, W.sk_down, self.st_ws, self.st_cnt, self.st_aws,
                                self.st_bars[step], T, r0, eps)
                self._out_euler(dt)
                continue
            norm = dict(ss_in=ss, nss_in=nss, d_norm=D, eps=eps)
            for i in range(a.depth):
                SK.skinny_qkv_rope(xa, W.sk_qkv[i], self.pos[T + r0:], W.cos, W.sin, q, self.kc[i, T + r0:],
                                   self.vc[i, T + r0:], a.num_heads, a.head_dim, **norm, **sk(t.sk_qkv, bq))
                AA.action_attention(q, self.kc[i], self.vc[i], self.key_valid, T, r0, a.num_heads, out=o, split=ca[4],
                                    block=ca[:2], num_warps=ca[2], num_stages=ca[3], workspace=ws,
                                    pdl=t.pdl, prefetch=t.attn_prefetch, preload=preload,
                                    peel=bool(ca[5]) if len(ca) > 5 else True)
                SK.skinny_residual(o, W.sk_o[i], xs, xa, ss, **sk(t.sk_o, br))
                SK.skinny_geglu(xa, W.sk_gu[i], h, **norm, **sk(t.sk_gu, bg))
                SK.skinny_residual(h, W.sk_down[i], xs, xa, ss, **sk(t.sk_down, br))
            # step 0 on the skinny path before persistent steps: their counters / norm-sum slots start zeroed
            self._out_euler(dt, zero=(mega.ctr, mega.ss[0, ss_tiles:]) if direct else ())

    def capture(self):
        t0 = time.perf_counter()
        s = torch.cuda.Stream(self.eng.device)
        s.wait_stream(torch.cuda.current_stream(self.eng.device))
        with torch.cuda.stream(s):
            self.run()  # compiles every kernel, leaves the counters at 0
        torch.cuda.current_stream(self.eng.device).wait_stream(s)
        torch.cuda.synchronize(self.eng.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.run()
        torch.cuda.synchronize(self.eng.device)
        self.graph = g
        self.capture_s = time.perf_counter() - t0

    def present_index(self, views) -> torch.Tensor:
        """The device copy of a present-slot list (made once per list)."""
        key = tuple(views)
        idx = self._slot_idx.get(key)
        if idx is None:
            idx = self._slot_idx[key] = torch.tensor(key, dtype=torch.int32, device=self.images.device)
        return idx

    def check_inputs(self, images_shape, tokens_shape, token_mask_shape, state_size: int, noise_shape, views=None):
        """The shape checks of set_inputs / stage_host: a clear error instead of a broadcast or a stale slot."""
        L, V = self.L, self.V
        if len(tokens_shape) != 1:
            raise ValueError(f"tokens {tuple(tokens_shape)}: expected one prompt ([L'] token ids)")
        n = tokens_shape[0]
        if n > L:
            raise ValueError(f"{n} prompt tokens: at most {L} fit (max_token_len)")
        if tuple(token_mask_shape) != (n,):
            raise ValueError(f"token_mask {tuple(token_mask_shape)}: expected ({n},) like the tokens")
        frame = tuple(self.images.shape[1:])
        if views is None:
            if tuple(images_shape) != (V,) + frame:  # copy_ would broadcast one image into every view
                raise ValueError(f"camera images {tuple(images_shape)}: this graph takes {(V,) + frame} "
                                 "(present views x H x W x 3)")
        elif len(views) != V or tuple(images_shape[1:]) != frame or max(views) >= images_shape[0] or min(views) < 0:
            raise ValueError(f"camera images {tuple(images_shape)} with present slots {list(views)}: this graph takes "
                             f"{V} present slots of an [slots, {', '.join(map(str, frame))}] array")
        if state_size != self.state.numel() or int(np.prod(noise_shape)) != self.x_t.numel():
            raise ValueError(f"state of {state_size} values / noise {tuple(noise_shape)}: expected "
                             f"{self.state.shape[1]} values and {tuple(self.x_t.shape)}")

    def stage_host(self, images: np.ndarray, views, tokens: np.ndarray, token_mask: np.ndarray, state: np.ndarray,
                   noise: np.ndarray):
        """A call from host memory (numpy): images [slots, 224, 224, 3] with `views` the present slots, which land
        packed in slots 0..V-1; tokens / token_mask [L'], state [32], noise [50, 32]. Everything goes into the pinned
        mirror of the input block and moves to the device in one asynchronous copy (absent cameras are not moved)."""
        self.check_inputs(images.shape, tokens.shape, token_mask.shape, state.size, noise.shape, views=views)
        h, n, V = self._inputs.host_views(), tokens.shape[0], self.V
        h["tokens"][:n], h["tokens"][n:] = tokens, 0
        h["token_mask"][:n], h["token_mask"][n:] = token_mask, 0
        h["state"].reshape(-1)[:] = state.reshape(-1)
        h["x_t"].reshape(-1)[:] = noise.reshape(-1)
        h["slot_idx"][:] = np.arange(V)
        for j, i in enumerate(views):
            h["images"][j] = images[i]
        self._inputs.upload(self._inputs.offset("images") + V * self.images[0].numel() * self.images.element_size())

    def fetch_actions(self) -> np.ndarray:
        """The actions (x_t after the last step) as a new float32 numpy array [50, 32]: on CUDA one asynchronous copy
        into pinned memory and a wait for it (so for the graph)."""
        if not self.x_t.is_cuda:
            return self.x_t.numpy().copy()
        if self._out_host is None:
            self._out_host = torch.empty(self.x_t.shape, dtype=self.x_t.dtype, pin_memory=True)
            self._out_done = torch.cuda.Event()
        self._out_host.copy_(self.x_t, non_blocking=True)
        self._out_done.record()
        self._out_done.synchronize()
        return self._out_host.numpy().copy()

    def set_inputs(self, images, tokens, token_mask, state, noise, views=None):
        """images [V, 224, 224, 3] (present views only), or every camera slot [slots, 224, 224, 3] with `views` the
        present slots' indices; tokens/token_mask [L'], state [32], noise [50, 32]: tensors."""
        L, V = self.L, self.V
        n = tokens.shape[0]
        self.check_inputs(images.shape, tokens.shape, token_mask.shape, state.numel(), noise.shape, views=views)
        # raw inputs only (positions are computed in the graph), all of them in one copy call
        if views is not None and images.shape[0] == self.images.shape[0] and images.device == self.images.device:
            dst, src = [self.images, self.slot_idx], [images, self.present_index(views)]  # every slot, one copy
        else:  # the present slots only (from the host: absent cameras are not transferred), in slots 0..V-1
            views = range(V) if views is None else views
            dst = [self.images[j] for j in range(V)] + [self.slot_idx]
            src = [images[i] for i in views] + [self.present_index(range(V))]
        dst += [self.tokens[:n], self.token_mask[:n], self.state, self.x_t]
        src += [tokens, token_mask, state.reshape(1, -1), noise.reshape(self.x_t.shape)]
        if n < L:
            dst += [self.tokens[n:], self.token_mask[n:]]
            src += [self.zero_prompt[n:], self.zero_prompt[n:]]
        torch._foreach_copy_(dst, src, non_blocking=True)

    def stage_batch1(self, images, tokens, token_mask, state, noise, views) -> bool:
        """The common call in one copy call and no view op: a batch of 1 already on this device, every camera slot,
        a full-length prompt ([1, slots, 224, 224, 3], [1, L], [1, L], [1, 32], [1, 50, 32]). False (nothing staged)
        for anything else, which set_inputs then takes with its checks."""
        b = self.b1
        if not (images.shape == b["images"].shape and tokens.shape == b["tokens"].shape == token_mask.shape
                and state.shape == b["state"].shape and noise.shape == b["x_t"].shape
                and images.device == self.images.device and len(views) == self.V):
            return False
        torch._foreach_copy_([b["images"], b["tokens"], b["token_mask"], b["state"], b["x_t"], self.slot_idx],
                             [images, tokens, token_mask, state, noise, self.present_index(views)], non_blocking=True)
        return True

    def __call__(self):
        if self.graph is None:
            self.run()
        else:
            self.graph.replay()
        return self.x_t


class _MegaSteps:
    """Buffers and calls of the action expert's flow steps 1.. in kernels/mega_chain.py (LAYER + ATTN 2): the 50 action
    rows attend to T + 1 fixed keys (the prefix and the state token, computed by step 0) and to their own."""

    @staticmethod
    def fits(cfg: Pi0Config, S: int) -> bool:
        a = cfg.action
        return (a.width, a.mlp_dim, a.num_heads, a.head_dim, S - 1) == (1024, 4096, 8, 256, MC.R)

    def __init__(self, eng: "TritonPi0", T: int, S: int):
        a, dev, bf = eng.cfg.action, eng.device, eng.dtype
        if not self.fits(eng.cfg, S):
            raise ValueError("act_mega: kernels/mega_chain.py is built for the full-size action expert (width 1024, "
                             f"MLP 4096, 8 heads of 256, 50 actions); this variant has {a}")
        self.plan, self.prepared = eng.weights.mega(eng.tuning.mega_pair)
        self.L, self.Tp, self.T = a.depth, T, T + 1  # the prefix's keys; steps 1.. also have the state token's
        self.attn = eng.tuning.mega_attn
        rows = MC.kv_rows(self.T, MC.R, self.attn)  # zero rows past the keys: a 16-key sub-block is one bulk copy
        self.kc = torch.zeros(self.L, rows, a.head_dim, dtype=bf, device=dev)
        self.vc = torch.zeros_like(self.kc)
        self.key_valid = torch.zeros(self.T + MC.R + 16, dtype=torch.int32, device=dev)
        self.key_valid[self.T - 1:self.T + MC.R] = 1  # the state token and the 50 actions
        cols = dict(x=1024, q=2560, x2=1024, h8=4096)
        self.acts = {k: torch.zeros(MC.blocked_size(c), dtype=bf, device=dev) for k, c in cols.items()}
        self.att = torch.zeros(MC.blocked_size(2048), dtype=bf, device=dev)
        self.ss = torch.zeros(2, self.plan.programs // 4, MC.R, device=dev)
        self.ctr = torch.zeros(self.L * 128, dtype=torch.int32, device=dev)
        # flow step 0: the 50 actions' residual stream (every step's; rows 0..49), then the state token's (row 50),
        # its norm sums, and the RoPE positions in that row order (the engine's pos has the state token first)
        self.xs0 = torch.zeros(MC.R + 1, a.width, device=dev)
        self.ss0 = torch.zeros(2, self.plan.programs // 4, MC.ss_stride(MC.R + 1), device=dev)
        self.pos0 = torch.zeros(MC.R + 1, dtype=torch.int32, device=dev)
        self.pos0_idx = torch.cat([torch.arange(T + 1, T + 1 + MC.R), torch.tensor([T])]).to(dev)

    def fixed_keys(self, kc: torch.Tensor, vc: torch.Tensor, key_valid: torch.Tensor, with_state: bool = False):
        """The prefix's keys: the engine's caches [L, >= Tp, 256] (row-major) -> the kernel's (kv_swizzle), with
        their validity. Flow step 0 (step0) then writes the state token's at Tp (steps 1..'s last fixed key);
        with_state: step 0 ran on the skinny path, so the state token's keys come from the engine's caches too."""
        MC.stage_fixed_keys(kc, vc, key_valid, self.kc, self.vc, self.key_valid, self.T if with_state else self.Tp,
                            valid=self.Tp, attn=self.attn)

    def step0(self, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, pdl: bool = True, **variant):
        """Flow step 0 over xs0 (the actions' rows and the state token's, fp32, updated in place); pos: the engine's
        positions [T + 51] (the state token's at T)."""
        torch.index_select(pos, 0, self.pos0_idx, out=self.pos0)
        MC.stage_step_input(self.xs0, self.acts["x"], self.ss0, self.ctr, pdl=pdl)
        st = dict(xs=self.xs0, ss=self.ss0, pos=self.pos0, cos=cos, sin=sin, eps=eps, T=self.Tp, kc=self.kc, vc=self.vc,
                  key_valid=self.key_valid, att=self.att, attn_mode=self.attn, state=True)
        MC.mega_chain(self.plan, self.prepared, self.acts, self.ctr, self.L, layer_state=st, pdl=pdl,
                      zero_counters=False, **variant)

    def step(self, xs: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
             pdl: bool = True, pub: int = MC.PUB, gelu: int = MC.GELU, pf: int = MC.PF, rcp: int = MC.RCP,
             spack: int = MC.SPACK, tail: int = MC.TAIL, staged: bool = False, exp: int = MC.EXP):
        """One flow step over the residual xs [50, 1024] (fp32, updated in place) at RoPE positions pos [50]; pdl:
        both launches early (programmatic dependent launch: the kernel's weight stream starts before its inputs).
        staged: acts["x"] and ss[0] already hold the step's input and the counters are zero (Tuning.mega_direct);
        else stage_step_input makes them from xs."""
        if not staged:
            MC.stage_step_input(xs, self.acts["x"], self.ss, self.ctr, pdl=pdl)
        st = dict(xs=xs, ss=self.ss, pos=pos[:MC.R], cos=cos, sin=sin, eps=eps, T=self.T, kc=self.kc, vc=self.vc,
                  key_valid=self.key_valid, att=self.att, attn_mode=self.attn)
        MC.mega_chain(self.plan, self.prepared, self.acts, self.ctr, self.L, layer_state=st, pdl=pdl,
                      zero_counters=False, pub=pub, gelu=gelu, pf=pf, rcp=rcp, spack=spack, tail=tail, exp=exp)


class TritonPi0:
    """The `triton` backend. Same call as `TorchPi0`; needs a CUDA device."""

    backend_name = "triton"

    def __init__(self, cfg: Pi0Config, params: dict[str, torch.Tensor], device="cuda", dtype=torch.bfloat16,
                 use_graphs: bool = True, tuning: Tuning | None = None):
        """`tuning`: launch shapes and path switches; $PI0_TUNING (a JSON object of Tuning fields) overrides the default."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.use_graphs = use_graphs
        self.tuning = tuning or Tuning.from_env()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.weights = EngineWeights(cfg, params, self.device, dtype, self.tuning)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.load_s = time.perf_counter() - t0
        self._graphs: dict[tuple[int, int], _ViewGraph] = {}

    def graph_for(self, num_views: int, num_steps: int = 10) -> _ViewGraph:
        if not 1 <= num_views <= self.cfg.num_image_slots:
            raise ValueError(f"{num_views} cameras present: need 1..{self.cfg.num_image_slots} (image_mask has no True slot?)")
        key = (num_views, num_steps)
        if key not in self._graphs:
            g = _ViewGraph(self, num_views, num_steps)
            if self.use_graphs:
                g.capture()
            self._graphs[key] = g
        return self._graphs[key]

    def warmup(self, views=(1, 2, 3), num_steps: int = 10) -> dict[int, float]:
        """Build and capture the graphs up front; returns seconds per view count."""
        return {v: self.graph_for(v, num_steps).capture_s or 0.0 for v in views}

    @torch.no_grad()
    def sample_actions_torch(self, images, image_mask, tokens, token_mask, state, noise, num_steps: int = 10) -> torch.Tensor:
        """Batched tensors as `TorchPi0.sample_actions_torch`: images [B,3,224,224,3], image_mask [B,3], tokens and
        token_mask [B,L], state [B,32], noise [B,50,32] -> actions [B,50,32] float32 on this device."""
        if state.shape[0] == 1 and all(isinstance(x, torch.Tensor) for x in (images, tokens, token_mask, state, noise)):
            present = [i for i, on in enumerate(torch.as_tensor(image_mask).tolist()[0]) if on]  # the one host read
            g = self._graphs.get((len(present), num_steps)) or self.graph_for(len(present), num_steps)
            if g.stage_batch1(images, tokens, token_mask, state, noise, present):
                g()
                return g.b1["x_t"].clone()
        outs = []
        for b in range(state.shape[0]):
            present = [i for i, on in enumerate(torch.as_tensor(image_mask[b]).tolist()) if on]  # the one host read
            g = self.graph_for(len(present), num_steps)
            g.set_inputs(torch.as_tensor(images[b]), torch.as_tensor(tokens[b]), torch.as_tensor(token_mask[b]),
                         torch.as_tensor(state[b]), torch.as_tensor(noise[b]), views=present)
            outs.append(g().clone())
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)

    def sample_actions(self, images, image_mask, tokens, token_mask, state, noise, num_steps: int = 10) -> np.ndarray:
        """The backend call (numpy in, numpy out); a leading batch dimension is optional. One observation (what the
        policy server sends) goes through the graph's pinned input mirror: one host-to-device copy, one back."""
        batched = np.ndim(state) == 2
        args = [np.asarray(x) for x in (images, image_mask, tokens, token_mask, state, noise)]
        if self.tuning.host_staging and (not batched or args[4].shape[0] == 1):
            one = [x[0] for x in args] if batched else args
            if one[1].ndim != 1:
                raise ValueError(f"image_mask {one[1].shape}: expected one flag per camera slot")
            present = np.flatnonzero(one[1]).tolist()
            g = self.graph_for(len(present), num_steps)
            g.stage_host(one[0], present, one[2], one[3], one[4], one[5])
            g()
            out = g.fetch_actions()
            return out[None] if batched else out
        if not batched:
            args = [x[None] for x in args]
        args = [torch.from_numpy(np.ascontiguousarray(x)) for x in args]
        args[0] = args[0].float()
        out = self.sample_actions_torch(*args, num_steps=num_steps).cpu().numpy()
        return out if batched else out[0]


class Pi0Inference:
    """realtime-vla's low-level face: a fixed number of views, static buffers, one graph.

    infer(observation_images [V,224,224,3], observation_state [32], diffusion_noise [50,32], tokens=None,
          token_mask=None) -> {'action_output': [50, 32] float32 tensor, 'elapsed': milliseconds}
    `tokens` defaults to the BOS token alone.
    """

    def __init__(self, num_views: int, params: dict[str, torch.Tensor] | None = None, cfg: Pi0Config | None = None,
                 device="cuda", engine: TritonPi0 | None = None, num_steps: int = 10):
        from pi0_triton_policy.config import get_variant

        if engine is None:
            cfg = cfg or get_variant("pi0")
            if params is None:
                raise ValueError("Pi0Inference needs params (canonical OpenPI weights, see weights.py) or an engine")
            engine = TritonPi0(cfg, params, device=device)
        self.engine, self.num_views = engine, num_views
        self.graph = engine.graph_for(num_views, num_steps)

    @torch.no_grad()
    def infer(self, observation_images, observation_state, diffusion_noise, tokens=None, token_mask=None) -> dict:
        if tokens is None:
            tokens = torch.tensor([2], dtype=torch.int32)  # <bos>
        if token_mask is None:
            token_mask = torch.ones(len(tokens), dtype=torch.bool)
        dev = self.engine.device
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.set_inputs(torch.as_tensor(observation_images), torch.as_tensor(tokens), torch.as_tensor(token_mask),
                              torch.as_tensor(observation_state), torch.as_tensor(diffusion_noise))
        out = self.graph().clone()
        end.record()
        torch.cuda.synchronize(dev)
        return {"action_output": out, "elapsed": start.elapsed_time(end)}
