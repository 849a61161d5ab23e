"""LlamaGen's VQ-16 image tokenizer (the decoder side runs; the encoder is built so the released file loads strict).

Lineage: FoundationVision/LlamaGen@ce98ec4 tokenizer/tokenizer_image/vq_model.py (`VQ_models['VQ-16']`,
identical in ControlAR), itself after VQGAN's conv net. Facts: ../shared/specs/controlar.md §2.

decode_code: L2-normalised codebook rows for the tokens in raster order (index i ↔ row i // w, col i % w),
post_quant_conv, the decoder; the output is ≈[−1, 1] and NOT clamped (show it with clamp(−1, 1), then (x + 1)/2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    in_channels: int = 3
    out_channels: int = 3
    usage_buffer: int = 65536          # `quantize.codebook_used`, usage statistics kept in the file

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def describe(self) -> str:
        return (f"VQ-{self.downsample} (codebook {self.codebook_size}×{self.codebook_embed_dim}, ch {self.ch}, "
                f"z {self.z_channels})")


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(ops, c, **kw):
    return ops.GroupNorm(32, c, eps=1e-6, affine=True, **kw)


class ResnetBlock(nn.Module):
    """x + conv2(swish(GN2(conv1(swish(GN1 x))))), 1×1 nin_shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, ops=nn, **kw):
        super().__init__()
        self.norm1 = group_norm(ops, cin, **kw)
        self.conv1 = ops.Conv2d(cin, cout, 3, 1, 1, **kw)
        self.norm2 = group_norm(ops, cout, **kw)
        self.conv2 = ops.Conv2d(cout, cout, 3, 1, 1, **kw)
        if cin != cout:
            self.nin_shortcut = ops.Conv2d(cin, cout, 1, 1, 0, **kw)

    def forward(self, x):
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head attention over the H·W positions, 1×1 q/k/v/proj_out, scale C^−1/2, residual."""

    def __init__(self, c: int, ops=nn, **kw):
        super().__init__()
        self.norm = group_norm(ops, c, **kw)
        self.q = ops.Conv2d(c, c, 1, **kw)
        self.k = ops.Conv2d(c, c, 1, **kw)
        self.v = ops.Conv2d(c, c, 1, **kw)
        self.proj_out = ops.Conv2d(c, c, 1, **kw)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (p(n).reshape(b, c, h * w) for p in (self.q, self.k, self.v))       # [B, C, HW]
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c ** -0.5, dim=2)      # [B, HW(q), HW(k)]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c: int, ops=nn, **kw):
        super().__init__()
        self.conv = ops.Conv2d(c, c, 3, 1, 1, **kw)

    def forward(self, x):
        # nearest ×2 in float32 as the reference does (bf16 nearest-upsample is not supported everywhere)
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class Downsample(nn.Module):
    def __init__(self, c: int, ops=nn, **kw):
        super().__init__()
        self.conv = ops.Conv2d(c, c, 3, 2, 0, **kw)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))     # asymmetric pad, as VQGAN


class Level(nn.Module):
    """One resolution of the encoder or decoder: `res` blocks, `attn` blocks (lowest resolution only), resampler."""

    def __init__(self, cin, cout, n_res, with_attn, resample, ops=nn, **kw):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_res):
            self.res.append(ResnetBlock(cin, cout, ops, **kw))
            cin = cout
            if with_attn:
                self.attn.append(AttnBlock(cout, ops, **kw))
        if resample == "up":
            self.upsample = Upsample(cout, ops, **kw)
        elif resample == "down":
            self.downsample = Downsample(cout, ops, **kw)

    def forward(self, x):
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        return x


def mid_blocks(c, ops, **kw) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, ops, **kw), AttnBlock(c, ops, **kw), ResnetBlock(c, c, ops, **kw)])


class VQEncoder(nn.Module):
    """In the released file and built for a strict load; generation never runs it (upstream: vq_model.py
    `Encoder`)."""

    def __init__(self, cfg: VQConfig, ops=nn, **kw):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = ops.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1, **kw)
        mult = (1,) + tuple(cfg.ch_mult)
        self.conv_blocks = nn.ModuleList([
            Level(cfg.ch * mult[i], cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks, i == n - 1,
                  "down" if i != n - 1 else None, ops, **kw) for i in range(n)])
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = mid_blocks(c, ops, **kw)
        self.norm_out = group_norm(ops, c, **kw)
        self.conv_out = ops.Conv2d(c, cfg.z_channels, 3, 1, 1, **kw)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQDecoder(nn.Module):
    """z [B, z, h, w] -> image [B, 3, 16h, 16w]: conv_in, mid (Res, Attn, Res), 5 levels top-down (channels
    512, 256, 256, 128, 128 for VQ-16; 3 res blocks each, attention in the first), norm, swish, conv_out
    (upstream: vq_model.py `Decoder`)."""

    def __init__(self, cfg: VQConfig, ops=nn, **kw):
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = ops.Conv2d(cfg.z_channels, c, 3, 1, 1, **kw)
        self.mid = mid_blocks(c, ops, **kw)
        levels = []
        for i in range(n):
            cout = cfg.ch * cfg.ch_mult[n - 1 - i]
            levels.append(Level(c, cout, cfg.num_res_blocks + 1, i == 0, "up" if i != n - 1 else None, ops, **kw))
            c = cout
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(ops, c, **kw)
        self.conv_out = ops.Conv2d(c, cfg.out_channels, 3, 1, 1, **kw)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig, ops=nn, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        self.embedding = ops.Embedding(cfg.codebook_size, cfg.codebook_embed_dim, dtype=dtype, device=device)
        self.register_buffer("codebook_used", torch.zeros(cfg.usage_buffer, dtype=dtype, device=device))

    def codebook_entry(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """tokens [B, h·w] (raster) -> [B, C, h, w], rows L2-normalised at use (the stored codebook is not)."""
        table = self.embedding.weight
        if self.cfg.codebook_l2_norm:
            table = F.normalize(table, p=2, dim=-1)
        return table[tokens].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        ops, kw = operations, dict(dtype=dtype, device=device)
        self.encoder = VQEncoder(cfg, ops, **kw)
        self.decoder = VQDecoder(cfg, ops, **kw)
        self.quantize = VectorQuantizer(cfg, ops, **kw)
        self.quant_conv = ops.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1, **kw)
        self.post_quant_conv = ops.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1, **kw)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, tokens: torch.Tensor, h: int, w: int, dtype=None) -> torch.Tensor:
        """tokens [B, h·w] in raster order -> image [B, 3, 16h, 16w], ≈[−1, 1], not clamped. `dtype`: the compute
        dtype (default the stored weights'; give it with casting `operations`)."""
        quant = self.quantize.codebook_entry(tokens, h, w).to(dtype or self.post_quant_conv.weight.dtype)
        return self.decode(quant)


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """Decoder output -> [0, 1] as the reference saves it (clamp to [−1, 1], then (x + 1)/2)."""
    return (image.clamp(-1, 1) + 1) / 2
