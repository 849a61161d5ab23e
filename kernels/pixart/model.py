"""PixArt-α DiT (XL/2 and smaller): the model math, in the original checkpoints' parameter names.

Lineage: DiT (facebookresearch/DiT models.py) with PixArt-α's changes (arXiv 2310.00426):
adaLN-single shared by all blocks, an ungated cross-attention on T5 captions, learned sigma, and
(for the 1024-MS model) size/aspect-ratio micro-conditions. Facts: ../shared/specs/pixart.md.

Every layer with weights is built from an `operations` namespace (default `torch.nn`), as ComfyUI's
own model code is, so a caller can hand in casting / offloading / 8-bit layers. This module imports
nothing from ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adaln import modulate

# ---------------------------------------------------------------------------------------------
#                                          Config
# ---------------------------------------------------------------------------------------------

@dataclass
class PixArtConfig:
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8          # learned sigma: 4 ε channels + 4 variance-interpolation channels
    caption_channels: int = 4096   # T5-v1.1-XXL hidden size
    model_max_length: int = 120    # caption tokens (rows of the null caption)
    mlp_ratio: float = 4.0
    sample_size: int = 128         # latent side the checkpoint was trained at (1024 px -> 128)
    pe_interpolation: float = 2.0  # the original's `lewei_scale`: 2 / 1 / 0.5 for 1024 / 512 / 256
    micro_condition: bool = True   # 1024-MS: image-size and aspect-ratio embedders
    null_caption: bool = True      # carries `y_embedder.y_embedding` (original .pth layout only)

    @property
    def base_size(self) -> int:
        """Token-grid side the positional embedding is stretched to."""
        return self.sample_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def pixart_xl2_1024_ms(**overrides) -> PixArtConfig:
    return PixArtConfig(sample_size=128, pe_interpolation=2.0, micro_condition=True, **overrides)


def pixart_xl2_512(**overrides) -> PixArtConfig:
    return PixArtConfig(sample_size=64, pe_interpolation=1.0, micro_condition=False, **overrides)


def pixart_xl2_256(**overrides) -> PixArtConfig:
    return PixArtConfig(sample_size=32, pe_interpolation=0.5, micro_condition=False, **overrides)


# ---------------------------------------------------------------------------------------------
#                         Memory of a forward (what this code allocates)
# ---------------------------------------------------------------------------------------------

# Live activations per token and batch row, in values of the width D: at the MLP the residual stream, its
# norm and modulated copy (3) and fc1's output with its GELU (4 + 4); at the self-attention q/k/v, their
# contiguous copies, the output and its projection (~8); plus the un-patchify copy. Measured in fp32 on
# the CPU (peak RSS over the weights): 11.7 (XL width, patch 2, 16384 tokens) to 18 (the micro model, width
# 144, patch 4, where the latent-sized tensors weigh more) — 16 stays above both.
FORWARD_VALUES_PER_TOKEN = 16
# The positional table, built once per forward (not per row) in float64 as the original does, then kept
# as float32 in a cache: bytes per token and channel.
POS_TABLE_BYTES_PER_VALUE = 24
# A control branch's tensors held across the forward: the ControlNet-Transformer computes its 13 skips
# (each [B, N, D]) before base block 1, plus its own stream; RelaCtrl's lazy skips hold fewer.
CONTROL_VALUES_PER_TOKEN = 14


def forward_bytes(cfg: "PixArtConfig", batch: int, latent_h: int, latent_w: int, dtype_bytes: int,
                  control: bool = False) -> int:
    """Bytes one forward allocates beyond the weights for a [batch, C, latent_h, latent_w] latent (the
    constants above): what the MODEL's refusal and ComfyUI's batching (memory_required) go by."""
    tokens = (latent_h // cfg.patch_size) * (latent_w // cfg.patch_size)
    per_row = FORWARD_VALUES_PER_TOKEN + (CONTROL_VALUES_PER_TOKEN if control else 0)
    return tokens * cfg.hidden_size * (per_row * batch * dtype_bytes + POS_TABLE_BYTES_PER_VALUE)


PIXART_VARIANTS = {
    "PixArt-XL-2-1024-MS": pixart_xl2_1024_ms,
    "PixArt-XL-2-512x512": pixart_xl2_512,
    "PixArt-XL-2-256x256": pixart_xl2_256,
}


# ---------------------------------------------------------------------------------------------
#                        Sinusoids and the 2-D positional embedding
# ---------------------------------------------------------------------------------------------

def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[N] -> [N, dim] in float32, cos half first (DiT's TimestepEmbedder order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] as concat(sin, cos), computed in float64 like the numpy original."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


_POS_CACHE: dict = {}


def pos_embed_2d(dim: int, h: int, w: int, base_size: int, interpolation: float,
                 device=None) -> torch.Tensor:
    """[h*w, dim] float32 table; coordinates stretched to [0, base_size/interpolation) on both axes."""
    key = (dim, h, w, base_size, float(interpolation), str(device))
    table = _POS_CACHE.get(key)
    if table is None:
        # float32 grids, as the original builds them with np.float32 before the float64 sinusoid
        grid_h = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation
        grid_w = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation
        gh, gw = torch.meshgrid(grid_h, grid_w, indexing="ij")  # row-major token order
        table = torch.cat([_sincos_1d(dim // 2, gw.reshape(-1)), _sincos_1d(dim // 2, gh.reshape(-1))], dim=1)
        table = table.float()
        if len(_POS_CACHE) > 64:
            _POS_CACHE.clear()
        _POS_CACHE[key] = table
    return table


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (all PixArt norms)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _cast(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bare parameters (not inside an `operations` layer) follow the activations' dtype/device."""
    return p.to(dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
#                                       Embedding layers
# ---------------------------------------------------------------------------------------------

class PixArtPatchEmbed(nn.Module):
    """Latent [B, C, H, W] -> tokens [B, (H/p)(W/p), D], row-major (upstream: timm's `PatchEmbed`)."""

    def __init__(self, cfg: PixArtConfig, ops, **kw):
        super().__init__()
        p = cfg.patch_size
        self.proj = ops.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p, bias=True, **kw)

    def forward(self, x):
        # contiguous once here: a transposed token layout would make every later norm and GEMM copy
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) -> Linear -> SiLU -> Linear: DiT's TimestepEmbedder, also PixArt's size embedders."""

    def __init__(self, out_dim: int, ops, freq_dim: int = 256, **kw):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(ops.Linear(freq_dim, out_dim, **kw), nn.SiLU(), ops.Linear(out_dim, out_dim, **kw))

    def forward(self, values: torch.Tensor, dtype) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(values, self.freq_dim).to(dtype))


class SizeEmbedder(TimestepEmbedder):
    """[B, k] micro-condition values -> [B, k * out_dim], each value embedded on its own."""

    def forward(self, values: torch.Tensor, dtype) -> torch.Tensor:
        b, k = values.shape
        return super().forward(values.reshape(-1), dtype).reshape(b, -1)


class PixArtCaptionEmbedder(nn.Module):
    """T5 features [B, L, 4096] -> [B, L, D]; holds the learned null caption when the file has it
    (upstream: PixArt_blocks.py `CaptionEmbedder`)."""

    def __init__(self, cfg: PixArtConfig, ops, **kw):
        super().__init__()
        d = cfg.hidden_size
        self.y_proj = nn.Module()
        self.y_proj.fc1 = ops.Linear(cfg.caption_channels, d, **kw)
        self.y_proj.fc2 = ops.Linear(d, d, **kw)
        if cfg.null_caption:
            # a buffer in the original (never trained by the optimizer), so it can only come from the file
            self.register_buffer("y_embedding", torch.empty(cfg.model_max_length, cfg.caption_channels,
                                                            device=kw.get("device"), dtype=kw.get("dtype")))

    def forward(self, y):
        return self.y_proj.fc2(F.gelu(self.y_proj.fc1(y), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
#                                      Transformer block
# ---------------------------------------------------------------------------------------------

class PixArtSelfAttention(nn.Module):
    """Fused-qkv multi-head attention, no mask (upstream: PixArt_blocks.py `WindowAttention`, no windows and no
    relative positions in the released models)."""

    def __init__(self, cfg: PixArtConfig, ops, **kw):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = ops.Linear(cfg.hidden_size, 3 * cfg.hidden_size, **kw)  # one fused GEMM
        self.proj = ops.Linear(cfg.hidden_size, cfg.hidden_size, **kw)

    def forward(self, x):                                        # x: [B, N, D]
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)            # [B, heads, N, hd], flash path on CPU
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    def __init__(self, cfg: PixArtConfig, ops, **kw):
        super().__init__()
        self.heads = cfg.num_heads
        self.q_linear = ops.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.kv_linear = ops.Linear(cfg.hidden_size, 2 * cfg.hidden_size, **kw)
        self.proj = ops.Linear(cfg.hidden_size, cfg.hidden_size, **kw)

    def forward(self, x, y, key_mask: Optional[torch.Tensor]):  # x: [B, N, D], y: [B, L, D]
        b, n, d = x.shape
        hd = d // self.heads
        q = self.q_linear(x).view(b, n, self.heads, hd).transpose(1, 2)
        k, v = self.kv_linear(y).view(b, y.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        # key_mask [B, 1, 1, L] (True = attend): each sample sees only its own valid caption tokens,
        # the same as the original's block-diagonal xformers mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class PixArtMLP(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (upstream: timm's `Mlp`)."""

    def __init__(self, cfg: PixArtConfig, ops, **kw):
        super().__init__()
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        self.fc1 = ops.Linear(cfg.hidden_size, hidden, **kw)
        self.fc2 = ops.Linear(hidden, cfg.hidden_size, **kw)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PixArtBlock(nn.Module):
    """adaLN-single block: gated self-attention, ungated un-normed cross-attention, gated MLP."""

    def __init__(self, cfg: PixArtConfig, ops, **kw):
        super().__init__()
        self.attn = PixArtSelfAttention(cfg, ops, **kw)
        self.cross_attn = CrossAttention(cfg, ops, **kw)
        self.mlp = PixArtMLP(cfg, ops, **kw)
        self.scale_shift_table = nn.Parameter(torch.empty(6, cfg.hidden_size, **kw))

    def forward(self, x, t0, y, key_mask):                   # t0: [B, 6, D]
        mod = _cast(self.scale_shift_table, x)[None] + t0
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        x = torch.addcmul(x, gate1[:, None], self.attn(modulate(_layer_norm(x), shift1[:, None], scale1[:, None])))
        x = x + self.cross_attn(x, y, key_mask)
        x = torch.addcmul(x, gate2[:, None], self.mlp(modulate(_layer_norm(x), shift2[:, None], scale2[:, None])))
        return x


