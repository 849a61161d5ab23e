"""A minimal pure-PyTorch FLUX.1 in ComfyUI's native (= BFL `flux1-dev.safetensors`) parameter names.

Lineage: black-forest-labs/flux `model.py` / `layers.py`, as ComfyUI keeps them in `comfy/ldm/flux`:
19 double-stream blocks (separate text and image weights, joint attention), 38 single-stream blocks
(one fused [q; k; v; mlp] projection over [text, image]), RoPE over (index, row, column) ids, adaLN
modulation from vec = time + guidance + pooled text. Facts: ../shared/specs/easycontrol.md.

The blocks here only hold parameters; their maths is `blocks.double_block` / `blocks.single_block`,
which read a block by attribute name — the same functions run on ComfyUI's own block modules. So this
model is the standalone host of the EasyControl kernel (and its test double of core's Flux), not a
second implementation of it.

Layers with weights come from an `operations` namespace (default `torch.nn`); the q/k RMSNorm scales
are bare parameters named `scale` as in the released files, cast to the activations' dtype. Nothing
here imports ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from . import blocks
from .primitives import EmbedND

# ---------------------------------------------------------------------------------------------
#                                          Config
# ---------------------------------------------------------------------------------------------

@dataclass
class FluxConfig:
    """Defaults: FLUX.1-dev."""
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19                 # double-stream blocks
    depth_single_blocks: int = 38
    in_channels: int = 16           # latent channels (the model sees 2x2 patches: 64 per token)
    out_channels: int = 16
    patch_size: int = 2
    context_in_dim: int = 4096      # T5-XXL
    vec_in_dim: Optional[int] = 768  # CLIP-L pooled; None: no vector_in
    mlp_ratio: float = 4.0
    axes_dim: list = field(default_factory=lambda: [16, 56, 56])
    theta: float = 10000.0
    qkv_bias: bool = True
    guidance_embed: bool = True     # FLUX.1-dev (distilled guidance); schnell has none

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# ---------------------------------------------------------------------------------------------
#                                          Layers
# ---------------------------------------------------------------------------------------------

class FluxRMSNorm(nn.Module):
    """q/k RMSNorm over a head, eps 1e-6, computed in float32; the weight is named `scale` (upstream: BFL's
    `RMSNorm`)."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), x.shape[-1:], eps=1e-6).to(x.dtype)
        return y * self.scale.to(dtype=x.dtype, device=x.device)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, **kw):
        super().__init__()
        self.query_norm = FluxRMSNorm(head_dim, **kw)
        self.key_norm = FluxRMSNorm(head_dim, **kw)


class FluxSelfAttention(nn.Module):
    """Parameter holder: fused qkv, q/k norms, output projection (the maths is in blocks.py; upstream: BFL's
    `SelfAttention`)."""

    def __init__(self, cfg: FluxConfig, ops, **kw):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = ops.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias, **kw)
        self.norm = QKNorm(cfg.head_dim, **kw)
        self.proj = ops.Linear(cfg.hidden_size, cfg.hidden_size, **kw)


class Modulation(nn.Module):
    """adaLN: `lin(silu(vec))` -> 6 (double) or 3 (single) [B, 1, D] chunks; see primitives.modulation."""

    def __init__(self, dim: int, multiplier: int, ops, **kw):
        super().__init__()
        self.multiplier = multiplier
        self.lin = ops.Linear(dim, multiplier * dim, **kw)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, ops, **kw):
        super().__init__()
        self.in_layer = ops.Linear(in_dim, hidden_dim, **kw)
        self.out_layer = ops.Linear(hidden_dim, hidden_dim, **kw)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


def _layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(cfg: FluxConfig, ops, **kw) -> nn.Sequential:
    # indices 0 and 2 are the released names (img_mlp.0 / img_mlp.2)
    return nn.Sequential(ops.Linear(cfg.hidden_size, cfg.mlp_hidden_dim, **kw), nn.GELU(approximate="tanh"),
                         ops.Linear(cfg.mlp_hidden_dim, cfg.hidden_size, **kw))


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig, ops, **kw):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.hidden_size = d
        self.img_mod = Modulation(d, 6, ops, **kw)
        self.img_norm1 = _layer_norm(d)
        self.img_attn = FluxSelfAttention(cfg, ops, **kw)
        self.img_norm2 = _layer_norm(d)
        self.img_mlp = _mlp(cfg, ops, **kw)
        self.txt_mod = Modulation(d, 6, ops, **kw)
        self.txt_norm1 = _layer_norm(d)
        self.txt_attn = FluxSelfAttention(cfg, ops, **kw)
        self.txt_norm2 = _layer_norm(d)
        self.txt_mlp = _mlp(cfg, ops, **kw)

    def forward(self, img, txt, vec, pe, run=None, index: int = 0):
        return blocks.double_block(self, img, txt, vec, pe, run=run, index=index)


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig, ops, **kw):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.hidden_size = d
        self.mlp_hidden_dim = cfg.mlp_hidden_dim
        self.linear1 = ops.Linear(d, 3 * d + self.mlp_hidden_dim, **kw)   # [q; k; v; mlp_in]
        self.linear2 = ops.Linear(d + self.mlp_hidden_dim, d, **kw)       # [attn; mlp_out] -> D
        self.norm = QKNorm(cfg.head_dim, **kw)
        self.pre_norm = _layer_norm(d)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(d, 3, ops, **kw)

    def forward(self, x, vec, pe, run=None, index: int = 0):
        return blocks.single_block(self, x, vec, pe, run=run, index=index)


