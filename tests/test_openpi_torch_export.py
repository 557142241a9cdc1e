"""OpenPI's PyTorch export (model.safetensors + config.json) <-> canonical weights.

Where the facts checked here come from (OpenPI = github.com/Physical-Intelligence/openpi):
  [S] examples/convert_jax_model_to_pytorch.py: the key names, transposes and reshapes, config.json's keys,
      save through `safetensors.torch.save_model(pi0_model, ...)`.
  [M] src/openpi/models_pytorch/pi0_pytorch.py: PI0Pytorch's top-level Linears
      (action_in_proj = Linear(32, w), action_out_proj = Linear(w, 32), state_proj = Linear(32, w),
      action_time_mlp_in = Linear(2w, w), action_time_mlp_out = Linear(w, w)); loading via
      `safetensors.torch.load_model(model, path)` (models/model.py load_pytorch).
  [G] src/openpi/models_pytorch/gemma_pytorch.py: PaliGemmaForConditionalGeneration + GemmaForCausalLM expert,
      `gemma_expert.model.embed_tokens = None`.
  [H] src/openpi/models_pytorch/transformers_replace/models/gemma/modeling_gemma.py: q_proj = Linear(D, N*H),
      k/v_proj = Linear(D, K*H), o_proj = Linear(N*H, D), gate/up = Linear(D, F), down = Linear(F, D);
      GemmaRMSNorm multiplies by (1 + weight), weight initialised to zeros.
  [P] the published key list of an OpenPI export (lerobot/pi05_base, 812 tensors): the tied embedding is
      stored as `paligemma.lm_head.weight` (no `embed_tokens`), `gemma_expert.lm_head.weight` is present.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pi0_triton_policy import openpi_torch_export as X
from pi0_triton_policy import weights as W
from pi0_triton_policy.config import get_variant

PWE = "paligemma_with_expert"
VIS = f"{PWE}.paligemma.model.vision_tower.vision_model"
LM = f"{PWE}.paligemma.model.language_model"
EXP = f"{PWE}.gemma_expert.model"


@pytest.fixture(scope="module")
def cfg():
    return get_variant("pi0_tiny")


@pytest.fixture(scope="module")
def params(cfg):
    return W.random_params(cfg, seed=3)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, params, cfg):
    d = tmp_path_factory.mktemp("openpi_export")
    X.write_openpi_pytorch_export(params, cfg, d)
    return d


@pytest.fixture(scope="module")
def exported(export_dir):
    return load_file(str(export_dir / "model.safetensors"))


def _rewrite(tmp_path, state: dict, config: dict | None = None):
    """A new export directory holding `state` (and the given or a default config.json)."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    config = config or {"action_dim": 32, "action_horizon": 50, "paligemma_variant": "dummy",
                        "action_expert_variant": "dummy", "precision": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(params, cfg, export_dir):
    back = X.read_openpi_pytorch_export(export_dir)
    assert set(back) == set(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and back[k].shape == params[k].shape, k
        assert torch.equal(back[k], params[k]), k
    assert W.infer_variant({k: tuple(v.shape) for k, v in back.items()}).name == "pi0_tiny"
    W.check_shapes(cfg, {k: tuple(v.shape) for k, v in back.items()})


def test_round_trip_bfloat16(params, cfg, tmp_path):
    bf = {k: v.to(torch.bfloat16) for k, v in params.items()}
    X.write_openpi_pytorch_export(params, cfg, tmp_path, precision="bfloat16", include_expert_lm_head=False)
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "bfloat16"
    back = X.read_openpi_pytorch_export(tmp_path)
    for k in bf:
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], bf[k]), k


def test_detection(export_dir, params, cfg, tmp_path):
    assert X.is_openpi_pytorch_export(export_dir)
    W.save_weights(tmp_path / "canonical", params, cfg, source="test")  # our own format: not an export
    (tmp_path / "canonical" / "config.json").write_text("{}")
    assert not X.is_openpi_pytorch_export(tmp_path / "canonical")
    assert not X.is_openpi_pytorch_export(tmp_path / "nowhere")
    assert not X.is_openpi_pytorch_export(export_dir / "model.safetensors")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "broken" / "config.json").write_text("{}")
    assert not X.is_openpi_pytorch_export(tmp_path / "broken")