class FinalLayer(nn.Module):
    """Modulated by t (before t_block), not t0: a quirk the released weights depend on."""

    def __init__(self, cfg: PixArtConfig, ops, **kw):
        super().__init__()
        p = cfg.patch_size
        # an ops namespace may keep the output projection apart (kernels/int8.py Int8Ops.OutputLinear)
        self.linear = getattr(ops, "OutputLinear", ops.Linear)(cfg.hidden_size, p * p * cfg.out_channels, **kw)
        self.scale_shift_table = nn.Parameter(torch.empty(2, cfg.hidden_size, **kw))

    def forward(self, x, t):
        shift, scale = (_cast(self.scale_shift_table, x)[None] + t[:, None]).unbind(1)
        return self.linear(modulate(_layer_norm(x), shift[:, None], scale[:, None]))


# ---------------------------------------------------------------------------------------------
#                                         The model
# ---------------------------------------------------------------------------------------------

@dataclass
class BlockContext:
    """What every block of a forward shares; ControlNet branches run on it too."""
    t0: torch.Tensor                    # [B, 6, D] adaLN-single modulation
    y: torch.Tensor                     # [B, L, D] projected caption
    key_mask: Optional[torch.Tensor]    # [B, 1, 1, L] bool, or None when every token is valid
    grid: tuple                         # token grid (h, w)


