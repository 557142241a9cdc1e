"""OpenPI's own PyTorch export of a Pi0 checkpoint <-> our canonical weights.

OpenPI's `examples/convert_jax_model_to_pytorch.py` turns a JAX checkpoint into a directory

    <out>/model.safetensors   the state dict of `PI0Pytorch` (saved with `safetensors.torch.save_model`)
    <out>/config.json         {"action_dim", "action_horizon", "paligemma_variant",
                               "action_expert_variant", "precision"}
    <out>/assets/...          copied from the checkpoint (norm stats), same layout as a JAX checkpoint

The tensor names are those of `PI0Pytorch` (openpi/models_pytorch/pi0_pytorch.py), whose
`paligemma_with_expert` (gemma_pytorch.py) holds a HF `PaliGemmaForConditionalGeneration`
(`paligemma.model.{vision_tower, multi_modal_projector, language_model}`) and a HF `GemmaForCausalLM`
action expert (`gemma_expert.model.layers...`, `gemma_expert.model.embed_tokens = None`) from
OpenPI's patched transformers 4.53 (`transformers_replace`). torch `nn.Linear.weight` is [out, in].

The mapping (canonical name -> export name, layer i of the stacked canonical tensor):

  SigLIP (prefix P = paligemma_with_expert.paligemma.model.vision_tower.vision_model.)
    img/embedding/kernel (ph, pw, 3, W) HWIO  -> P embeddings.patch_embedding.weight   OIHW, transpose(3, 2, 0, 1)
    img/embedding/bias                         -> P embeddings.patch_embedding.bias
    img/pos_embedding (1, P, W)                -> P embeddings.position_embedding.weight  (P, W)
    encoderblock/LayerNorm_0/{scale,bias}[i]   -> P encoder.layers.{i}.layer_norm1.{weight,bias}
    encoderblock/LayerNorm_1/{scale,bias}[i]   -> P encoder.layers.{i}.layer_norm2.{weight,bias}
    MlpBlock_0/Dense_0/kernel[i] (W, M)        -> P encoder.layers.{i}.mlp.fc1.weight (M, W) = kernel.T; bias as is
    MlpBlock_0/Dense_1/kernel[i] (M, W)        -> P encoder.layers.{i}.mlp.fc2.weight (W, M) = kernel.T; bias as is
    MHDPA_0/{query,key,value}/kernel[i] (W,N,H)-> P encoder.layers.{i}.self_attn.{q,k,v}_proj.weight
                                                  (N*H, W) = kernel.reshape(W, N*H).T; bias (N, H) -> (N*H,)
    MHDPA_0/out/kernel[i] (N, H, W)            -> P encoder.layers.{i}.self_attn.out_proj.weight
                                                  (W, N*H) = kernel.reshape(N*H, W).T; bias as is
    Transformer/encoder_norm/{scale,bias}      -> P post_layernorm.{weight,bias}
    img/head/{kernel (W, D), bias}             -> paligemma_with_expert.paligemma.model.multi_modal_projector.linear
                                                  .weight (D, W) = kernel.T, .bias
  Gemma (prefix expert: G = paligemma_with_expert.paligemma.model.language_model.,
         action expert: G = paligemma_with_expert.gemma_expert.model., canonical names with suffix "_1")
    llm/embedder/input_embedding (V, D)        -> paligemma_with_expert.paligemma.lm_head.weight, as is (see below)
    attn/q_einsum/w[i] (N, D, H)               -> G layers.{i}.self_attn.q_proj.weight (N*H, D) = transpose(0, 2, 1).reshape
    attn/kv_einsum/w[i] (2, K, D, H)           -> G layers.{i}.self_attn.k_proj.weight (K*H, D) from [0], v_proj from [1]
                                                  (OpenPI's script: kv[i, 0, 0].T and kv[i, 1, 0].T, K == 1)
    attn/attn_vec_einsum/w[i] (N, H, D)        -> G layers.{i}.self_attn.o_proj.weight (D, N*H) = reshape(N*H, D).T
    mlp/gating_einsum[i] (2, D, F)             -> G layers.{i}.mlp.gate_proj.weight = [0].T, up_proj.weight = [1].T (F, D)
    mlp/linear[i] (F, D)                       -> G layers.{i}.mlp.down_proj.weight (D, F) = .T
    pre_attention_norm/scale[i]                -> G layers.{i}.input_layernorm.weight, as is
    pre_ffw_norm/scale[i]                      -> G layers.{i}.post_attention_layernorm.weight, as is
    final_norm/scale                           -> G norm.weight, as is
  RMSNorm scales are stored as is: both OpenPI's JAX RMSNorm and the patched HF GemmaRMSNorm multiply by
  (1 + weight) (transformers_replace/models/gemma/modeling_gemma.py, weight initialised to zeros).
  Top level: {state_proj, action_in_proj, action_out_proj, action_time_mlp_in, action_time_mlp_out}
    /kernel (in, out) -> <name>.weight (out, in) = kernel.T; /bias -> <name>.bias.

Two names follow from how the file is saved rather than from the conversion code:
  * PaliGemma ties `lm_head.weight` to `language_model.embed_tokens.weight`; `safetensors.torch.save_model`
    keeps one name per shared tensor (the alphabetically first, `...paligemma.lm_head.weight`) and records
    the dropped name in the file's metadata. Published exports (e.g. pi05_base) indeed hold `lm_head`, not
    `embed_tokens`. We read either; we write `lm_head` plus that metadata entry, like save_model.
  * `paligemma_with_expert.gemma_expert.lm_head.weight` (V, D_action) exists in the model but is never used
    (the expert has no embedding); it is saved anyway. We ignore it on read and write zeros for it (so the
    file loads with `safetensors.torch.load_model(model, path)` strict, as OpenPI's `load_pytorch` does).

One deliberate deviation: for the PaliGemma expert OpenPI's script builds o_proj as
`w.transpose(2, 0, 1).reshape(N*H, D)`, which is the same tensor as `w.reshape(N*H, D).T` (what it uses for the
action expert) only because N*H == D for gemma_2b. We use the latter for both (identical for every real
checkpoint; the former would give a wrongly-shaped tensor for the `dummy` Gemma where N*H != D).

Pi0.5 exports (adaRMS `*.dense.*` norms, `time_mlp_*`, no `state_proj`) are rejected with a clear error: the
canonical weight set is Pi0's.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable

import torch

from pi0_triton_policy import weights as W
from pi0_triton_policy.config import GEMMA_VARIANTS, PI0_VARIANTS, SIGLIP_VARIANTS, Pi0Config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

PWE = "paligemma_with_expert"
VISION = f"{PWE}.paligemma.model.vision_tower.vision_model"
PROJECTOR = f"{PWE}.paligemma.model.multi_modal_projector.linear"
PREFIX_LM = f"{PWE}.paligemma.model.language_model"
ACTION_LM = f"{PWE}.gemma_expert.model"
EMBED_TOKENS = f"{PREFIX_LM}.embed_tokens.weight"
PALIGEMMA_LM_HEAD = f"{PWE}.paligemma.lm_head.weight"  # the tied embedding, as save_model keeps it
EXPERT_LM_HEAD = f"{PWE}.gemma_expert.lm_head.weight"  # unused by Pi0, present in the file

TOP_LEVEL = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out")
# Keys that only a Pi0.5 export has (pi0_pytorch.py: time_mlp_in/out when pi05; adaRMS norms carry `.dense`).
_PI05_MARKERS = ("time_mlp_in.weight", "time_mlp_out.weight")

_IMG = "PaliGemma/img"
_BLK = f"{_IMG}/Transformer/encoderblock"
_ATT = f"{_BLK}/MultiHeadDotProductAttention_0"
_LAY = "PaliGemma/llm/layers"


# ---------------------------------------------------------------------------------------------
# The mapping, as a list of entries
# ---------------------------------------------------------------------------------------------
#
# Every entry maps one canonical tensor to one or more export tensors. Stacked canonical tensors
# (layers on axis 0) become one export tensor per layer: `to_torch(layer_slice)` gives the export
# tensors of that layer, `from_torch(export tensors of that layer)` gives the layer slice back.


class _Entry:
    __slots__ = ("canonical", "torch_names", "to_torch", "from_torch", "layers")

    def __init__(self, canonical: str, torch_names: list[str], to_torch: Callable, from_torch: Callable, layers: int | None):
        self.canonical = canonical
        self.torch_names = torch_names  # with "{i}" for the layer index when `layers` is set
        self.to_torch = to_torch  # tensor (one layer, or the whole tensor) -> tuple of export tensors
        self.from_torch = from_torch  # tuple of export tensors -> tensor
        self.layers = layers


def _same(t):
    return (t,)


def _unsame(ts):
    return ts[0]


def _t(t):
    return (t.transpose(0, 1),)


def _untt(ts):
    return ts[0].transpose(0, 1)


def _entries(cfg: Pi0Config) -> list[_Entry]:
    v = cfg.vision
    E: list[_Entry] = []

    def add(canonical, torch_names, to_torch, from_torch, layers=None):
        E.append(_Entry(canonical, list(torch_names), to_torch, from_torch, layers))

    # --- SigLIP -----------------------------------------------------------------------------
    add(f"{_IMG}/embedding/kernel", [f"{VISION}.embeddings.patch_embedding.weight"],
        lambda k: (k.permute(3, 2, 0, 1),),  # HWIO -> OIHW (script: transpose(3, 2, 0, 1))
        lambda ts: ts[0].permute(2, 3, 1, 0))  # OIHW -> HWIO
    add(f"{_IMG}/embedding/bias", [f"{VISION}.embeddings.patch_embedding.bias"], _same, _unsame)
    add(f"{_IMG}/pos_embedding", [f"{VISION}.embeddings.position_embedding.weight"],
        lambda p: (p.reshape(v.num_patches, v.width),),
        lambda ts: ts[0].reshape(1, v.num_patches, v.width))
    enc = f"{VISION}.encoder.layers.{{i}}"
    for canon, tname in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        add(f"{_BLK}/{canon}/scale", [f"{enc}.{tname}.weight"], _same, _unsame, v.depth)
        add(f"{_BLK}/{canon}/bias", [f"{enc}.{tname}.bias"], _same, _unsame, v.depth)
    for canon, tname in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        add(f"{_BLK}/MlpBlock_0/{canon}/kernel", [f"{enc}.mlp.{tname}.weight"], _t, _untt, v.depth)
        add(f"{_BLK}/MlpBlock_0/{canon}/bias", [f"{enc}.mlp.{tname}.bias"], _same, _unsame, v.depth)
    nh = v.num_heads * v.head_dim
    for canon, tname in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        add(f"{_ATT}/{canon}/kernel", [f"{enc}.self_attn.{tname}.weight"],
            lambda k: (k.reshape(v.width, nh).transpose(0, 1),),  # (W, N, H) -> (N*H, W)
            lambda ts: ts[0].transpose(0, 1).reshape(v.width, v.num_heads, v.head_dim), v.depth)
        add(f"{_ATT}/{canon}/bias", [f"{enc}.self_attn.{tname}.bias"],
            lambda b: (b.reshape(nh),),
            lambda ts: ts[0].reshape(v.num_heads, v.head_dim), v.depth)
    add(f"{_ATT}/out/kernel", [f"{enc}.self_attn.out_proj.weight"],
        lambda k: (k.reshape(nh, v.width).transpose(0, 1),),  # (N, H, W) -> (W, N*H)
        lambda ts: ts[0].transpose(0, 1).reshape(v.num_heads, v.head_dim, v.width), v.depth)
    add(f"{_ATT}/out/bias", [f"{enc}.self_attn.out_proj.bias"], _same, _unsame, v.depth)
    add(f"{_IMG}/Transformer/encoder_norm/scale", [f"{VISION}.post_layernorm.weight"], _same, _unsame)
    add(f"{_IMG}/Transformer/encoder_norm/bias", [f"{VISION}.post_layernorm.bias"], _same, _unsame)
    add(f"{_IMG}/head/kernel", [f"{PROJECTOR}.weight"], _t, _untt)
    add(f"{_IMG}/head/bias", [f"{PROJECTOR}.bias"], _same, _unsame)

    # --- Gemma experts ----------------------------------------------------------------------
    add("PaliGemma/llm/embedder/input_embedding", [PALIGEMMA_LM_HEAD], _same, _unsame)
    for sfx, g, lm in (("", cfg.prefix, PREFIX_LM), ("_1", cfg.action, ACTION_LM)):
        lay = f"{lm}.layers.{{i}}"
        N, K, H, D = g.num_heads, g.num_kv_heads, g.head_dim, g.width

        def q_to(w, N=N, H=H, D=D):  # (N, D, H) -> (N, H, D) -> (N*H, D)
            return (w.permute(0, 2, 1).reshape(N * H, D),)

        def q_from(ts, N=N, H=H, D=D):
            return ts[0].reshape(N, H, D).permute(0, 2, 1)

        def kv_to(w, K=K, H=H, D=D):  # (2, K, D, H) -> k, v each (K*H, D)
            return tuple(w[c].permute(0, 2, 1).reshape(K * H, D) for c in range(2))

        def kv_from(ts, K=K, H=H, D=D):
            return torch.stack([t.reshape(K, H, D).permute(0, 2, 1) for t in ts])

        def o_to(w, N=N, H=H, D=D):  # (N, H, D) -> (N*H, D) -> (D, N*H)
            return (w.reshape(N * H, D).transpose(0, 1),)

        def o_from(ts, N=N, H=H, D=D):
            return ts[0].transpose(0, 1).reshape(N, H, D)

        add(f"{_LAY}/attn/q_einsum{sfx}/w", [f"{lay}.self_attn.q_proj.weight"], q_to, q_from, g.depth)
        add(f"{_LAY}/attn/kv_einsum{sfx}/w", [f"{lay}.self_attn.k_proj.weight", f"{lay}.self_attn.v_proj.weight"],
            kv_to, kv_from, g.depth)
        add(f"{_LAY}/attn/attn_vec_einsum{sfx}/w", [f"{lay}.self_attn.o_proj.weight"], o_to, o_from, g.depth)
        add(f"{_LAY}/mlp{sfx}/gating_einsum", [f"{lay}.mlp.gate_proj.weight", f"{lay}.mlp.up_proj.weight"],
            lambda w: (w[0].transpose(0, 1), w[1].transpose(0, 1)),  # (2, D, F) -> gate, up (F, D)
            lambda ts: torch.stack([ts[0].transpose(0, 1), ts[1].transpose(0, 1)]), g.depth)
        add(f"{_LAY}/mlp{sfx}/linear", [f"{lay}.mlp.down_proj.weight"], _t, _untt, g.depth)
        add(f"{_LAY}/pre_attention_norm{sfx}/scale", [f"{lay}.input_layernorm.weight"], _same, _unsame, g.depth)
        add(f"{_LAY}/pre_ffw_norm{sfx}/scale", [f"{lay}.post_attention_layernorm.weight"], _same, _unsame, g.depth)
        add(f"PaliGemma/llm/final_norm{sfx}/scale", [f"{lm}.norm.weight"], _same, _unsame)

    # --- Projections ------------------------------------------------------------------------
    for name in TOP_LEVEL:
        add(f"{name}/kernel", [f"{name}.weight"], _t, _untt)
        add(f"{name}/bias", [f"{name}.bias"], _same, _unsame)
    return E


def _layer_names(entry: _Entry, i: int | None) -> list[str]:
    return [n.format(i=i) for n in entry.torch_names] if entry.layers is not None else list(entry.torch_names)


def canonical_to_export(params: dict[str, torch.Tensor], cfg: Pi0Config) -> dict[str, torch.Tensor]:
    """Canonical tensors -> OpenPI's PyTorch state dict (without the unused expert lm_head), as views."""
    W.check_shapes(cfg, {k: tuple(t.shape) for k, t in params.items()})
    out: dict[str, torch.Tensor] = {}
    for e in _entries(cfg):
        t = params[e.canonical]
        for i in range(e.layers) if e.layers is not None else (None,):
            parts = e.to_torch(t[i] if i is not None else t)
            out.update(zip(_layer_names(e, i), parts, strict=True))
    return out


