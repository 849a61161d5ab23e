"""PixArt-α checkpoints: layout detection, diffusers -> original renaming, config inference, strict load.

Layouts (../shared/specs/pixart.md, manifests/pixart/):
- original `.pth`: `ckpt["state_dict"]`, names as kernels/pixart/model.py, plus the stale `pos_embed` table and
  (1024-MS / 512 / 256) the learned null caption `y_embedder.y_embedding`;
- diffusers `PixArtTransformer2DModel`: renamed, q/k/v and k/v split; no `pos_embed`, no null caption.
Everything is turned into the original names; the model computes the positional table itself.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint_io import (
    CheckpointError,
    PreparedCheckpoint,
    assign_load,
    check_strict,
    describe_foreign,
    meta_shapes,
)
from .model import PixArt, PixArtConfig

# The only keys a strict load may ignore: the stale positional table (recomputed per size).
TOLERATED_KEYS = ("pos_embed",)

# original name -> diffusers name(s); several names are concatenated along dim 0, in order.
_TOP_LEVEL = {
    "x_embedder.proj": "pos_embed.proj",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "final_layer.linear": "proj_out",
}
BLOCK_PARTS = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}


def block_to_original(sd: dict, src_prefix: str, dst_prefix: str, out: dict) -> None:
    """Move one diffusers transformer block (`src_prefix`) into original names (`dst_prefix`)."""
    for orig, parts in BLOCK_PARTS.items():
        for suffix in ("weight", "bias"):
            names = [f"{src_prefix}{p}.{suffix}" for p in parts]
            if all(n in sd for n in names):
                tensors = [sd.pop(n) for n in names]
                out[f"{dst_prefix}{orig}.{suffix}"] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)
    if f"{src_prefix}scale_shift_table" in sd:
        out[f"{dst_prefix}scale_shift_table"] = sd.pop(f"{src_prefix}scale_shift_table")


def _block_indices(sd: dict, prefix: str) -> list:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m})


def _rename_top_level(sd: dict, out: dict, to_original: bool) -> None:
    """Move the non-block tensors between the two namings (pairs in _TOP_LEVEL, plus the final table)."""
    pairs = [(f"{d}.{x}", f"{o}.{x}") for o, d in _TOP_LEVEL.items() for x in ("weight", "bias")]
    pairs.append(("scale_shift_table", "final_layer.scale_shift_table"))
    for diff, orig in pairs:
        src, dst = (diff, orig) if to_original else (orig, diff)
        if src in sd:
            out[dst] = sd.pop(src)


def diffusers_to_original(sd: dict) -> dict:
    """Rename a diffusers PixArtTransformer2DModel state dict; unknown keys are kept as they are
    so that the strict check names them."""
    sd, out = dict(sd), {}
    _rename_top_level(sd, out, to_original=True)
    for i in _block_indices(sd, "transformer_blocks"):
        block_to_original(sd, f"transformer_blocks.{i}.", f"blocks.{i}.", out)
    out.update(sd)  # leftovers: unexpected keys
    return out


def to_diffusers_config(cfg: PixArtConfig) -> dict:
    """The config.json diffusers writes beside a PixArtTransformer2DModel's weights, for `cfg`."""
    return {
        "_class_name": "PixArtTransformer2DModel", "sample_size": cfg.sample_size,
        "num_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "patch_size": cfg.patch_size,
        "caption_channels": cfg.caption_channels, "norm_type": "ada_norm_single",
        "cross_attention_dim": cfg.hidden_size, "activation_fn": "gelu-approximate",
        "attention_bias": True, "num_embeds_ada_norm": 1000, "norm_elementwise_affine": False,
        "norm_eps": 1e-6}


def from_diffusers_config(config_json: Optional[dict]) -> dict:
    """What prepare_pixart / load_pixart take from a diffusers transformer's config.json: the head count and
    the trained latent size, which only that file records (the weights do not show them). {} for None or a
    json that is not a diffusers transformer config."""
    if not config_json or "num_attention_heads" not in config_json:
        return {}
    return {"num_heads": config_json["num_attention_heads"], "sample_size": config_json.get("sample_size")}


def original_to_diffusers(sd: dict) -> dict:
    """The inverse renaming (for writing diffusers-layout files); drops pos_embed and the null caption,
    exactly as diffusers' conversion script does."""
    sd = {k: v for k, v in sd.items() if k not in ("pos_embed", "y_embedder.y_embedding")}
    out = {}
    _rename_top_level(sd, out, to_original=False)
    for i in _block_indices(sd, "blocks"):
        for orig, parts in BLOCK_PARTS.items():
            for suffix in ("weight", "bias"):
                name = f"blocks.{i}.{orig}.{suffix}"
                if name in sd:
                    for part, chunk in zip(parts, sd.pop(name).chunk(len(parts), 0)):
                        out[f"transformer_blocks.{i}.{part}.{suffix}"] = chunk.contiguous()
        if f"blocks.{i}.scale_shift_table" in sd:
            out[f"transformer_blocks.{i}.scale_shift_table"] = sd.pop(f"blocks.{i}.scale_shift_table")
    out.update(sd)
    return out