# ---------------------------------------------------------------------------------------------
# Names and shapes, against what OpenPI's torch model expects
# ---------------------------------------------------------------------------------------------


def test_full_pi0_names_and_shapes():
    s = X.export_shapes(get_variant("pi0"))
    # [S] hardcodes PaliGemma's vision_config (1152 wide, 27 layers, 16 heads, mlp 4304, patch 14,
    # projection 2048) and text_config (2048 wide, 18 layers, 8 heads, head_dim 256, mlp 16384); expert gemma_300m.
    want = {
        f"{VIS}.embeddings.patch_embedding.weight": (1152, 3, 14, 14),  # [S] kernel.transpose(3, 2, 0, 1)
        f"{VIS}.embeddings.position_embedding.weight": (256, 1152),  # [S] reshape(-1, hidden_size)
        f"{VIS}.encoder.layers.26.self_attn.q_proj.weight": (1152, 1152),
        f"{VIS}.encoder.layers.26.self_attn.q_proj.bias": (1152,),
        f"{VIS}.encoder.layers.0.self_attn.out_proj.weight": (1152, 1152),
        f"{VIS}.encoder.layers.0.mlp.fc1.weight": (4304, 1152),  # [S] Dense_0 kernel.T
        f"{VIS}.encoder.layers.0.mlp.fc2.weight": (1152, 4304),
        f"{VIS}.encoder.layers.0.layer_norm1.weight": (1152,),  # [S] LayerNorm_0 -> layer_norm1
        f"{VIS}.post_layernorm.weight": (1152,),  # [S] encoder_norm
        f"{PWE}.paligemma.model.multi_modal_projector.linear.weight": (2048, 1152),  # [S] head kernel.T
        f"{PWE}.paligemma.lm_head.weight": (257152, 2048),  # [P] the tied embedding's saved name
        f"{LM}.layers.17.self_attn.q_proj.weight": (2048, 2048),  # [H] Linear(D, N*H)
        f"{LM}.layers.0.self_attn.k_proj.weight": (256, 2048),  # [H] Linear(D, K*H), K = 1
        f"{LM}.layers.0.self_attn.v_proj.weight": (256, 2048),
        f"{LM}.layers.0.self_attn.o_proj.weight": (2048, 2048),
        f"{LM}.layers.0.mlp.gate_proj.weight": (16384, 2048),
        f"{LM}.layers.0.mlp.down_proj.weight": (2048, 16384),
        f"{LM}.layers.0.input_layernorm.weight": (2048,),  # [S] pre_attention_norm
        f"{LM}.layers.0.post_attention_layernorm.weight": (2048,),  # [S] pre_ffw_norm
        f"{LM}.norm.weight": (2048,),
        f"{EXP}.layers.17.self_attn.q_proj.weight": (2048, 1024),
        f"{EXP}.layers.0.self_attn.k_proj.weight": (256, 1024),
        f"{EXP}.layers.0.self_attn.o_proj.weight": (1024, 2048),  # [S] reshape(N*H, D).transpose(1, 0)
        f"{EXP}.layers.0.mlp.up_proj.weight": (4096, 1024),
        f"{EXP}.norm.weight": (1024,),
        f"{PWE}.gemma_expert.lm_head.weight": (257152, 1024),  # [P] present; [G] expert has no embed_tokens
        "state_proj.weight": (1024, 32),  # [M] Linear(32, w)
        "action_in_proj.weight": (1024, 32),
        "action_out_proj.weight": (32, 1024),  # [M] Linear(w, 32)
        "action_time_mlp_in.weight": (1024, 2048),  # [M] Linear(2w, w)
        "action_time_mlp_out.bias": (1024,),
    }
    for k, shape in want.items():
        assert s.get(k) == shape, (k, s.get(k), shape)
    assert f"{LM}.embed_tokens.weight" not in s and f"{EXP}.embed_tokens.weight" not in s
    assert not any("layers.27." in k for k in s) and not any(k.startswith(f"{LM}.layers.18.") for k in s)
    # [P] pi05_base holds 812 tensors; Pi0 drops time_mlp_{in,out} (4) and the 4 adaRMS dense tensors per expert
    # layer + 2 for its final norm, and adds state_proj + action_time_mlp_{in,out} (6) and 2 + 1 RMSNorm weights.
    assert len(s) == 812 - 4 - (18 * 4 + 2) + 6 + (18 * 2 + 1) == 777


