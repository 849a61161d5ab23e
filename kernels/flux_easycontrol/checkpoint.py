"""FLUX.1 transformer checkpoints: layouts, diffusers -> native renaming, config from the weights, strict load.

Layouts (manifests/flux_easycontrol/):
- native = ComfyUI / BFL (`flux1-dev.safetensors`, 780 tensors; ComfyUI adds `model.diffusion_model.`
  inside full checkpoints): the names of model.py;
- diffusers `FluxTransformer2DModel` (1160 tensors; EasyControl's own naming): q/k/v (and the single
  blocks' proj_mlp) are separate; the final adaLN linear gives [scale, shift] where native gives
  [shift, scale] — its two halves are swapped on the way (the manifest's `from_diffusers` map lists
  the names only).
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..checkpoint_io import CheckpointError, PreparedCheckpoint, assign_load, check_strict, meta_shapes
from .lora import describe_found
from .model import Flux, FluxConfig

NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# native name -> diffusers name(s), concatenated along dim 0 in this order
_TOP_LEVEL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),      # halves swapped
}
_DOUBLE = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
SWAPPED_HALVES = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")


def _indices(sd, prefix: str) -> list:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(rf"{re.escape(prefix)}\.(\d+)\.", k)] if m})


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_native(sd: Mapping[str, torch.Tensor]) -> dict:
    """Rename a diffusers FluxTransformer2DModel state dict; unknown keys are kept as they are so that the
    strict check names them."""
    sd, out = dict(sd), {}

    def move(native: str, parts: Sequence[str]):
        for suffix in ("weight", "bias"):
            names = [f"{p}.{suffix}" for p in parts]
            if all(n in sd for n in names):
                tensors = [sd.pop(n) for n in names]
                out[f"{native}.{suffix}"] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)

    for native, parts in _TOP_LEVEL.items():
        move(native, parts)
    for name in SWAPPED_HALVES:
        if name in out:
            out[name] = _swap_halves(out[name])
    for diffusers_prefix, native_prefix, linears, norms in (
            ("transformer_blocks", "double_blocks", _DOUBLE, _DOUBLE_NORMS),
            ("single_transformer_blocks", "single_blocks", _SINGLE, _SINGLE_NORMS)):
        for i in _indices(sd, diffusers_prefix):
            src, dst = f"{diffusers_prefix}.{i}.", f"{native_prefix}.{i}."
            for native, parts in linears.items():
                move(dst + native, [src + p for p in parts])
            for native, diff in norms.items():
                if src + diff in sd:
                    out[dst + native] = sd.pop(src + diff)
    out.update(sd)     # leftovers: unexpected keys
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """'native' or 'diffusers'; anything else is a clear 'wrong file' error."""
    if "img_in.weight" in sd and any(k.startswith(("double_blocks.", "single_blocks.")) for k in sd):
        return "native"
    if "x_embedder.weight" in sd and "time_text_embed.timestep_embedder.linear_1.weight" in sd:
        return "diffusers"
    raise CheckpointError("expected a FLUX.1 transformer (ComfyUI/BFL keys like img_in.weight, "
                          "double_blocks.0.img_attn.qkv.weight, or diffusers keys like x_embedder.weight, "
                          f"transformer_blocks.0.attn.to_q.weight); found {describe_found(sd)}")


def strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict:
    """A full ComfyUI checkpoint keeps the transformer under `model.diffusion_model.`."""
    for prefix in NATIVE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def default_axes(head_dim: int) -> list:
    """RoPE axes (index, row, column): FLUX.1 splits its 128-wide heads 16 + 56 + 56; the same
    proportions for other widths (the golden's 32-wide heads: 4 + 14 + 14). Not visible in the weights."""
    if head_dim % 16:
        raise CheckpointError(f"cannot infer FLUX RoPE axes for head width {head_dim}; pass axes_dim")
    return [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16]


def infer_config(sd: Mapping[str, torch.Tensor], axes_dim: Optional[Sequence[int]] = None,
                 theta: float = 10000.0) -> FluxConfig:
    """FluxConfig from native-layout shapes. The head width comes from the q-norm scale, the rest from
    the projections; FLUX's patch is 2×2."""
    for needed in ("img_in.weight", "txt_in.weight", "final_layer.linear.weight"):
        if needed not in sd:
            raise CheckpointError(f"FLUX transformer: {needed} is missing; found {describe_found(sd)}")
    d, packed = sd["img_in.weight"].shape
    depth, single = len(_indices(sd, "double_blocks")), len(_indices(sd, "single_blocks"))
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    if norm not in sd:
        raise CheckpointError(f"FLUX transformer: {norm} is missing (the head width is read from it)")
    head_dim = sd[norm].shape[0]
    if depth and "double_blocks.0.img_mlp.0.weight" in sd:
        mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
    else:
        mlp_hidden = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * d
    vec = sd["vector_in.in_layer.weight"].shape[1] if "vector_in.in_layer.weight" in sd else None
    qkv_bias = "double_blocks.0.img_attn.qkv.bias" in sd if depth else True
    return FluxConfig(hidden_size=d, num_heads=d // head_dim, depth=depth, depth_single_blocks=single,
                      in_channels=packed // 4, out_channels=sd["final_layer.linear.weight"].shape[0] // 4,
                      context_in_dim=sd["txt_in.weight"].shape[1], vec_in_dim=vec, mlp_ratio=mlp_hidden / d,
                      axes_dim=list(axes_dim) if axes_dim is not None else default_axes(head_dim), theta=theta,
                      qkv_bias=qkv_bias, guidance_embed="guidance_in.in_layer.weight" in sd)


def variant_name(cfg: FluxConfig) -> str:
    size = ("FLUX.1" if (cfg.hidden_size, cfg.depth, cfg.depth_single_blocks) == (3072, 19, 38)
            else f"FLUX D{cfg.hidden_size} {cfg.depth}+{cfg.depth_single_blocks}")
    return f"{size} {'guidance-distilled (dev)' if cfg.guidance_embed else 'no guidance input (schnell)'}"


def expected_shapes(cfg: FluxConfig) -> dict:
    return meta_shapes(lambda: Flux(cfg))


def to_native_layout(sd: Mapping[str, torch.Tensor]) -> tuple:
    """(state dict in native names, layout name)."""
    sd = strip_prefix(sd)
    layout = detect_layout(sd)
    return (diffusers_to_native(sd) if layout == "diffusers" else sd), layout


def prepare_flux(sd: Mapping[str, torch.Tensor], axes_dim=None, what: str = "FLUX transformer") -> PreparedCheckpoint:
    """Checked native-layout state dict, its config and its source layout."""
    sd, layout = to_native_layout(sd)
    cfg = infer_config(sd, axes_dim=axes_dim)
    check_strict(expected_shapes(cfg), sd, f"{what} ({layout} layout, {variant_name(cfg)})")
    return PreparedCheckpoint(sd, cfg, layout)


def load_flux(sd: Mapping[str, torch.Tensor], operations=nn, dtype=None, device=None, axes_dim=None) -> Flux:
    """Strictly load a FLUX.1 transformer in either layout into our pure model."""
    sd, cfg, layout = prepare_flux(sd, axes_dim=axes_dim)
    model = assign_load(lambda: Flux(cfg, operations=operations), sd, dtype, device)
    model.flux_layout = layout
    return model
