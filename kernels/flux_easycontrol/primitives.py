"""The FLUX maths the model and the condition stream share: sinusoid, RoPE, attention, modulation
(applying it is `kernels/adaln.modulate`, shared with PixArt and DiT4SR).

Formats follow black-forest-labs/flux (and ComfyUI's `comfy/ldm/flux`, which keeps them), so that a
`pe` tensor made by ComfyUI's own `EmbedND` and one made here are interchangeable:
`pe [B, 1, L, head_dim/2, 2, 2]` holds one 2×2 rotation per adjacent channel pair.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """[N] -> [N, dim] float32, cos half first (FLUX's order); the model is fed σ and multiplies by 1000.

    Computed in float64: guidance 3.5 becomes 3500 rad-scale arguments, where a float32 sinusoid is
    the largest single error of a float32 FLUX (~8e-6 on the golden velocity)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = (t.double() * time_factor)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.float()


def rope(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Positions [..., L] of one axis -> rotations [..., L, dim/2, 2, 2] (float32, built in float64)."""
    assert dim % 2 == 0, dim
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    angles = pos.double()[..., None] * omega                     # [..., L, dim/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return out.reshape(*angles.shape, 2, 2).float()


class EmbedND(nn.Module):
    """Position ids [B, L, n_axes] -> pe [B, 1, L, head_dim/2, 2, 2]; each axis owns a slice of the
    channel pairs (FLUX.1: 16 + 56 + 56 channels for (index, row, column))."""

    def __init__(self, dim: int, theta: float, axes_dim: Sequence[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, hd] rotated by pe [B|1, 1, L, hd/2, 2, 2], in float32 (x's dtype comes back)."""
    x_ = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0]
    out.addcmul_(pe[..., 1], x_[..., 1])
    return out.reshape(*x.shape).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe_q: Optional[torch.Tensor],
              pe_k: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, H, Lq, hd], k/v [B, H, Lk, hd] (qk-normed, not yet rotated) -> [B, Lq, H*hd].

    `pe_k` is for keys that are longer than the queries (condition keys appended); by default the
    keys share the queries' positions. `mask`: boolean (True = attend) or additive, [Lq, Lk],
    [B, Lq, Lk] or [B, 1 | H, Lq, Lk]."""
    if pe_q is not None:
        q = apply_rope(q, pe_q)
        k = apply_rope(k, pe_q if pe_k is None else pe_k)
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]                                        # per sample, shared by the heads
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)    # [B, H, Lq, hd]
    b, h, lq, hd = out.shape
    return out.transpose(1, 2).reshape(b, lq, h * hd)


def modulation(lin, vec: torch.Tensor, n: int) -> tuple:
    """adaLN parameters `lin(silu(vec))` for vec [B, D]: n chunks of [B, 1, D]
    (double blocks: shift1, scale1, gate1, shift2, scale2, gate2; single blocks: shift, scale, gate)."""
    return lin(F.silu(vec)).unsqueeze(1).chunk(n, dim=-1)


def split_heads(x: torch.Tensor, parts: int, heads: int) -> tuple:
    """[B, L, parts·H·hd] -> `parts` tensors [B, H, L, hd] (fused q/k/v projections)."""
    b, n, _ = x.shape
    return x.view(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