# The pi05_base key patterns [P] that a Pi0 export shares (everything but the adaRMS expert norms and time MLP).
_PI05_BASE_SHARED_PATTERNS = [
    "action_in_proj.bias", "action_in_proj.weight", "action_out_proj.bias", "action_out_proj.weight",
    f"{PWE}.gemma_expert.lm_head.weight",
    *(f"{EXP}.layers.N.{s}" for s in ("mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                      "self_attn.k_proj.weight", "self_attn.o_proj.weight",
                                      "self_attn.q_proj.weight", "self_attn.v_proj.weight")),
    f"{PWE}.paligemma.lm_head.weight",
    *(f"{LM}.layers.N.{s}" for s in ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
                                     "mlp.up_proj.weight", "post_attention_layernorm.weight",
                                     "self_attn.k_proj.weight", "self_attn.o_proj.weight",
                                     "self_attn.q_proj.weight", "self_attn.v_proj.weight")),
    f"{LM}.norm.weight",
    f"{PWE}.paligemma.model.multi_modal_projector.linear.bias",
    f"{PWE}.paligemma.model.multi_modal_projector.linear.weight",
    f"{VIS}.embeddings.patch_embedding.bias", f"{VIS}.embeddings.patch_embedding.weight",
    f"{VIS}.embeddings.position_embedding.weight",
    *(f"{VIS}.encoder.layers.N.{s}" for s in (
        "layer_norm1.bias", "layer_norm1.weight", "layer_norm2.bias", "layer_norm2.weight", "mlp.fc1.bias",
        "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight", "self_attn.k_proj.bias", "self_attn.k_proj.weight",
        "self_attn.out_proj.bias", "self_attn.out_proj.weight", "self_attn.q_proj.bias",
        "self_attn.q_proj.weight", "self_attn.v_proj.bias", "self_attn.v_proj.weight")),
    f"{VIS}.post_layernorm.bias", f"{VIS}.post_layernorm.weight",
]


def test_names_match_published_export_patterns():
    import re

    pats = {re.sub(r"\.\d+\.", ".N.", k) for k in X.export_shapes(get_variant("pi0"))}
    pi0_only = {"state_proj.weight", "state_proj.bias", "action_time_mlp_in.weight", "action_time_mlp_in.bias",
                "action_time_mlp_out.weight", "action_time_mlp_out.bias", f"{EXP}.norm.weight",
                f"{EXP}.layers.N.input_layernorm.weight", f"{EXP}.layers.N.post_attention_layernorm.weight"}
    assert pats == set(_PI05_BASE_SHARED_PATTERNS) | pi0_only


def test_file_layout(export_dir, exported, cfg):
    assert set(exported) == set(X.export_shapes(cfg))
    for k, shape in X.export_shapes(cfg).items():
        assert tuple(exported[k].shape) == shape, k
    # save_model's dedup record of the tied embedding: {dropped name: kept name}.
    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as sf:
        assert sf.metadata()[f"{LM}.embed_tokens.weight"] == f"{PWE}.paligemma.lm_head.weight"
    # [S] config.json holds exactly these five entries.
    assert json.loads((export_dir / "config.json").read_text()) == {
        "action_dim": 32, "action_horizon": 50, "paligemma_variant": "dummy", "action_expert_variant": "dummy",
        "precision": "float32",
    }
    assert X.read_openpi_pytorch_config(export_dir)["paligemma_variant"] == "dummy"


