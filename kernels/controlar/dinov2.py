"""ControlAR's control encoder: DINOv2 (T2I) or ViT (C2I) in transformers-4.x module names, and the resize to the
14-px patch grid.

Lineage: HF transformers 4.46.3 `Dinov2Model` / `ViTModel` (what ControlAR's `Dinov2_Adapter` / `ViT_Adapter`
wrap as `adapter.model`), re-implemented here: the released ControlAR files carry the encoder fully fine-tuned
under the 4.x names (transformers 5 renames them; we do not follow). Facts: ../shared/specs/controlar.md §3.

One 14-px DINOv2 patch maps to one 16-px VQ token: the control image (H, W) is resized to (H//16·14, W//16·14)
and the output without its CLS token is one feature per image token, raster order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# hidden size -> heads of the released encoders (not visible in the weights: query is [C, C] for any split)
KNOWN_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}


@dataclass
class Dinov2Config:
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    mlp_hidden: int = 1536
    patch_size: int = 14
    num_positions: int = 1370          # 37² + CLS (image_size 518)
    kind: str = "dinov2"               # "dinov2" (T2I, layer scale, mask_token) or "vit" (C2I, pooler)
    layer_norm_eps: float = 1e-6       # DINOv2 1e-6; ViT 1e-12

    @property
    def grid(self) -> int:
        return int(round((self.num_positions - 1) ** 0.5))

    def describe(self) -> str:
        name = {(384, "dinov2"): "DINOv2-S", (768, "dinov2"): "DINOv2-B", (384, "vit"): "ViT-S/16"}.get(
            (self.hidden_size, self.kind), f"{self.kind} {self.hidden_size}-d")
        return f"{name} ({self.num_layers} layers, {self.num_heads} heads)"


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: Dinov2Config, ops=nn, **kw):
        super().__init__()
        self.projection = ops.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, **kw)

    def forward(self, x):                                    # [B, 3, H, W] -> [B, h·w, C]
        return self.projection(x).flatten(2).transpose(1, 2)


class Embeddings(nn.Module):
    """CLS + patches + position embeddings, the 37×37 table resized bicubically when the grid differs."""

    def __init__(self, cfg: Dinov2Config, ops=nn, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.empty(1, 1, c, dtype=dtype, device=device))
        if cfg.kind == "dinov2":
            self.mask_token = nn.Parameter(torch.empty(1, c, dtype=dtype, device=device))   # unused (no masking)
        self.position_embeddings = nn.Parameter(torch.empty(1, cfg.num_positions, c, dtype=dtype, device=device))
        self.patch_embeddings = PatchEmbeddings(cfg, ops, dtype=dtype, device=device)

    def positions(self, h: int, w: int, dtype) -> torch.Tensor:
        """[1, 1 + h·w, C]. As transformers 4.46.3: no resize only for the trained square grid; otherwise the
        size-based bicubic resize (align_corners=False) computed in float32 (older 4.x used scale factors)."""
        pos = self.position_embeddings
        n = pos.shape[1] - 1
        if h * w == n and h == w:
            return pos.to(dtype)
        g = self.cfg.grid
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)                     # [1, C, g, g]
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        tokens = self.patch_embeddings(x)                                              # [B, h·w, C]
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.positions(h, w, tokens.dtype)


class Dinov2SelfAttention(nn.Module):
    """Separate q, k, v projections, no mask (upstream: HF `Dinov2SelfAttention` / `ViTSelfAttention`)."""

    def __init__(self, cfg: Dinov2Config, ops=nn, **kw):
        super().__init__()
        self.heads = cfg.num_heads
        c = cfg.hidden_size
        self.query = ops.Linear(c, c, **kw)
        self.key = ops.Linear(c, c, **kw)
        self.value = ops.Linear(c, c, **kw)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class Dense(nn.Module):
    """HF's `*.output` / `intermediate` wrappers: one `dense` Linear (GELU after it for `intermediate`)."""

    def __init__(self, in_features, out_features, ops=nn, act: bool = False, **kw):
        super().__init__()
        self.dense = ops.Linear(in_features, out_features, **kw)
        self.act = act

    def forward(self, x):
        x = self.dense(x)
        return F.gelu(x) if self.act else x


