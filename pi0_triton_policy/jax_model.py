"""The `jax` backend: Pi0 in JAX, run straight from an OpenPI parameter tree (no conversion).

Written from OpenPI's model definition (pi0.py, gemma.py, siglip.py) as pure functions over the nested
parameter dict that OpenPI's `restore_params` yields, so an A/B run against it checks our conversion and
our PyTorch/Triton code against OpenPI's layouts directly. Layers are scanned with `lax.scan` over the
stacked parameters (as OpenPI's `nn.scan`), the flow loop is OpenPI's `while_loop`.

The parameter tree may be OpenPI's `{"params": {...}}` or the inner dict; training-state leaves
(`.../value`) and LoRA leaves must be merged first (see convert.py: `normalize_openpi_tree`).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from pi0_triton_policy.config import Pi0Config

_BIG_NEG = -2.3819763e38


def _rms_norm(x, scale, eps=1e-6):
    dtype = x.dtype
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = x.astype(jnp.float32) * jax.lax.rsqrt(var + eps)
    return (normed * (1 + scale.astype(jnp.float32))).astype(dtype)


def _layer_norm(x, scale, bias, eps=1e-6):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def _apply_rope(x, positions, max_wavelength=10_000.0):
    freq_exponents = (2.0 / x.shape[-1]) * jnp.arange(x.shape[-1] // 2, dtype=jnp.float32)
    timescale = max_wavelength**freq_exponents
    radians = positions[..., None] / timescale[None, None, :]
    radians = radians[..., None, :]  # broadcast over heads
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _posemb_sincos(pos, dim, min_period=4e-3, max_period=4.0):
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    angle = jnp.einsum("i,j->ij", pos, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def _make_attn_mask(input_mask, mask_ar):
    mask_ar = jnp.broadcast_to(mask_ar, input_mask.shape)
    cumsum = jnp.cumsum(mask_ar, axis=1)
    attn_mask = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = input_mask[:, None, :] * input_mask[:, :, None]
    return jnp.logical_and(attn_mask, valid)


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


# ---------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------


def _siglip(img, image, dtype, num_heads):
    """image [M, 224, 224, 3] -> tokens [M, 256, W_llm]."""
    x = jax.lax.conv_general_dilated(
        image.astype(jnp.float32),
        img["embedding"]["kernel"].astype(jnp.float32),
        window_strides=img["embedding"]["kernel"].shape[:2],
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    ) + img["embedding"]["bias"].astype(jnp.float32)
    M, gh, gw, C = x.shape
    x = x.reshape(M, gh * gw, C) + img["pos_embedding"].astype(jnp.float32)
    x = x.astype(dtype)

    def block(x, lp):
        lp = jax.tree.map(lambda a: a.astype(dtype), lp)
        att = lp["MultiHeadDotProductAttention_0"]
        y = _layer_norm(x, lp["LayerNorm_0"]["scale"], lp["LayerNorm_0"]["bias"])
        q = jnp.einsum("msd,dnh->msnh", y, att["query"]["kernel"]) + att["query"]["bias"]
        k = jnp.einsum("msd,dnh->msnh", y, att["key"]["kernel"]) + att["key"]["bias"]
        v = jnp.einsum("msd,dnh->msnh", y, att["value"]["kernel"]) + att["value"]["bias"]
        q = q / jnp.sqrt(q.shape[-1]).astype(dtype)
        logits = jnp.einsum("mqnh,mknh->mnqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        o = jnp.einsum("mnqk,mknh->mqnh", probs, v)
        x = x + jnp.einsum("mqnh,nhd->mqd", o, att["out"]["kernel"]) + att["out"]["bias"]
        y = _layer_norm(x, lp["LayerNorm_1"]["scale"], lp["LayerNorm_1"]["bias"])
        mlp = lp["MlpBlock_0"]
        y = jax.nn.gelu(_dense(mlp["Dense_0"], y), approximate=True)
        return x + _dense(mlp["Dense_1"], y), None

    x, _ = jax.lax.scan(block, x, img["Transformer"]["encoderblock"])
    n = img["Transformer"]["encoder_norm"]
    x = _layer_norm(x, n["scale"].astype(dtype), n["bias"].astype(dtype))
    return _dense(jax.tree.map(lambda a: a.astype(dtype), img["head"]), x)


# ---------------------------------------------------------------------------------------------
# Gemma (two experts, joint attention)
# ---------------------------------------------------------------------------------------------

_SFX = ("", "_1")


def _expert_layers(llm, e):
    """Per-layer stacked params of expert e, as a dict for lax.scan."""
    lay, s = llm["layers"], _SFX[e]
    return {
        "q": lay["attn"][f"q_einsum{s}"]["w"],
        "kv": lay["attn"][f"kv_einsum{s}"]["w"],
        "o": lay["attn"][f"attn_vec_einsum{s}"]["w"],
        "gating": lay[f"mlp{s}"]["gating_einsum"],
        "linear": lay[f"mlp{s}"]["linear"],
        "attn_norm": lay[f"pre_attention_norm{s}"]["scale"],
        "ffw_norm": lay[f"pre_ffw_norm{s}"]["scale"],
    }


def _gemma(llm, xs, mask, positions, kv_cache, dtype):
    """xs: tuple (prefix or None, suffix or None). Returns (final-normed outputs, stacked (k, v))."""
    active = [e for e, x in enumerate(xs) if x is not None]
    layer_params = {e: jax.tree.map(lambda a: a.astype(dtype), _expert_layers(llm, e)) for e in active}
    xs = [None if x is None else x.astype(dtype) for x in xs]

    def layer(carry, scanned):
        xs, = carry
        lp, cache = scanned
        qs, ks, vs = [], [], []
        for e in active:
            h = _rms_norm(xs[e], lp[e]["attn_norm"])
            qs.append(jnp.einsum("BTD,NDH->BTNH", h, lp[e]["q"]))
            k, v = jnp.einsum("BSD,2KDH->2BSKH", h, lp[e]["kv"])
            ks.append(k)
            vs.append(v)
        q, k, v = (jnp.concatenate(y, axis=1) for y in (qs, ks, vs))
        q = _apply_rope(q, positions) * jnp.asarray(q.shape[-1] ** -0.5, dtype)
        k = _apply_rope(k, positions)
        if cache is not None:
            k = jnp.concatenate([cache[0], k], axis=1)
            v = jnp.concatenate([cache[1], v], axis=1)
        B, T, N, H = q.shape
        K = k.shape[2]
        qg = q.reshape(B, T, K, N // K, H)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, None, None, :, :], logits, _BIG_NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        enc = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)
        new_xs = list(xs)
        start = 0
        for e in active:
            end = start + xs[e].shape[1]
            x = xs[e] + jnp.einsum("BTNH,NHD->BTD", enc[:, start:end], lp[e]["o"])
            start = end
            h = _rms_norm(x, lp[e]["ffw_norm"])
            gate = jax.nn.gelu(h @ lp[e]["gating"][0], approximate=True)
            new_xs[e] = x + (gate * (h @ lp[e]["gating"][1])) @ lp[e]["linear"]
        return (new_xs,), (k, v)

    (xs,), kv = jax.lax.scan(layer, (xs,), (layer_params, kv_cache))
    outs = [None if x is None else _rms_norm(x, llm[f"final_norm{_SFX[e]}"]["scale"]) for e, x in enumerate(xs)]
    return outs, kv


# ---------------------------------------------------------------------------------------------
# Pi0
# ---------------------------------------------------------------------------------------------


def _sample_actions(params, images, image_mask, tokens, token_mask, state, noise, *, num_steps, dtype, num_heads, horizon):
    pg = params["PaliGemma"]
    B, V = images.shape[:2]
    # prefix: images (every slot, masked ones too, as OpenPI), then the prompt
    img_tokens = _siglip(pg["img"], images.reshape(B * V, *images.shape[2:]), dtype, num_heads)
    P = img_tokens.shape[1]
    img_tokens = img_tokens.reshape(B, V * P, -1)
    img_valid = jnp.repeat(image_mask, P, axis=1)
    table = pg["llm"]["embedder"]["input_embedding"].astype(dtype)
    txt = table[tokens] * jnp.sqrt(table.shape[-1]).astype(dtype)
    prefix = jnp.concatenate([img_tokens, txt], axis=1)
    prefix_valid = jnp.concatenate([img_valid, token_mask], axis=1)
    prefix_mask = _make_attn_mask(prefix_valid, jnp.zeros(prefix_valid.shape[1], dtype=bool))
    positions = jnp.cumsum(prefix_valid, axis=1) - 1
    _, kv_cache = _gemma(pg["llm"], (prefix, None), prefix_mask, positions, None, dtype)

    def embed_suffix(x_t, t):
        state_tok = _dense(params["state_proj"], state)[:, None, :]
        act = _dense(params["action_in_proj"], x_t)
        temb = jnp.broadcast_to(_posemb_sincos(t, act.shape[-1])[:, None, :], act.shape)
        h = jax.nn.swish(_dense(params["action_time_mlp_in"], jnp.concatenate([act, temb], axis=-1)))
        return jnp.concatenate([state_tok, _dense(params["action_time_mlp_out"], h)], axis=1)

    n_suffix = 1 + horizon
    suffix_ar = jnp.array([True, True] + [False] * (horizon - 1))
    suffix_mask = _make_attn_mask(jnp.ones((B, n_suffix), dtype=bool), suffix_ar)
    full_mask = jnp.concatenate([jnp.broadcast_to(prefix_valid[:, None, :], (B, n_suffix, prefix_valid.shape[1])), suffix_mask], -1)
    suffix_pos = jnp.sum(prefix_valid, axis=-1)[:, None] + jnp.arange(n_suffix)[None, :]
    dt = -1.0 / num_steps

    def step(carry):
        x_t, t = carry
        suffix = embed_suffix(x_t, jnp.broadcast_to(t, (B,)))
        (_, out), _ = _gemma(pg["llm"], (None, suffix), full_mask, suffix_pos, kv_cache, dtype)
        v_t = _dense(params["action_out_proj"], out[:, -horizon:].astype(jnp.float32))
        return x_t + dt * v_t, t + dt

    x0, _ = jax.lax.while_loop(lambda c: c[1] >= -dt / 2, step, (noise, jnp.float32(1.0)))
    return x0


class JaxPi0:
    """Pi0 in JAX over an OpenPI parameter tree; same `sample_actions` call as the other backends."""

    backend_name = "jax"

    def __init__(self, cfg: Pi0Config, params: dict, dtype=None):
        import torch

        self.cfg = cfg
        params = params.get("params", params)
        # Small projections stay float32 (as in OpenPI); PaliGemma runs in `dtype`.
        self.dtype = jnp.bfloat16 if dtype in (jnp.bfloat16, "bfloat16", torch.bfloat16) else jnp.float32
        self.params = jax.tree.map(jnp.asarray, params)
        self._fn = jax.jit(
            _sample_actions,
            static_argnames=("num_steps", "dtype", "num_heads", "horizon"),
        )

    def sample_actions(self, images, image_mask, tokens, token_mask, state, noise, num_steps: int = 10) -> np.ndarray:
        batched = np.ndim(state) == 2
        args = [np.asarray(a) for a in (images, image_mask, tokens, token_mask, state, noise)]
        args = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in args]
        args[1], args[3] = args[1].astype(bool), args[3].astype(bool)
        args[2] = args[2].astype(np.int32)
        if not batched:
            args = [a[None] for a in args]
        # float32 means float32: no TF32 shortcuts on GPUs for the reference.
        precision = "highest" if self.dtype == jnp.float32 else "default"
        with jax.default_matmul_precision(precision):
            out = self._fn(
                self.params, *args, num_steps=num_steps, dtype=self.dtype,
                num_heads=self.cfg.vision.num_heads, horizon=self.cfg.action_horizon,
            )
        out = np.asarray(out, dtype=np.float32)
        return out if batched else out[0]


__all__ = ["JaxPi0"]