def test_matches_openpi_script_expressions(params, exported, cfg):
    """The export equals OpenPI's script's numpy expressions [S] applied to the canonical tensors."""
    n = {k: v.numpy() for k, v in params.items()}
    e = {k: v.numpy() for k, v in exported.items()}
    v, g = cfg.vision, cfg.prefix
    img, blk = "PaliGemma/img", "PaliGemma/img/Transformer/encoderblock"
    att = f"{blk}/MultiHeadDotProductAttention_0"
    lay = "PaliGemma/llm/layers"
    eq = np.testing.assert_array_equal
    eq(e[f"{VIS}.embeddings.patch_embedding.weight"], n[f"{img}/embedding/kernel"].transpose(3, 2, 0, 1))
    eq(e[f"{VIS}.embeddings.position_embedding.weight"], n[f"{img}/pos_embedding"].reshape(-1, v.width))
    for i in range(v.depth):
        pre = f"{VIS}.encoder.layers.{i}"
        eq(e[f"{pre}.layer_norm1.weight"], n[f"{blk}/LayerNorm_0/scale"][i])
        eq(e[f"{pre}.layer_norm2.bias"], n[f"{blk}/LayerNorm_1/bias"][i])
        eq(e[f"{pre}.mlp.fc1.weight"], n[f"{blk}/MlpBlock_0/Dense_0/kernel"][i].transpose())
        eq(e[f"{pre}.mlp.fc2.weight"], n[f"{blk}/MlpBlock_0/Dense_1/kernel"][i].transpose())
        for c, t in (("query", "q"), ("key", "k"), ("value", "v")):
            eq(e[f"{pre}.self_attn.{t}_proj.weight"], n[f"{att}/{c}/kernel"][i].reshape(-1, v.width).transpose())
            eq(e[f"{pre}.self_attn.{t}_proj.bias"], n[f"{att}/{c}/bias"][i].reshape(-1, v.width).reshape(-1))
        eq(e[f"{pre}.self_attn.out_proj.weight"], n[f"{att}/out/kernel"][i].reshape(-1, v.width).transpose())
    eq(e[f"{PWE}.paligemma.model.multi_modal_projector.linear.weight"], n[f"{img}/head/kernel"].transpose())
    eq(e[f"{PWE}.paligemma.lm_head.weight"], n["PaliGemma/llm/embedder/input_embedding"])
    for sfx, pre in (("", LM), ("_1", EXP)):
        for i in range(g.depth):
            q, kv = n[f"{lay}/attn/q_einsum{sfx}/w"][i], n[f"{lay}/attn/kv_einsum{sfx}/w"]
            eq(e[f"{pre}.layers.{i}.self_attn.q_proj.weight"], q.transpose(0, 2, 1).reshape(g.num_heads * g.head_dim, g.width))
            eq(e[f"{pre}.layers.{i}.self_attn.k_proj.weight"], kv[i, 0, 0].transpose())
            eq(e[f"{pre}.layers.{i}.self_attn.v_proj.weight"], kv[i, 1, 0].transpose())
            # The expert's o_proj expression (general); see test_paligemma_o_proj_expression for the other.
            o = n[f"{lay}/attn/attn_vec_einsum{sfx}/w"][i]
            eq(e[f"{pre}.layers.{i}.self_attn.o_proj.weight"], o.reshape(g.num_heads * g.head_dim, g.width).transpose(1, 0))
            gate = n[f"{lay}/mlp{sfx}/gating_einsum"]
            eq(e[f"{pre}.layers.{i}.mlp.gate_proj.weight"], gate[i, 0].transpose())
            eq(e[f"{pre}.layers.{i}.mlp.up_proj.weight"], gate[i, 1].transpose())
            eq(e[f"{pre}.layers.{i}.mlp.down_proj.weight"], n[f"{lay}/mlp{sfx}/linear"][i].transpose())
            # RMSNorm scales copied as is ([H]: (1 + weight) in torch, (1 + scale) in JAX).
            eq(e[f"{pre}.layers.{i}.input_layernorm.weight"], n[f"{lay}/pre_attention_norm{sfx}/scale"][i])
            eq(e[f"{pre}.layers.{i}.post_attention_layernorm.weight"], n[f"{lay}/pre_ffw_norm{sfx}/scale"][i])
        eq(e[f"{pre}.norm.weight"], n[f"PaliGemma/llm/final_norm{sfx}/scale"])
    for name in X.TOP_LEVEL:  # [S] torch.from_numpy(weight).T
        eq(e[f"{name}.weight"], n[f"{name}/kernel"].T)
        eq(e[f"{name}.bias"], n[f"{name}/bias"])