def export_shapes(cfg: Pi0Config, include_expert_lm_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor name of OpenPI's PyTorch export of a Pi0 variant, with its shape (no data touched)."""
    meta = {k: torch.empty(s, device="meta") for k, s in W.expected_shapes(cfg).items()}
    shapes = {k: tuple(t.shape) for k, t in canonical_to_export(meta, cfg).items()}
    if include_expert_lm_head:
        shapes[EXPERT_LM_HEAD] = (cfg.vocab_size, cfg.action.width)
    return shapes


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_openpi_pytorch_export(
    params: dict[str, torch.Tensor],
    cfg: Pi0Config,
    path: str | os.PathLike,
    *,
    precision: str | None = None,
    include_expert_lm_head: bool = True,
) -> pathlib.Path:
    """Write canonical weights as OpenPI's PyTorch export: `<path>/model.safetensors` + `<path>/config.json`.

    `precision` ("float32" or "bfloat16", OpenPI's two choices) casts every tensor as OpenPI's script does
    (`pi0_model.to(dtype)`); None keeps the params' dtype (which must then be one of the two).
    `include_expert_lm_head` writes the (unused) action-expert lm_head as zeros, so that the file holds every
    tensor of `PI0Pytorch` like a real export.
    """
    from safetensors.torch import save_file

    if precision is None:
        dtypes = {t.dtype for t in params.values()}
        names = [n for n, d in _PRECISIONS.items() if {d} == dtypes]
        if not names:
            raise ValueError(f"params have dtypes {sorted(map(str, dtypes))}; pass precision='float32' or 'bfloat16'")
        precision = names[0]
    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of OpenPI's: {', '.join(_PRECISIONS)}")
    dtype = _PRECISIONS[precision]

    state = {k: t.to(dtype).contiguous() for k, t in canonical_to_export(params, cfg).items()}
    if include_expert_lm_head:
        state[EXPERT_LM_HEAD] = torch.zeros(cfg.vocab_size, cfg.action.width, dtype=dtype)
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # As safetensors.torch.save_model records a dropped tied name: {dropped name: kept name}.
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", EMBED_TOKENS: PALIGEMMA_LM_HEAD})
    config = {
        "action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        "paligemma_variant": cfg.prefix.name,
        "action_expert_variant": cfg.action.name,
        "precision": precision,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _safetensors_keys(f: pathlib.Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        return list(sf.keys())


def is_openpi_pytorch_export(path: str | os.PathLike) -> bool:
    """A directory holding model.safetensors and config.json whose tensors are named like OpenPI's PI0Pytorch."""
    d = pathlib.Path(path).expanduser()
    f = d / WEIGHTS_FILE
    if not (d.is_dir() and f.is_file() and (d / CONFIG_FILE).is_file()):
        return False
    try:
        keys = set(_safetensors_keys(f))
    except Exception:  # noqa: BLE001 - anything unreadable is simply not an export
        return False
    probe = f"{PREFIX_LM}.layers.0.self_attn.q_proj.weight"
    return probe in keys and any(k.startswith(f"{VISION}.") for k in keys)


def read_openpi_pytorch_config(path: str | os.PathLike) -> dict:
    """The export's config.json (action_dim, action_horizon, paligemma_variant, action_expert_variant, precision)."""
    f = pathlib.Path(path).expanduser() / CONFIG_FILE
    if not f.is_file():
        raise W.CheckpointError(f"{str(f)!r} not found: an OpenPI PyTorch export holds {WEIGHTS_FILE} and {CONFIG_FILE}")
    try:
        config = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise W.CheckpointError(f"{str(f)!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise W.CheckpointError(f"{str(f)!r} holds {type(config).__name__}, expected a JSON object")
    return config


def _count_layers(keys: set[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.layers\.(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def _infer_cfg(shape_of: Callable[[str], tuple[int, ...]], keys: set[str], where: str) -> Pi0Config:
    """The Pi0 variant of an export, from the MLP shapes and layer counts of its three towers."""

    def need(name: str) -> tuple[int, ...]:
        if name not in keys:
            raise W.CheckpointError(f"{where}: missing tensor {name!r}: cannot tell the model variant without it")
        return shape_of(name)

    def gemma(lm: str, role: str):
        probe = f"{lm}.layers.0.mlp.gate_proj.weight"
        s = need(probe)
        depth = _count_layers(keys, lm)
        if len(s) != 2:
            raise W.CheckpointError(f"{where}: tensor {probe!r} has shape {s}, expected (mlp_dim, width)")
        mlp, width = s
        for g in GEMMA_VARIANTS.values():
            if (g.depth, g.width, g.mlp_dim) == (depth, width, mlp):
                return g
        known = ", ".join(f"{g.name} (depth {g.depth}, width {g.width}, mlp {g.mlp_dim})" for g in GEMMA_VARIANTS.values())
        raise W.CheckpointError(
            f"{where}: the {role} has {depth} layers and {probe!r} of shape {s} (width {width}, mlp {mlp}), "
            f"which matches no Gemma variant; expected one of: {known}"
        )

    prefix, action = gemma(PREFIX_LM, "PaliGemma language model"), gemma(ACTION_LM, "action expert")
    probe = f"{VISION}.encoder.layers.0.mlp.fc1.weight"
    s = need(probe)
    depth = _count_layers(keys, f"{VISION}.encoder")
    if len(s) != 2:
        raise W.CheckpointError(f"{where}: tensor {probe!r} has shape {s}, expected (mlp_dim, width)")
    mlp, width = s
    vision = next((v for v in SIGLIP_VARIANTS.values() if (v.depth, v.width, v.mlp_dim) == (depth, width, mlp)), None)
    if vision is None:
        known = ", ".join(f"{v.name} {(v.depth, v.width, v.mlp_dim)}" for v in SIGLIP_VARIANTS.values())
        raise W.CheckpointError(
            f"{where}: the SigLIP tower has {depth} layers and {probe!r} of shape {s}, which matches no SigLIP "
            f"variant; expected (depth, width, mlp) one of: {known}"
        )
    for cfg in PI0_VARIANTS.values():
        if (cfg.vision, cfg.prefix, cfg.action) == (vision, prefix, action):
            return cfg
    return Pi0Config(f"pi0[{vision.name},{prefix.name},{action.name}]", vision, prefix, action)


def read_openpi_pytorch_export(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Canonical tensors (OpenPI's flattened JAX names and layouts, the file's dtype) from OpenPI's PyTorch export.

    Raises weights.CheckpointError naming the tensor when one is missing, has a shape that doesn't fit the
    variant, or is not part of a Pi0 export (Pi0.5 exports are refused).
    """
    from safetensors import SafetensorError, safe_open

    d = pathlib.Path(path).expanduser()
    if not d.is_dir():
        raise W.CheckpointError(f"OpenPI PyTorch export {str(d)!r} is not a directory")
    f = d / WEIGHTS_FILE
    if not f.is_file():
        raise W.CheckpointError(f"{str(f)!r} not found: an OpenPI PyTorch export holds {WEIGHTS_FILE} and {CONFIG_FILE}")
    config = read_openpi_pytorch_config(d)
    where = str(f)

    try:
        sf_ctx = safe_open(str(f), framework="pt")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise W.CheckpointError(f"{where!r} is not a readable safetensors file ({e})") from e
    with sf_ctx as sf:
        keys = set(sf.keys())
        pi05 = sorted(k for k in keys if k in _PI05_MARKERS or re.search(r"(layernorm|\.norm)\.dense\.", k))
        if pi05:
            raise W.CheckpointError(
                f"{where!r} is a Pi0.5 export (it has {pi05[0]!r}); only Pi0 exports map onto the canonical Pi0 weights"
            )

        def shape_of(name: str) -> tuple[int, ...]:
            return tuple(sf.get_slice(name).get_shape())

        # The tied PaliGemma embedding is saved under one of its two names (save_model keeps lm_head).
        embed_name = EMBED_TOKENS if EMBED_TOKENS in keys else PALIGEMMA_LM_HEAD
        cfg = _infer_cfg(shape_of, keys, where)
        for field, want in (("paligemma_variant", cfg.prefix.name), ("action_expert_variant", cfg.action.name)):
            if field in config and config[field] != want:
                raise W.CheckpointError(
                    f"{str(d / CONFIG_FILE)!r} says {field} {config[field]!r}, but the tensors in {where!r} are {want!r}"
                )

        expected = export_shapes(cfg, include_expert_lm_head=False)
        expected[embed_name] = expected.pop(PALIGEMMA_LM_HEAD)
        for name, want in expected.items():
            if name not in keys:
                hint = f" (the tied PaliGemma embedding, saved as this or as {EMBED_TOKENS!r})" if name == embed_name else ""
                raise W.CheckpointError(f"{where!r}: missing tensor {name!r}{hint}; expected shape {want} for variant {cfg.name}")
            got = shape_of(name)
            if got != want:
                raise W.CheckpointError(f"{where!r}: tensor {name!r} has shape {got}, expected {want} for variant {cfg.name}")
        ignorable = {EXPERT_LM_HEAD, EMBED_TOKENS, PALIGEMMA_LM_HEAD} - {embed_name}
        extra = sorted(keys - set(expected) - ignorable)
        if extra:
            raise W.CheckpointError(
                f"{where!r}: unexpected tensor {extra[0]!r} (of {len(extra)} unknown) in an OpenPI Pi0 export of "
                f"variant {cfg.name}"
            )

        def get(name: str) -> torch.Tensor:
            return sf.get_tensor(embed_name if name == PALIGEMMA_LM_HEAD else name)

        params: dict[str, torch.Tensor] = {}
        for e in _entries(cfg):
            if e.layers is None:
                params[e.canonical] = e.from_torch(tuple(get(n) for n in e.torch_names)).contiguous()
            else:
                params[e.canonical] = torch.stack(
                    [e.from_torch(tuple(get(n) for n in _layer_names(e, i))) for i in range(e.layers)]
                ).contiguous()
    W.infer_variant({k: tuple(t.shape) for k, t in params.items()})  # final guard: exactly the canonical set
    return params