def detect_layout(sd: dict) -> str:
    """'original' or 'diffusers'; anything else is a clear 'wrong file' error."""
    if "t_block.1.weight" in sd and "x_embedder.proj.weight" in sd:
        return "original"
    if "adaln_single.linear.weight" in sd and "pos_embed.proj.weight" in sd:
        return "diffusers"
    raise CheckpointError("expected a PixArt-α transformer (original .pth keys like t_block.1.weight, "
                          "x_embedder.proj.weight, or diffusers keys like adaln_single.linear.weight); "
                          f"found {describe_foreign(sd)}")


def infer_config(sd: dict, num_heads: Optional[int] = None, sample_size: Optional[int] = None,
                 pe_interpolation: Optional[float] = None) -> PixArtConfig:
    """PixArtConfig from an original-layout state dict's shapes.

    Head count is not visible in the weights: PixArt uses 72-wide heads, so 1152 -> 16 unless told.
    The trained size comes from the stale `pos_embed` table when present; otherwise from the
    micro-conditions (only the 1024-MS family has them) or the caller (diffusers config.json)."""
    w = sd["x_embedder.proj.weight"]                       # [D, C, p, p]
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(_block_indices(sd, "blocks"))
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    micro = "csize_embedder.mlp.0.weight" in sd
    if sample_size is None:
        if "pos_embed" in sd:
            sample_size = int(round(sd["pos_embed"].shape[-2] ** 0.5)) * patch
        else:
            sample_size = 128 if micro else 64
    if pe_interpolation is None:
        pe_interpolation = sample_size / 64                # 128 -> 2, 64 -> 1, 32 -> 0.5
    if num_heads is None:
        num_heads = hidden // 72 if hidden % 72 == 0 else max(1, hidden // 64)
    null = "y_embedder.y_embedding" in sd
    caption_ch = sd["y_embedder.y_proj.fc1.weight"].shape[1]
    max_len = sd["y_embedder.y_embedding"].shape[0] if null else 120
    return PixArtConfig(hidden_size=hidden, depth=depth, num_heads=num_heads, patch_size=patch,
                        in_channels=in_ch, out_channels=out_ch, caption_channels=caption_ch,
                        model_max_length=max_len, mlp_ratio=mlp_hidden / hidden, sample_size=sample_size,
                        pe_interpolation=pe_interpolation, micro_condition=micro, null_caption=null)


def variant_name(cfg: PixArtConfig) -> str:
    """Human-readable name of what the weights are, for node outputs and logs."""
    size = "XL/2" if (cfg.hidden_size, cfg.depth) == (1152, 28) else f"D{cfg.hidden_size}x{cfg.depth}"
    kind = "MS (micro-conditions)" if cfg.micro_condition else "non-MS"
    return f"PixArt-α {size} {cfg.sample_size * 8}px {kind}"


def released_base_mismatch(released: Optional[PixArtConfig], base_cfg: PixArtConfig) -> Optional[str]:
    """Why a control network released with base `released` (None: not known) does not fit `base_cfg`, or None:
    the trained size and the micro-conditions must match (the control blocks learned that base's features)."""
    if released is None or (released.sample_size, released.micro_condition) == \
            (base_cfg.sample_size, base_cfg.micro_condition):
        return None
    return f"it was released with a {variant_name(released)} base, the given base is {variant_name(base_cfg)}"


def expected_shapes(cfg: PixArtConfig) -> dict:
    """{name: shape} of the model for `cfg` (meta device: costs no memory)."""
    return meta_shapes(lambda: PixArt(cfg))


def to_original_layout(sd: dict) -> tuple:
    """(state dict in original names, layout name)."""
    layout = detect_layout(sd)
    return (diffusers_to_original(sd) if layout == "diffusers" else dict(sd)), layout


def prepare_pixart(sd: dict, num_heads=None, sample_size=None, pe_interpolation=None,
                   what: str = "PixArt-α transformer") -> PreparedCheckpoint:
    """Checked original-layout state dict (stale `pos_embed` dropped), its config and source layout."""
    sd, layout = to_original_layout(sd)
    cfg = infer_config(sd, num_heads=num_heads, sample_size=sample_size, pe_interpolation=pe_interpolation)
    check_strict(expected_shapes(cfg), sd, f"{what} ({layout} layout, {variant_name(cfg)})",
                 tolerated=TOLERATED_KEYS)
    sd.pop("pos_embed", None)
    return PreparedCheckpoint(sd, cfg, layout)


def load_pixart(sd: dict, operations=nn, dtype=None, device=None, **config_overrides) -> PixArt:
    """Strictly load any supported PixArt-α state dict into a fresh model."""
    sd, cfg, layout = prepare_pixart(sd, **config_overrides)
    model = assign_load(lambda: PixArt(cfg, operations=operations, dtype=dtype), sd, dtype, device)
    model.pixart_layout = layout
    return model