def test_paligemma_o_proj_expression():
    """[S] writes PaliGemma's o_proj as w.transpose(2, 0, 1).reshape(N*H, D); for gemma_2b (N*H == D) that is
    the same tensor as our w.reshape(N*H, D).T (the expert's expression)."""
    N, H = 8, 8
    D = N * H  # square, as gemma_2b: 8 * 256 == 2048
    w = np.random.default_rng(0).standard_normal((N, H, D)).astype(np.float32)
    script = w.transpose(2, 0, 1).reshape(N * H, D)
    np.testing.assert_array_equal(script, w.reshape(N * H, D).T)


# ---------------------------------------------------------------------------------------------
# Semantics: torch modules with the exported weights compute what the canonical einsums compute
# ---------------------------------------------------------------------------------------------


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sfx,pre", [("", LM), ("_1", EXP)])
def test_gemma_layer_semantics(params, exported, cfg, sfx, pre):
    g = cfg.prefix if sfx == "" else cfg.action
    lay, i = "PaliGemma/llm/layers", 1
    x = torch.randn(2, 5, g.width, generator=torch.Generator().manual_seed(1))
    ex = lambda name: exported[f"{pre}.layers.{i}.{name}.weight"]  # noqa: E731

    def heads(y, n):  # HF: view(*shape, -1, head_dim)
        return y.view(2, 5, n, g.head_dim)

    q = torch.einsum("btd,ndh->btnh", x, params[f"{lay}/attn/q_einsum{sfx}/w"][i])
    _close(heads(F.linear(x, ex("self_attn.q_proj")), g.num_heads), q)
    kv = torch.einsum("bsd,ckdh->cbskh", x, params[f"{lay}/attn/kv_einsum{sfx}/w"][i])
    _close(heads(F.linear(x, ex("self_attn.k_proj")), g.num_kv_heads), kv[0])
    _close(heads(F.linear(x, ex("self_attn.v_proj")), g.num_kv_heads), kv[1])
    enc = torch.randn(2, 5, g.num_heads, g.head_dim, generator=torch.Generator().manual_seed(2))
    o = torch.einsum("btnh,nhd->btd", enc, params[f"{lay}/attn/attn_vec_einsum{sfx}/w"][i])
    _close(F.linear(enc.reshape(2, 5, -1), ex("self_attn.o_proj")), o)  # HF: reshape(*shape, -1) then o_proj
    gating = params[f"{lay}/mlp{sfx}/gating_einsum"][i]
    act = F.gelu(x @ gating[0], approximate="tanh") * (x @ gating[1])
    ref = act @ params[f"{lay}/mlp{sfx}/linear"][i]
    hf = F.linear(F.gelu(F.linear(x, ex("mlp.gate_proj")), approximate="tanh") * F.linear(x, ex("mlp.up_proj")),
                  ex("mlp.down_proj"))  # [H] GemmaMLP: down(act(gate(x)) * up(x))
    _close(hf, ref)
    # RMSNorm: JAX x * (1 + scale) vs HF x * (1 + weight) with the stored weight.
    s = params[f"{lay}/pre_attention_norm{sfx}/scale"][i]
    _close(1 + ex("input_layernorm"), 1 + s)