class AttentionBlock(nn.Module):
    def __init__(self, cfg: Dinov2Config, ops=nn, **kw):
        super().__init__()
        self.attention = Dinov2SelfAttention(cfg, ops, **kw)
        self.output = Dense(cfg.hidden_size, cfg.hidden_size, ops, **kw)

    def forward(self, x):
        return self.output(self.attention(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x):
        return x * self.lambda1.to(x.dtype)


class Mlp(nn.Module):
    """DINOv2 MLP: fc1 → exact-erf GELU → fc2."""

    def __init__(self, cfg: Dinov2Config, ops=nn, **kw):
        super().__init__()
        self.fc1 = ops.Linear(cfg.hidden_size, cfg.mlp_hidden, **kw)
        self.fc2 = ops.Linear(cfg.mlp_hidden, cfg.hidden_size, **kw)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Dinov2Layer(nn.Module):
    """x += ls1 ⊙ attn(LN1 x); x += ls2 ⊙ MLP(LN2 x)."""

    def __init__(self, cfg: Dinov2Config, ops=nn, **kw):
        super().__init__()
        c, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.norm1 = ops.LayerNorm(c, eps=eps, **kw)
        self.attention = AttentionBlock(cfg, ops, **kw)
        self.layer_scale1 = LayerScale(c, **kw)
        self.norm2 = ops.LayerNorm(c, eps=eps, **kw)
        self.mlp = Mlp(cfg, ops, **kw)
        self.layer_scale2 = LayerScale(c, **kw)

    def forward(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class ViTLayer(nn.Module):
    """HF ViT: x += attn(LN_before x); x += output(GELU(intermediate(LN_after x)))."""

    def __init__(self, cfg: Dinov2Config, ops=nn, **kw):
        super().__init__()
        c, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = AttentionBlock(cfg, ops, **kw)
        self.intermediate = Dense(c, cfg.mlp_hidden, ops, act=True, **kw)
        self.output = Dense(cfg.mlp_hidden, c, ops, **kw)
        self.layernorm_before = ops.LayerNorm(c, eps=eps, **kw)
        self.layernorm_after = ops.LayerNorm(c, eps=eps, **kw)

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class Dinov2Encoder(nn.Module):
    """The layer stack, DINOv2 or ViT layers (upstream: HF `Dinov2Encoder` / `ViTEncoder`)."""

    def __init__(self, cfg: Dinov2Config, ops=nn, **kw):
        super().__init__()
        block = Dinov2Layer if cfg.kind == "dinov2" else ViTLayer
        self.layer = nn.ModuleList([block(cfg, ops, **kw) for _ in range(cfg.num_layers)])

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class VisionModel(nn.Module):
    """`Dinov2Model` / `ViTModel` (4.x names): pixels -> last_hidden_state [B, 1 + h·w, C] (final LayerNorm)."""

    def __init__(self, cfg: Dinov2Config, ops=nn, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.embeddings = Embeddings(cfg, ops, **kw)
        self.encoder = Dinov2Encoder(cfg, ops, **kw)
        self.layernorm = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        if cfg.kind == "vit":
            self.pooler = Dense(cfg.hidden_size, cfg.hidden_size, ops, **kw)   # ViTModel's pooler; unused here

    def forward(self, x):
        return self.layernorm(self.encoder(self.embeddings(x)))


def to_patch14(x: torch.Tensor, resize: str = "nearest") -> torch.Tensor:
    """(H, W) -> (H//16·14, W//16·14): `nearest` for canny / seg, else bicubic with align_corners=True."""
    size = (x.shape[2] // 16 * 14, x.shape[3] // 16 * 14)
    if resize == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    if resize == "bicubic":
        return F.interpolate(x, size=size, mode="bicubic", align_corners=True)
    raise ValueError(f"resize must be 'nearest' (canny, seg) or 'bicubic' (hed, depth, lineart, …), got {resize!r}")


def resize_mode(condition_type: str) -> str:
    """The reference's rule: nearest for canny and seg, bicubic for every other condition type."""
    return "nearest" if condition_type in ("canny", "seg") else "bicubic"


class ControlEncoder(nn.Module):
    """ControlAR's `adapter`: control image [B, 3, H, W] in [−1, 1] (no ImageNet normalisation) -> one feature
    per 16-px image token [B, (H/16)(W/16), C] (CLS dropped)."""

    def __init__(self, cfg: Dinov2Config, operations=nn, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        self.model = VisionModel(cfg, operations, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, resize: str = "nearest") -> torch.Tensor:
        if self.cfg.kind == "dinov2":
            x = to_patch14(x, resize)
        # ViT (C2I): patch 16 already matches the VQ grid; interpolate_pos_encoding resizes its 14×14 table
        return self.model(x)[:, 1:]