# A control branch sees the tokens after base block 0 and returns additions to the inputs of
# later base blocks: {block index: [B, N, D]}. ControlNet-Transformer plugs in here. An addition may
# also be a callable `tokens -> [B, N, D]`, evaluated when the forward reaches that block (in block
# order) with the tokens entering it: RelaCtrl's branch reads the base stream at several depths.
ControlFn = Callable[["PixArt", torch.Tensor, BlockContext], dict]


class PixArt(nn.Module):
    """PixArt-α / PixArtMS. forward(latent, t, caption) -> [B, out_channels, H, W]."""

    def __init__(self, cfg: PixArtConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.config = cfg
        kw = dict(dtype=dtype, device=device)
        ops = operations
        d = cfg.hidden_size
        self.x_embedder = PixArtPatchEmbed(cfg, ops, **kw)
        self.t_embedder = TimestepEmbedder(d, ops, **kw)
        self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(d, 6 * d, **kw))
        self.y_embedder = PixArtCaptionEmbedder(cfg, ops, **kw)
        if cfg.micro_condition:
            self.csize_embedder = SizeEmbedder(d // 3, ops, **kw)
            self.ar_embedder = SizeEmbedder(d // 3, ops, **kw)
        self.blocks = nn.ModuleList(PixArtBlock(cfg, ops, **kw) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, ops, **kw)

    # -- pieces, shared with ControlNet branches --------------------------------------------------

    def embed_latent(self, latent: torch.Tensor, dtype) -> torch.Tensor:
        """Patch tokens plus the positional table computed for this latent's size."""
        cfg = self.config
        h, w = latent.shape[-2] // cfg.patch_size, latent.shape[-1] // cfg.patch_size
        tokens = self.x_embedder(latent.to(dtype))
        pos = pos_embed_2d(cfg.hidden_size, h, w, cfg.base_size, cfg.pe_interpolation, device=latent.device)
        return tokens + pos.to(tokens.dtype)

    def embed_conditions(self, timestep, caption, caption_mask, img_hw, aspect_ratio, batch, dtype):
        """-> (t [B, D], BlockContext without grid)."""
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
        t = self.t_embedder(timestep, dtype)
        if self.config.micro_condition:
            # the original is fed pixel sizes (H, W) and the aspect ratio H/W
            t = t + torch.cat([self.csize_embedder(img_hw, dtype), self.ar_embedder(aspect_ratio, dtype)], dim=1)
        t0 = self.t_block(t).view(batch, 6, -1)
        if caption.ndim == 4:                         # original layout [B, 1, L, C]
            caption = caption[:, 0]
        y = self.y_embedder(caption.to(dtype))
        key_mask = None
        if caption_mask is not None:
            m = caption_mask.reshape(caption_mask.shape[0], -1).to(device=y.device) != 0
            if not bool(m.all()):                     # all-valid: stay on the unmasked SDPA path
                key_mask = m[:, None, None, :]
        return t, BlockContext(t0=t0, y=y, key_mask=key_mask, grid=(0, 0))

    def unpatchify(self, x, h, w):
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor,
                caption_mask: Optional[torch.Tensor] = None, img_hw: Optional[torch.Tensor] = None,
                aspect_ratio: Optional[torch.Tensor] = None, control: Optional[ControlFn] = None,
                dtype=None) -> torch.Tensor:
        """x [B, C, H, W]; timestep [B] (DDPM index 0..999); caption [B, L, C] or [B, 1, L, C];
        caption_mask [B, L] (1 = valid); img_hw [B, 2] pixels (H, W); aspect_ratio [B, 1] (H/W)."""
        cfg = self.config
        dtype = dtype or x.dtype
        b, _, hl, wl = x.shape
        h, w = hl // cfg.patch_size, wl // cfg.patch_size
        if cfg.micro_condition:
            if img_hw is None:
                img_hw = torch.tensor([[hl * 8.0, wl * 8.0]], device=x.device).expand(b, 2)
            if aspect_ratio is None:
                aspect_ratio = torch.tensor([[hl / wl]], device=x.device).expand(b, 1)
            img_hw = img_hw.to(x.device).float().reshape(-1, 2).expand(b, 2)
            aspect_ratio = aspect_ratio.to(x.device).float().reshape(-1, 1).expand(b, 1)
        tokens = self.embed_latent(x, dtype)
        t, ctx = self.embed_conditions(timestep.to(x.device), caption, caption_mask, img_hw, aspect_ratio, b, dtype)
        ctx.grid = (h, w)

        tokens = self.blocks[0](tokens, ctx.t0, ctx.y, ctx.key_mask)
        skips = control(self, tokens, ctx) if control is not None else {}
        for i in range(1, len(self.blocks)):
            if i in skips:
                add = skips[i]
                tokens = tokens + (add(tokens) if callable(add) else add)
            tokens = self.blocks[i](tokens, ctx.t0, ctx.y, ctx.key_mask)
        out = self.final_layer(tokens, t)
        return self.unpatchify(out, h, w)