def test_siglip_semantics(params, exported, cfg):
    v = cfg.vision
    img, blk = "PaliGemma/img", "PaliGemma/img/Transformer/encoderblock"
    att = f"{blk}/MultiHeadDotProductAttention_0"
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(2, v.image_size, v.image_size, 3, generator=gen) * 2 - 1  # NHWC, as OpenPI
    # Canonical: stride-patch matmul over flattened (row, col, channel) patches (= JAX conv with HWIO kernel).
    ps, gsz = v.patch_size, v.image_size // v.patch_size
    patches = images.reshape(2, gsz, ps, gsz, ps, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, gsz * gsz, ps * ps * 3)
    ref = patches @ params[f"{img}/embedding/kernel"].reshape(-1, v.width) + params[f"{img}/embedding/bias"]
    # HF SiglipVisionEmbeddings: Conv2d(3, W, k=ps, stride=ps) on NCHW, then flatten(2).transpose(1, 2).
    conv = F.conv2d(images.permute(0, 3, 1, 2), exported[f"{VIS}.embeddings.patch_embedding.weight"],
                    exported[f"{VIS}.embeddings.patch_embedding.bias"], stride=ps)
    _close(conv.flatten(2).transpose(1, 2), ref)
    pos = exported[f"{VIS}.embeddings.position_embedding.weight"]  # nn.Embedding over patch positions
    _close(pos[torch.arange(v.num_patches)][None], params[f"{img}/pos_embedding"])

    i = 1
    x = torch.randn(2, 7, v.width, generator=gen)
    pre = f"{VIS}.encoder.layers.{i}.self_attn"
    for c, t in (("query", "q"), ("key", "k"), ("value", "v")):
        want = torch.einsum("msd,dnh->msnh", x, params[f"{att}/{c}/kernel"][i]) + params[f"{att}/{c}/bias"][i]
        got = F.linear(x, exported[f"{pre}.{t}_proj.weight"], exported[f"{pre}.{t}_proj.bias"])
        _close(got.view(2, 7, v.num_heads, v.head_dim), want)
    o = torch.randn(2, 7, v.num_heads, v.head_dim, generator=gen)
    want = torch.einsum("msnh,nhd->msd", o, params[f"{att}/out/kernel"][i]) + params[f"{att}/out/bias"][i]
    _close(F.linear(o.reshape(2, 7, -1), exported[f"{pre}.out_proj.weight"], exported[f"{pre}.out_proj.bias"]), want)
    mlp = f"{VIS}.encoder.layers.{i}.mlp"
    want = x @ params[f"{blk}/MlpBlock_0/Dense_0/kernel"][i] + params[f"{blk}/MlpBlock_0/Dense_0/bias"][i]
    _close(F.linear(x, exported[f"{mlp}.fc1.weight"], exported[f"{mlp}.fc1.bias"]), want)
    ln = f"{VIS}.encoder.layers.{i}.layer_norm1"
    want = F.layer_norm(x, (v.width,), params[f"{blk}/LayerNorm_0/scale"][i], params[f"{blk}/LayerNorm_0/bias"][i])
    _close(F.layer_norm(x, (v.width,), exported[f"{ln}.weight"], exported[f"{ln}.bias"]), want)
    proj = f"{PWE}.paligemma.model.multi_modal_projector.linear"
    _close(F.linear(x, exported[f"{proj}.weight"], exported[f"{proj}.bias"]),
           x @ params[f"{img}/head/kernel"] + params[f"{img}/head/bias"])


def test_embedding_and_projections_semantics(params, exported, cfg):
    tokens = torch.tensor([[0, 5, 257151]])
    emb = exported[f"{PWE}.paligemma.lm_head.weight"]
    _close(F.embedding(tokens, emb) * math.sqrt(cfg.prefix.width),
           params["PaliGemma/llm/embedder/input_embedding"][tokens] * math.sqrt(cfg.prefix.width))
    x = torch.randn(3, 2 * cfg.action.width, generator=torch.Generator().manual_seed(5))
    _close(F.linear(x, exported["action_time_mlp_in.weight"], exported["action_time_mlp_in.bias"]),
           x @ params["action_time_mlp_in/kernel"] + params["action_time_mlp_in/bias"])
    s = torch.randn(3, cfg.action_dim, generator=torch.Generator().manual_seed(6))
    _close(F.linear(s, exported["state_proj.weight"], exported["state_proj.bias"]),
           s @ params["state_proj/kernel"] + params["state_proj/bias"])