class LastLayer(nn.Module):
    """adaLN_modulation gives [shift, scale] (diffusers' norm_out has them the other way round)."""

    def __init__(self, cfg: FluxConfig, ops, **kw):
        super().__init__()
        p = cfg.patch_size
        self.norm_final = _layer_norm(cfg.hidden_size)
        self.linear = ops.Linear(cfg.hidden_size, p * p * cfg.out_channels, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(cfg.hidden_size, 2 * cfg.hidden_size, **kw))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))


# ---------------------------------------------------------------------------------------------
#                                         The model
# ---------------------------------------------------------------------------------------------

def pack_latents(z: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> tokens [B, (H/p)(W/p), C·p·p], row-major (= diffusers' _pack_latents)."""
    if z.shape[-2] % patch or z.shape[-1] % patch:
        raise ValueError(f"latent {tuple(z.shape)}: height and width must be multiples of {patch}")
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Inverse of pack_latents for a latent of h × w (latent pixels)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // patch, w=w // patch, ph=patch, pw=patch)


def grid_ids(h: int, w: int, row_offset: float = 0.0, row_scale: float = 1.0, col_scale: float = 1.0,
             device=None) -> torch.Tensor:
    """(0, row, col) ids of an h × w token grid, row-major, [h·w, 3] float32."""
    rows = torch.arange(h, dtype=torch.float64, device=device) * row_scale + row_offset
    cols = torch.arange(w, dtype=torch.float64, device=device) * col_scale
    ids = torch.zeros(h, w, 3, dtype=torch.float64, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(h * w, 3).float()


class Flux(nn.Module):
    """forward(x [B, C, H, W], σ [B], context [B, L, 4096], y [B, 768], guidance [B]) -> velocity [B, C, H, W].

    Same call as ComfyUI's `Flux.forward` (σ in [0, 1], multiplied by 1000 for the sinusoid; distilled
    guidance as the plain scale, e.g. 3.5). `conditions` (a `condition.EasyControl`) adds its condition
    tokens; `condition_key` separates banks that must not be shared (e.g. CFG branches)."""

    def __init__(self, cfg: FluxConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.config = cfg
        kw = dict(dtype=dtype, device=device)
        ops = operations
        d, p = cfg.hidden_size, cfg.patch_size
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise ValueError(f"RoPE axes {cfg.axes_dim} must add up to the head width {cfg.head_dim}")
        self.pe_embedder = EmbedND(cfg.head_dim, cfg.theta, cfg.axes_dim)
        self.img_in = ops.Linear(cfg.in_channels * p * p, d, **kw)
        self.time_in = MLPEmbedder(256, d, ops, **kw)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d, ops, **kw) if cfg.vec_in_dim else None
        self.guidance_in = MLPEmbedder(256, d, ops, **kw) if cfg.guidance_embed else None
        self.txt_in = ops.Linear(cfg.context_in_dim, d, **kw)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg, ops, **kw) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg, ops, **kw) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(cfg, ops, **kw)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: Optional[torch.Tensor] = None,
                guidance: Optional[torch.Tensor] = None, conditions=None, condition_key=None,
                dtype=None) -> torch.Tensor:
        cfg = self.config
        p = cfg.patch_size
        dtype = dtype or self.img_in.weight.dtype
        b, _, h0, w0 = x.shape
        # as ComfyUI: pad to whole patches (circular), crop the output back
        x = F.pad(x, (0, (-w0) % p, 0, (-h0) % p), mode="circular") if (h0 % p or w0 % p) else x
        h, w = x.shape[-2:]
        img = self.img_in(pack_latents(x, p).to(dtype))                    # [B, N, D]
        timestep = timestep.reshape(-1).expand(b) if timestep.numel() == 1 else timestep.reshape(-1)
        if guidance is not None:
            guidance = guidance.reshape(-1).expand(b) if guidance.numel() == 1 else guidance.reshape(-1)
        vec = blocks.embed_vector(self, timestep, y, guidance, dtype)       # [B, D]
        txt = self.txt_in(context.to(dtype))                               # [B, T, D]

        img_ids = grid_ids(h // p, w // p, device=x.device)
        txt_ids = torch.zeros(txt.shape[1], 3, device=x.device)
        pe = self.pe_embedder(torch.cat([txt_ids, img_ids])[None]).expand(b, -1, -1, -1, -1, -1)

        run = None
        if conditions is not None:
            run = conditions.begin(self, y=y, guidance=guidance, noise_hw=(h, w), batch=b, dtype=dtype,
                                   extra_key=condition_key)
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, pe, run=run, index=i)
        x_seq = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            x_seq = block(x_seq, vec, pe, run=run, index=i)
        out = self.final_layer(x_seq[:, txt.shape[1]:], vec)               # noise tokens only
        return unpack_latents(out, h, w, p)[:, :, :h0, :w0]
