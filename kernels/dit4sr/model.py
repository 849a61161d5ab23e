"""DiT4SR: the SD3.5-medium MMDiT with a low-resolution (LR) stream, in the released diffusers parameter names.

Lineage: SD3 / SD3.5 MMDiT (arXiv 2403.03206; diffusers `SD3Transformer2DModel`, SD3.5's dual attention and
q/k RMSNorm), with DiT4SR's changes (adam-duan/DiT4SR, read through jinlovespho/DiT4SR@9f4baffa): the LR latent
is a second image stream `[noise N | LR N]` through the same patch embedding, attention layers with control
projections for the LR half (`AttentionZero`), and a depthwise conv from the LR half into the noise half inside
the feed-forward (`FeedForwardControl`). Facts and quirks: ../shared/specs/dit4sr.md.

The released weights depend on three quirks, reproduced here on purpose:
- the LR keys are `norm_k(norm_k(to_k(noise half)))` (upstream normalises the already-normed noise keys), so
  `to_k_control` is loaded but never computed;
- the LR attention output gets an internal residual with the modulated LR input before `to_out_control`;
- the cross-stream conv output is added to the noise half ×1.2 (a later fork uses 1.0).

Every layer with weights is built from an `operations` namespace (default `torch.nn`), as ComfyUI's own model
code is; the few bare parameters (RMSNorm scales) follow the activations' dtype. Nothing here imports ComfyUI.
The layers named `MMDiT…` are SD3's own, unchanged (diffusers' class of the name without the prefix); DiT4SR's
changes keep its upstream names.

Tiling of large latents (the reference runs only square tiles of ≤ 64 latent) lives in `tiling.py`;
`DiT4SR.forward` takes a `TileSettings` and does it inside the call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adaln import modulate_tokens
from .tiling import TileSettings, run_tiled, tile_layout

# The cross-stream conv factor of the initial release (the weights were trained with it).
CONTROL_CONV_FACTOR = 1.2


# ---------------------------------------------------------------------------------------------
#                                          Config
# ---------------------------------------------------------------------------------------------

@dataclass
class DiT4SRConfig:
    """Defaults: the released model (SD3.5-medium + LR stream). Read from the weights by `checkpoint.infer_config`."""
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    joint_attention_dim: int = 4096       # CLIP-L + CLIP-G + T5-XXL token width
    pooled_projection_dim: int = 2048     # CLIP-L + CLIP-G pooled
    pos_embed_max_size: int = 384         # side of the stored sin-cos table, in patches
    ff_inner_dim: int = 6144
    dual_attention_layers: tuple = tuple(range(13))   # blocks with `attn2` (SD3.5's MMDiT-X)
    sample_size: int = 128                # trained latent side (config.json; not used by the forward)
    conv_factor: float = CONTROL_CONV_FACTOR

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def is_dual(self, i: int) -> bool:
        return i in self.dual_attention_layers

    def is_last(self, i: int) -> bool:
        """The last block is `context_pre_only`: it reads the text but no longer updates it."""
        return i == self.num_layers - 1


# ---------------------------------------------------------------------------------------------
#                                        Small pieces
# ---------------------------------------------------------------------------------------------

def sd3_timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] (SD3 units, 0..1000) -> [B, dim], cos half first (diffusers `Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)`). Computed in float64: it costs nothing and removes the float32 island that
    moves diffusers' own output by ~2e-6."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (every MMDiT norm)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class MMDiTRMSNorm(nn.Module):
    """Per-head RMSNorm with a learned scale (q/k norms), eps 1e-6; the mean square in float32 as diffusers
    (upstream: diffusers' `RMSNorm`)."""

    def __init__(self, dim: int, **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, **kw))

    def forward(self, x):                                          # x: [B, heads, S, hd]
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.weight.to(dtype=x.dtype, device=x.device)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads*hd] -> [B, heads, S, hd]."""
    b, s, d = x.shape
    return x.view(b, s, heads, d // heads).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
#                                       Embedding layers
# ---------------------------------------------------------------------------------------------

class MMDiTPatchEmbed(nn.Module):
    """Latent [B, C, H, W] -> tokens [B, (H/p)(W/p), D] plus the centre crop of the stored sin-cos table
    (upstream: diffusers' `PatchEmbed` with `pos_embed_max_size`).

    The table is the file's own `pos_embed.pos_embed` (a persistent buffer in diffusers, F16 in the release):
    using the stored values keeps us on exactly the numbers the reference adds. Noise and LR latents both go
    through here, so LR token k gets the same position as noise token k."""

    def __init__(self, cfg: DiT4SRConfig, ops, **kw):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.max_size = cfg.pos_embed_max_size
        self.proj = ops.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                               stride=cfg.patch_size, bias=True, **kw)
        self.register_buffer("pos_embed", torch.empty(1, cfg.pos_embed_max_size ** 2, cfg.hidden_size, **kw))

    def cropped_table(self, h: int, w: int) -> torch.Tensor:
        """[1, h*w, D]: the centre h×w window of the max_size × max_size table, row-major."""
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"DiT4SR: a {h}×{w}-patch grid is larger than the positional table "
                             f"({self.max_size}×{self.max_size} patches); tile the latent (TileSettings)")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)
        return table[:, top:top + h, left:left + w, :].reshape(1, h * w, -1)

    def forward(self, latent):
        h, w = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        tokens = self.proj(latent).flatten(2).transpose(1, 2)     # [B, h*w, D]
        return tokens + self.cropped_table(h, w).to(dtype=tokens.dtype, device=tokens.device)


class TimestepEmbedding(nn.Module):
    """in -> Linear -> SiLU -> Linear (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection(act='silu')`)."""

    def __init__(self, in_dim: int, out_dim: int, ops, **kw):
        super().__init__()
        self.linear_1 = ops.Linear(in_dim, out_dim, **kw)
        self.linear_2 = ops.Linear(out_dim, out_dim, **kw)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoid(t)) + MLP(pooled): the one conditioning vector every AdaLN reads."""

    def __init__(self, cfg: DiT4SRConfig, ops, **kw):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, cfg.hidden_size, ops, **kw)
        self.text_embedder = TimestepEmbedding(cfg.pooled_projection_dim, cfg.hidden_size, ops, **kw)

    def forward(self, timestep, pooled, dtype):
        return self.timestep_embedder(sd3_timestep_sinusoid(timestep).to(dtype)) + self.text_embedder(pooled.to(dtype))


class AdaLN(nn.Module):
    """SiLU -> Linear -> `chunks` [B, D] modulation vectors (diffusers AdaLayerNormZero = 6, SD35AdaLayerNormZeroX
    = 9, AdaLayerNormContinuous = 2). The chunk order is the caller's to name."""

    def __init__(self, dim: int, chunks: int, ops, **kw):
        super().__init__()
        self.chunks = chunks
        self.linear = ops.Linear(dim, chunks * dim, **kw)

    def forward(self, temb):
        return self.linear(F.silu(temb)).chunk(self.chunks, dim=1)


# ---------------------------------------------------------------------------------------------
#                                   AttentionZero (attn, attn2)
# ---------------------------------------------------------------------------------------------

class AttentionZero(nn.Module):
    """Joint attention over [noise | LR | text] (`with_text`) or [noise | LR] (attn2).

    Noise half: the base projections. LR half: `W_c(W x + b) + b_c` for q and v (control after base), keys
    = the noise keys RMS-normed again (upstream bug the weights were trained with; `to_k_control` is held so the
    key exists, but it never changes the output, so it is not computed). LR output: `to_out_control(o + x_lr)`.

    `attn2` in the release also carries add_{q,k,v}_proj / to_add_out / norm_added_*: never read, not built here
    (checkpoint.DEAD_TENSOR_PARTS)."""

    def __init__(self, cfg: DiT4SRConfig, ops, with_text: bool, text_out: bool, **kw):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads = cfg.num_heads
        self.with_text = with_text
        self.to_q = ops.Linear(d, d, **kw)
        self.to_k = ops.Linear(d, d, **kw)
        self.to_v = ops.Linear(d, d, **kw)
        self.to_out = nn.ModuleList([ops.Linear(d, d, **kw)])      # diffusers' to_out.0 (to_out.1 is dropout)
        self.norm_q = MMDiTRMSNorm(hd, **kw)
        self.norm_k = MMDiTRMSNorm(hd, **kw)
        if with_text:
            self.add_q_proj = ops.Linear(d, d, **kw)
            self.add_k_proj = ops.Linear(d, d, **kw)
            self.add_v_proj = ops.Linear(d, d, **kw)
            self.norm_added_q = MMDiTRMSNorm(hd, **kw)
            self.norm_added_k = MMDiTRMSNorm(hd, **kw)
            if text_out:                                           # absent in the context_pre_only last block
                self.to_add_out = ops.Linear(d, d, **kw)
        self.to_q_control = ops.Linear(d, d, **kw)
        self.to_k_control = ops.Linear(d, d, **kw)                 # trained, loaded, has no effect (quirk)
        self.to_v_control = ops.Linear(d, d, **kw)
        self.to_out_control = ops.Linear(d, d, **kw)

    def forward(self, h: torch.Tensor, text: Optional[torch.Tensor] = None):
        """h: [B, 2N, D] modulated [noise | LR]; text: [B, L, D] modulated text (attn only).
        -> ([B, 2N, D], [B, L, D] or None)."""
        n = h.shape[1] // 2
        xn, xl = h[:, :n], h[:, n:]
        q, v = self.to_q(h), self.to_v(h)                          # base projections of both halves: one GEMM each
        q_n = self.norm_q(_heads(q[:, :n], self.heads))
        k_n = self.norm_k(_heads(self.to_k(xn), self.heads))       # to_k of the LR half is never needed
        v_n = _heads(v[:, :n], self.heads)
        q_l = self.norm_q(_heads(self.to_q_control(q[:, n:]), self.heads))
        k_l = self.norm_k(k_n)                                     # norm_k twice on the noise keys (quirk)
        v_l = _heads(self.to_v_control(v[:, n:]), self.heads)
        qs, ks, vs = [q_n, q_l], [k_n, k_l], [v_n, v_l]
        if self.with_text:
            qs.append(self.norm_added_q(_heads(self.add_q_proj(text), self.heads)))
            ks.append(self.norm_added_k(_heads(self.add_k_proj(text), self.heads)))
            vs.append(_heads(self.add_v_proj(text), self.heads))
        o = F.scaled_dot_product_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
        b, heads, s, hd = o.shape
        o = o.transpose(1, 2).reshape(b, s, heads * hd)            # [B, 2N (+L), D]
        out_n = self.to_out[0](o[:, :n])
        out_l = self.to_out_control(o[:, n:2 * n] + xl)            # internal residual with the modulated LR input
        out_t = None
        if self.with_text and hasattr(self, "to_add_out"):
            out_t = self.to_add_out(o[:, 2 * n:])
        return torch.cat([out_n, out_l], dim=1), out_t


# ---------------------------------------------------------------------------------------------
#                                       Feed-forward layers
# ---------------------------------------------------------------------------------------------

class GELUProj(nn.Module):
    """diffusers `GELU(approximate='tanh')`: the projection is its `.proj`."""

    def __init__(self, dim: int, inner: int, ops, **kw):
        super().__init__()
        self.proj = ops.Linear(dim, inner, **kw)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class MMDiTFeedForward(nn.Module):
    """net.0 (Linear + GELU-tanh), net.1 (dropout: nothing at inference), net.2 (Linear) (upstream: diffusers'
    `FeedForward`)."""

    def __init__(self, cfg: DiT4SRConfig, ops, **kw):
        super().__init__()
        d, inner = cfg.hidden_size, cfg.ff_inner_dim
        self.net = nn.ModuleList([GELUProj(d, inner, ops, **kw), nn.Identity(), ops.Linear(inner, d, **kw)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class FeedForwardControl(MMDiTFeedForward):
    """The image streams' FF: after GELU, a depthwise 3×3 conv over the LR half (on its token grid) is added
    ×conv_factor to the noise half; the LR half itself goes on unchanged into the shared net.2.

    Upstream reshapes the LR tokens to sqrt(N) × sqrt(N) and asserts that is exact, so it only runs square grids
    (and silently mixes wrong neighbours when a non-square N is a perfect square, e.g. 8×18). Here the conv runs
    on the true (h, w) grid: identical to upstream on square grids; on non-square grids it is our extension
    (the golden's `ns_out_truegrid_EXTENSION`)."""

    def __init__(self, cfg: DiT4SRConfig, ops, **kw):
        super().__init__(cfg, ops, **kw)
        inner = cfg.ff_inner_dim
        self.factor = cfg.conv_factor
        self.control_conv = ops.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner, bias=True, **kw)

    def forward(self, x, grid: tuple):
        g = self.net[0](x)                                          # [B, 2N, F]
        n = g.shape[1] // 2
        h, w = grid
        g_n, g_l = g[:, :n], g[:, n:]
        conv = self.control_conv(g_l.transpose(1, 2).reshape(g.shape[0], -1, h, w))   # [B, F, h, w]
        g_n = g_n + self.factor * conv.flatten(2).transpose(1, 2)
        return self.net[2](torch.cat([g_n, g_l], dim=1))


# ---------------------------------------------------------------------------------------------
#                                       Transformer block
# ---------------------------------------------------------------------------------------------

class JointBlock(nn.Module):
    """One MMDiT block with the LR stream. Both image halves share one AdaLN modulation, one gate, one
    LayerNorm; `attn2` (dual blocks) attends over [noise | LR] without text; the last block only reads the text."""

    def __init__(self, cfg: DiT4SRConfig, index: int, ops, **kw):
        super().__init__()
        d = cfg.hidden_size
        self.dual = cfg.is_dual(index)
        self.context_pre_only = cfg.is_last(index)
        self.norm1 = AdaLN(d, 9 if self.dual else 6, ops, **kw)
        self.norm1_context = AdaLN(d, 2 if self.context_pre_only else 6, ops, **kw)
        self.attn = AttentionZero(cfg, ops, with_text=True, text_out=not self.context_pre_only, **kw)
        if self.dual:
            self.attn2 = AttentionZero(cfg, ops, with_text=False, text_out=False, **kw)
        self.ff = FeedForwardControl(cfg, ops, **kw)
        if not self.context_pre_only:
            self.ff_context = MMDiTFeedForward(cfg, ops, **kw)

    def forward(self, x, c, temb, grid):
        """x: [B, 2N, D] image tokens [noise | LR]; c: [B, L, D] text; temb: [B, D]. -> (x, c or None)."""
        mod = self.norm1(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        xn = _layer_norm(x)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb)             # AdaLayerNormContinuous: scale first
            cn = modulate_tokens(_layer_norm(c), c_shift, c_scale)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            cn = modulate_tokens(_layer_norm(c), c_shift, c_scale)

        attn_x, attn_c = self.attn(modulate_tokens(xn, shift, scale), cn)
        x = torch.addcmul(x, gate[:, None], attn_x)
        if self.dual:
            shift2, scale2, gate2 = mod[6:]
            attn2_x, _ = self.attn2(modulate_tokens(xn, shift2, scale2))   # same LayerNorm, its own modulation
            x = torch.addcmul(x, gate2[:, None], attn2_x)
        x = torch.addcmul(x, gate_mlp[:, None], self.ff(modulate_tokens(_layer_norm(x), shift_mlp, scale_mlp), grid))

        if self.context_pre_only:
            return x, None
        c = torch.addcmul(c, c_gate[:, None], attn_c)
        ff_c = self.ff_context(modulate_tokens(_layer_norm(c), c_shift_mlp, c_scale_mlp))
        c = torch.addcmul(c, c_gate_mlp[:, None], ff_c)
        return x, c


# ---------------------------------------------------------------------------------------------
#                                         The model
# ---------------------------------------------------------------------------------------------

class DiT4SR(nn.Module):
    """forward(x, timesteps, context, pooled, lr_latent) -> flow velocity [B, out_channels, H, W].

    x and lr_latent are model-space latents of the same size (LR already `(z − 0.0609)·1.5305`); timesteps in
    SD3 units (σ·1000); context [B, L, joint_attention_dim]; pooled [B, pooled_projection_dim]."""

    def __init__(self, cfg: DiT4SRConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.config = cfg
        kw = dict(dtype=dtype, device=device)
        ops = operations
        d = cfg.hidden_size
        self.pos_embed = MMDiTPatchEmbed(cfg, ops, **kw)
        self.time_text_embed = TimeTextEmbed(cfg, ops, **kw)
        self.context_embedder = ops.Linear(cfg.joint_attention_dim, d, **kw)
        self.transformer_blocks = nn.ModuleList(JointBlock(cfg, i, ops, **kw) for i in range(cfg.num_layers))
        self.norm_out = AdaLN(d, 2, ops, **kw)
        self.proj_out = ops.Linear(d, cfg.patch_size ** 2 * cfg.out_channels, **kw)

    def unpatchify(self, x, h, w):
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p] (diffusers' (p, q, c) order inside a token)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward_single(self, x, timesteps, context, pooled, lr_latent, dtype=None):
        """One pass over the whole latent (any grid the positional table covers; see FeedForwardControl)."""
        cfg = self.config
        dtype = dtype or x.dtype
        b, _, hl, wl = x.shape
        if lr_latent.shape != x.shape:
            raise ValueError(f"DiT4SR: the LR latent {tuple(lr_latent.shape)} must have the noise latent's shape "
                             f"{tuple(x.shape)}")
        p = cfg.patch_size
        if hl % p or wl % p:
            raise ValueError(f"DiT4SR: latent {hl}×{wl} is not a multiple of the patch size {p}")
        h, w = hl // p, wl // p
        timesteps = timesteps.reshape(-1).to(x.device)
        timesteps = timesteps.expand(b) if timesteps.numel() == 1 else timesteps

        tokens = torch.cat([self.pos_embed(x.to(dtype)), self.pos_embed(lr_latent.to(dtype))], dim=1)  # [B, 2N, D]
        temb = self.time_text_embed(timesteps, pooled.to(x.device), dtype)                              # [B, D]
        c = self.context_embedder(context.to(device=x.device, dtype=dtype))                             # [B, L, D]
        for block in self.transformer_blocks:
            tokens, c = block(tokens, c, temb, (h, w))
        scale, shift = self.norm_out(temb)                          # AdaLayerNormContinuous: scale first
        out = self.proj_out(modulate_tokens(_layer_norm(tokens[:, :h * w]), shift, scale))  # noise half only
        return self.unpatchify(out, h, w)

    def forward(self, x, timesteps, context, pooled, lr_latent, tiles: Optional[TileSettings] = TileSettings(),  # noqa: B008 -- frozen
                dtype=None, **_unused):
        """Tiled as the reference pipeline tiles (tiling.py) unless `tiles` is None: a latent that fits in one
        tile runs in a single pass, a larger one in square tiles blended with Gaussian weights."""
        if tiles is None or tile_layout(x.shape[-2], x.shape[-1], tiles) is None:
            # exactly the untiled call (same tensors, same batch): tiling on or off is the same computation
            return self.forward_single(x, timesteps, context, pooled, lr_latent, dtype)
        b = x.shape[0]
        timesteps = timesteps.reshape(-1)
        timesteps = timesteps.expand(b) if timesteps.numel() == 1 else timesteps

        def run(x_tiles, lr_tiles, k):
            # k tiles of the whole batch, tile-major: conditions repeat the batch k times in the same order
            return self.forward_single(x_tiles, timesteps.repeat(k), context.repeat(k, 1, 1), pooled.repeat(k, 1),
                                       lr_tiles, dtype)

        return run_tiled(run, x, lr_latent, tiles,
                         bytes_per_tile=self.activation_bytes(tiles.tile, context.shape[1], dtype or x.dtype) * b)

    def activation_bytes(self, tile: int, text_len: int, dtype) -> int:
        """A generous estimate of one sample's peak activation memory for a tile × tile latent: the FF hidden
        of both halves (with GELU and conv copies), q/k/v/o of the joint sequence, and the attention scores
        as if materialised (a flash kernel needs less)."""
        cfg = self.config
        n = (tile // cfg.patch_size) ** 2
        s = 2 * n + text_len
        item = dtype.itemsize                                        # no tensor made (it would be a CPU one)
        return item * (4 * 2 * n * cfg.ff_inner_dim + 10 * s * cfg.hidden_size + cfg.num_heads * s * s)