# ---------------------------------------------------------------------------------------------
# Variants of the file and errors
# ---------------------------------------------------------------------------------------------


def test_embed_tokens_name_is_read_too(exported, params, tmp_path):
    state = dict(exported)
    state[f"{LM}.embed_tokens.weight"] = state.pop(f"{PWE}.paligemma.lm_head.weight")
    del state[f"{PWE}.gemma_expert.lm_head.weight"]  # unused, optional on read
    back = X.read_openpi_pytorch_export(_rewrite(tmp_path, state))
    assert torch.equal(back["PaliGemma/llm/embedder/input_embedding"], params["PaliGemma/llm/embedder/input_embedding"])


def test_missing_tensor_is_named(exported, tmp_path):
    state = dict(exported)
    missing = f"{EXP}.layers.2.self_attn.v_proj.weight"
    del state[missing]
    with pytest.raises(W.CheckpointError, match=r"missing tensor '.*gemma_expert\.model\.layers\.2\.self_attn\.v_proj\.weight'"):
        X.read_openpi_pytorch_export(_rewrite(tmp_path, state))


def test_missing_embedding_is_named(exported, tmp_path):
    state = dict(exported)
    del state[f"{PWE}.paligemma.lm_head.weight"]
    with pytest.raises(W.CheckpointError, match=r"missing tensor .*paligemma\.lm_head\.weight.*embed_tokens\.weight"):
        X.read_openpi_pytorch_export(_rewrite(tmp_path, state))


def test_wrong_shape_is_named(exported, tmp_path):
    state = dict(exported)
    name = f"{LM}.layers.1.self_attn.o_proj.weight"
    state[name] = state[name].T.contiguous()  # (N*H, D) instead of (D, N*H)
    with pytest.raises(W.CheckpointError, match=r"o_proj\.weight' has shape \(128, 64\), expected \(64, 128\)"):
        X.read_openpi_pytorch_export(_rewrite(tmp_path, state))


def test_unknown_variant_and_extra_tensor(exported, tmp_path):
    state = dict(exported)
    probe = f"{LM}.layers.0.mlp.gate_proj.weight"
    state[probe] = torch.zeros(100, 64)
    (tmp_path / "a").mkdir()
    with pytest.raises(W.CheckpointError, match="matches no Gemma variant"):
        X.read_openpi_pytorch_export(_rewrite(tmp_path / "a", state))
    state = dict(exported)
    state[f"{LM}.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    (tmp_path / "b").mkdir()
    with pytest.raises(W.CheckpointError, match="unexpected tensor .*lora_A"):
        X.read_openpi_pytorch_export(_rewrite(tmp_path / "b", state))


def test_pi05_export_is_refused(exported, tmp_path):
    state = dict(exported)
    state["time_mlp_in.weight"] = torch.zeros(64, 64)
    with pytest.raises(W.CheckpointError, match="Pi0.5 export"):
        X.read_openpi_pytorch_export(_rewrite(tmp_path, state))


def test_config_mismatch_and_missing_config(export_dir, exported, tmp_path):
    (tmp_path / "a").mkdir()
    bad = {"action_dim": 32, "action_horizon": 50, "paligemma_variant": "gemma_2b",
           "action_expert_variant": "dummy", "precision": "float32"}
    with pytest.raises(W.CheckpointError, match="paligemma_variant 'gemma_2b'.*'dummy'"):
        X.read_openpi_pytorch_export(_rewrite(tmp_path / "a", dict(exported), bad))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.safetensors").symlink_to(export_dir / "model.safetensors")
    with pytest.raises(W.CheckpointError, match="config.json' not found"):
        X.read_openpi_pytorch_export(tmp_path / "b")
    with pytest.raises(W.CheckpointError, match="not a directory"):
        X.read_openpi_pytorch_export(tmp_path / "nowhere")
