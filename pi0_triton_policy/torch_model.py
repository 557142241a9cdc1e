"""The `torch` backend: a plain PyTorch Pi0 that follows OpenPI's math line by line.

It is the reference every faster path is measured against, so it favours clarity over speed: weights
stay in OpenPI's layouts (einsums read like OpenPI's), all three image slots are computed as OpenPI
does, and nothing is fused. Runs on CPU or CUDA, in float32 or bfloat16 (bf16 applies to the vision
tower and the two Gemma experts; the small state/action/time projections stay float32, as in OpenPI
where their parameters are float32 and the experts' inputs are cast to bf16).

Shapes: B batch, V image slots (3), P patches (256), T/S query/key tokens, N heads, K kv heads, H head_dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pi0_triton_policy.config import GemmaConfig, Pi0Config, SiglipConfig

# OpenPI's masked-logit value: finite, so a row with nothing visible (a masked image token) stays finite.
BIG_NEG = -2.3819763e38


# ---------------------------------------------------------------------------------------------
# Numeric building blocks (each tested on its own against an independent computation)
# ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gemma RMSNorm: float32 variance, `* (1 + scale)`, result in the input dtype."""
    xf = x.float()
    var = xf.square().mean(-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps) * (1.0 + scale.float())).to(x.dtype)


def layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), scale.float(), bias.float(), eps).to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000.0) -> torch.Tensor:
    """Rotary embedding, split-half layout. x [B, T, N, H], positions [B, T] (ints)."""
    half = x.shape[-1] // 2
    freq_exponents = (2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32, device=x.device)
    timescale = max_wavelength**freq_exponents
    radians = positions.float()[..., None] / timescale  # [B, T, H/2]
    sin, cos = torch.sin(radians)[:, :, None, :], torch.cos(radians)[:, :, None, :]
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sin-cos embedding of the flow time t [B] -> [B, dim], float32."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = (min_period * (max_period / min_period) ** fraction).float()
    angle = t.float()[:, None] * (2.0 * math.pi / period)[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def make_attn_mask(valid: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """OpenPI's mask: i sees j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are valid. -> [B, T, T] bool."""
    ar = ar.broadcast_to(valid.shape).long()
    cum = ar.cumsum(-1)
    causal = cum[:, None, :] <= cum[:, :, None]
    return causal & valid[:, None, :] & valid[:, :, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention with float32 logits. q [B,T,N,H] (already scaled), k/v [B,S,K,H], mask [B,T,S]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    logits = torch.einsum("btkgh,bskh->bkgts", qg.float(), k.float())
    logits = torch.where(mask[:, None, None, :, :], logits, torch.tensor(BIG_NEG, device=q.device))
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, N, H)


# ---------------------------------------------------------------------------------------------
# SigLIP vision tower
# ---------------------------------------------------------------------------------------------


def siglip_forward(p: dict, cfg: SiglipConfig, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """images [M, 224, 224, 3] in [-1, 1] -> image tokens [M, P, out_width] (after `head`)."""
    M = images.shape[0]
    ps, g = cfg.patch_size, cfg.image_size // cfg.patch_size
    pre = "PaliGemma/img"
    # The 14x14 stride-14 conv is a matmul over flattened (row, col, channel) patches; float32 as OpenPI.
    patches = images.float().reshape(M, g, ps, g, ps, 3).permute(0, 1, 3, 2, 4, 5).reshape(M, g * g, ps * ps * 3)
    kernel = p[f"{pre}/embedding/kernel"].float().reshape(ps * ps * 3, cfg.width)
    x = patches @ kernel + p[f"{pre}/embedding/bias"].float()  # [M, P, width]
    x = (x + p[f"{pre}/pos_embedding"].float()).to(dtype)

    blk = f"{pre}/Transformer/encoderblock"
    att = f"{blk}/MultiHeadDotProductAttention_0"
    full = torch.ones(M, x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
    for i in range(cfg.depth):
        w = lambda name: p[name][i].to(dtype)  # noqa: E731 - layer i of a stacked tensor
        y = layer_norm(x, w(f"{blk}/LayerNorm_0/scale"), w(f"{blk}/LayerNorm_0/bias"), cfg.layer_norm_eps)
        q = torch.einsum("msd,dnh->msnh", y, w(f"{att}/query/kernel")) + w(f"{att}/query/bias")
        k = torch.einsum("msd,dnh->msnh", y, w(f"{att}/key/kernel")) + w(f"{att}/key/bias")
        v = torch.einsum("msd,dnh->msnh", y, w(f"{att}/value/kernel")) + w(f"{att}/value/bias")
        o = attention(q * cfg.head_dim**-0.5, k, v, full)  # K == N: plain multi-head
        x = x + torch.einsum("msnh,nhd->msd", o, w(f"{att}/out/kernel")) + w(f"{att}/out/bias")
        y = layer_norm(x, w(f"{blk}/LayerNorm_1/scale"), w(f"{blk}/LayerNorm_1/bias"), cfg.layer_norm_eps)
        y = gelu_tanh(y @ w(f"{blk}/MlpBlock_0/Dense_0/kernel") + w(f"{blk}/MlpBlock_0/Dense_0/bias"))
        x = x + (y @ w(f"{blk}/MlpBlock_0/Dense_1/kernel") + w(f"{blk}/MlpBlock_0/Dense_1/bias"))
    n = f"{pre}/Transformer/encoder_norm"
    x = layer_norm(x, p[f"{n}/scale"], p[f"{n}/bias"], cfg.layer_norm_eps)
    return x @ p[f"{pre}/head/kernel"].to(dtype) + p[f"{pre}/head/bias"].to(dtype)


# ---------------------------------------------------------------------------------------------
# Gemma: two experts sharing attention
# ---------------------------------------------------------------------------------------------


def gemma_forward(
    p: dict,
    cfgs: tuple[GemmaConfig, GemmaConfig],
    xs: list[torch.Tensor | None],
    mask: torch.Tensor,
    positions: torch.Tensor,
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor | None], list[tuple[torch.Tensor, torch.Tensor]]]:
    """OpenPI's joint Gemma: xs = [prefix tokens or None, suffix tokens or None], each [B, T_i, width_i].

    Tokens of both experts attend jointly (concatenated in order) to the cache followed by themselves.
    Returns the final-normed outputs and the per-layer (k, v) including the cache.
    """
    lay = "PaliGemma/llm/layers"
    sfx = ("", "_1")
    xs = [None if x is None else x.to(dtype) for x in xs]
    new_cache = []
    head_dim = cfgs[0].head_dim
    for i in range(cfgs[0].depth):
        qs, ks, vs = [], [], []
        for e, x in enumerate(xs):
            if x is None:
                continue
            h = rms_norm(x, p[f"{lay}/pre_attention_norm{sfx[e]}/scale"][i], cfgs[e].rms_eps)
            qs.append(torch.einsum("btd,ndh->btnh", h, p[f"{lay}/attn/q_einsum{sfx[e]}/w"][i].to(dtype)))
            kv = torch.einsum("bsd,ckdh->cbskh", h, p[f"{lay}/attn/kv_einsum{sfx[e]}/w"][i].to(dtype))
            ks.append(kv[0])
            vs.append(kv[1])
        q, k, v = torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)
        q = rope(q, positions, cfgs[0].rope_max_wavelength) * head_dim**-0.5
        k = rope(k, positions, cfgs[0].rope_max_wavelength)
        if kv_cache is not None:
            k = torch.cat([kv_cache[i][0], k], 1)
            v = torch.cat([kv_cache[i][1], v], 1)
        new_cache.append((k, v))
        enc = attention(q.to(dtype), k, v, mask)  # [B, T, N, H]

        start = 0
        out = []
        for e, x in enumerate(xs):
            if x is None:
                out.append(None)
                continue
            end = start + x.shape[1]
            o = torch.einsum("btnh,nhd->btd", enc[:, start:end], p[f"{lay}/attn/attn_vec_einsum{sfx[e]}/w"][i].to(dtype))
            start = end
            x = x + o
            h = rms_norm(x, p[f"{lay}/pre_ffw_norm{sfx[e]}/scale"][i], cfgs[e].rms_eps)
            gating = p[f"{lay}/mlp{sfx[e]}/gating_einsum"][i].to(dtype)  # [2, D, F]
            act = gelu_tanh(h @ gating[0]) * (h @ gating[1])
            out.append(x + act @ p[f"{lay}/mlp{sfx[e]}/linear"][i].to(dtype))
        xs = out
    finals = [
        None if x is None else rms_norm(x, p[f"PaliGemma/llm/final_norm{sfx[e]}/scale"], cfgs[e].rms_eps)
        for e, x in enumerate(xs)
    ]
    return finals, new_cache


# ---------------------------------------------------------------------------------------------
# Pi0
# ---------------------------------------------------------------------------------------------


def _linear(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x.float() @ p[f"{name}/kernel"].float() + p[f"{name}/bias"].float()


class TorchPi0:
    """Pi0 in plain PyTorch. `sample_actions` is the backend call shared by every backend."""

    backend_name = "torch"

    def __init__(self, cfg: Pi0Config, params: dict[str, torch.Tensor], device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        # Stacked expert/vision weights in the compute dtype; small projections kept float32.
        self.params = {
            k: v.to(self.device, torch.float32 if not k.startswith("PaliGemma") else dtype) for k, v in params.items()
        }

    @classmethod
    def from_weights_dir(cls, weights_dir, device="cpu", dtype=torch.float32) -> "TorchPi0":
        from pi0_triton_policy.weights import load_weights

        cfg, params, _ = load_weights(weights_dir)
        return cls(cfg, params, device, dtype)

    # -- pieces -------------------------------------------------------------------------------

    def embed_prefix(self, images, image_mask, tokens, token_mask):
        """-> prefix tokens [B, V*P + L, W], valid [B, V*P + L]."""
        B, V = images.shape[:2]
        img = siglip_forward(self.params, self.cfg.vision, images.reshape(B * V, *images.shape[2:]), self.dtype)
        img = img.reshape(B, V * img.shape[1], -1)
        img_valid = image_mask.bool().repeat_interleave(self.cfg.image_tokens, dim=1)
        table = self.params["PaliGemma/llm/embedder/input_embedding"]
        txt = table[tokens.long()] * torch.tensor(math.sqrt(table.shape[-1]), dtype=table.dtype)
        return torch.cat([img, txt.to(img.dtype)], 1), torch.cat([img_valid, token_mask.bool()], 1)

    def embed_suffix(self, state, x_t, t):
        """-> suffix tokens [B, 1 + H, W] (float32): the state token, then action tokens with time mixed in."""
        p = self.params
        state_tok = _linear(p, "state_proj", state)[:, None, :]
        act = _linear(p, "action_in_proj", x_t)  # [B, H, W]
        temb = time_embedding(t, act.shape[-1])[:, None, :].expand_as(act)
        h = F.silu(_linear(p, "action_time_mlp_in", torch.cat([act, temb], -1)))
        return torch.cat([state_tok, _linear(p, "action_time_mlp_out", h)], 1)

    def suffix_attention_mask(self, prefix_valid):
        B = prefix_valid.shape[0]
        n = self.cfg.suffix_len
        ar = torch.zeros(n, dtype=torch.long, device=prefix_valid.device)
        ar[:2] = 1  # the state token and the first action token each start a new block
        suffix = make_attn_mask(torch.ones(B, n, dtype=torch.bool, device=prefix_valid.device), ar)
        return torch.cat([prefix_valid[:, None, :].expand(B, n, -1), suffix], -1)

    # -- the call -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample_actions_torch(self, images, image_mask, tokens, token_mask, state, noise, num_steps: int = 10):
        """All tensors batched: images [B,V,224,224,3], image_mask [B,V], tokens/token_mask [B,L],
        state [B,32], noise [B,50,32] -> actions [B,50,32] float32."""
        cfgs = (self.cfg.prefix, self.cfg.action)
        prefix, prefix_valid = self.embed_prefix(images, image_mask, tokens, token_mask)
        mask = make_attn_mask(prefix_valid, torch.zeros_like(prefix_valid, dtype=torch.long))
        positions = prefix_valid.long().cumsum(-1) - 1
        _, kv_cache = gemma_forward(self.params, cfgs, [prefix, None], mask, positions, None, self.dtype)

        full_mask = self.suffix_attention_mask(prefix_valid)
        suffix_pos = prefix_valid.long().sum(-1, keepdim=True) + torch.arange(self.cfg.suffix_len, device=self.device)
        # float32 time arithmetic exactly as OpenPI's while-loop: t=1 is noise, step until t < -dt/2.
        dt = np.float32(-1.0 / num_steps)
        t = np.float32(1.0)
        x = noise.float()
        B = x.shape[0]
        while t >= -dt / 2:
            suffix = self.embed_suffix(state.float(), x, torch.full((B,), float(t), device=self.device))
            (_, out), _ = gemma_forward(self.params, cfgs, [None, suffix], full_mask, suffix_pos, kv_cache, self.dtype)
            v = _linear(self.params, "action_out_proj", out[:, -self.cfg.action_horizon :])
            x = x + float(dt) * v
            t = np.float32(t + dt)
        return x

    def sample_actions(self, images, image_mask, tokens, token_mask, state, noise, num_steps: int = 10) -> np.ndarray:
        """The backend call (numpy in, numpy out); a leading batch dimension is optional."""
        batched = np.ndim(state) == 2
        args = [torch.as_tensor(np.asarray(a)).to(self.device) for a in (images, image_mask, tokens, token_mask, state, noise)]
        if not batched:
            args = [a[None] for a in args]
        out = self.sample_actions_torch(*args, num_steps=num_steps).cpu().numpy()
        return out if batched else out[0]
