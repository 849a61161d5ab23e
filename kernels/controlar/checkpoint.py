"""ControlAR / LlamaGen checkpoints: layouts, config from the weights, strict loading, foreign-file errors.

Layouts (../shared/specs/controlar.md §9, manifests/controlar/):
- ControlAR T2I (`canny_MR`, `depth_MR`, `hed`, `seg_cocostuff`, `edge_base`, `depth_base` .safetensors): flat, no
  prefix; GPT-XL + DINOv2-S/B under `adapter.model.` (transformers-4.x names) + the projections.
- ControlAR C2I (code-derived, unreleased): GPT-B/L + ViT-S/16 with pooler, a `condition_norm.weight`.
- LlamaGen bases: t2i `{"model": …}`, c2i `{"model": …}` or (XXL, 3B) FSDP raw state dicts — same key names.
- VQ-16: `{"model": …}` with encoder, decoder, quantizer and its `codebook_used` statistics buffer.

Read from the weights: layers, width, FFN width, vocab, the caption length T (rows of
`cls_embedding.uncond_embedding`) or the class count, block size (rows of `condition_mlp.uncond_embedding`),
the encoder's width, depth, MLP width, patch and position table. Not in the weights: head counts (the known
model tables below, or an override for test models) and a LlamaGen base's block size (shapes do not depend on it).

Strict, apart from the documented keys some files carry (`freqs_cis`, `layers.N.attention.kv_cache.*`), which are
dropped. The unused `condition_embeddings.weight` / `condition_norm.weight` are part of the model, so they load.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch.nn as nn

from ..checkpoint_io import CheckpointError, assign_load, check_strict, describe_foreign, meta_shapes, read_state_dict
from . import dinov2
from .dinov2 import Dinov2Config
from .gpt import GPT, KNOWN_HEADS, GPTConfig
from .vq import VQConfig, VQModel

_LAYER = re.compile(r"layers\.(\d+)\.")
_ADAPTER_LAYER = re.compile(r"adapter\.model\.encoder\.layer\.(\d+)\.")
_TRANSFORMERS5 = re.compile(r"^adapter\.model\..*\.(q_proj|k_proj|v_proj|o_proj)\.|^adapter\.model\.encoder\.layers\.")
_TOLERATED = re.compile(r"(freqs_cis|layers\.\d+\.attention\.kv_cache\.(k_cache|v_cache))$")

GPT_MARKERS = ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", "output.weight")
VQ_MARKERS = ("quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_in.weight")
WHAT_GPT = "ControlAR / LlamaGen GPT"
WHAT_VQ = "LlamaGen VQ tokenizer"


def tolerated_keys(sd: Mapping) -> list:
    """The documented stray keys present in `sd` (dropped before loading)."""
    return [k for k in sd if _TOLERATED.fullmatch(k)]


def _indices(sd: Mapping, pattern) -> list:
    return sorted({int(m.group(1)) for k in sd for m in [pattern.match(k)] if m})


# -- GPT ------------------------------------------------------------------------------------------

def check_gpt_layout(sd: Mapping) -> None:
    if not all(k in sd for k in GPT_MARKERS):
        hint = " (this is the VQ image tokenizer: load it with the VQ loader)" \
            if all(k in sd for k in VQ_MARKERS) else ""
        raise CheckpointError(f"expected a {WHAT_GPT} (flat names: {', '.join(GPT_MARKERS)}, "
                              f"layers.N.feed_forward.w1.weight, …); found {describe_foreign(sd)}{hint}")


def infer_control_config(sd: Mapping, heads: Optional[int] = None) -> Optional[Dinov2Config]:
    """The control encoder under `adapter.model.`, or None for a plain LlamaGen base."""
    p = "adapter.model."
    if p + "embeddings.position_embeddings" not in sd:
        return None
    layers = _indices(sd, _ADAPTER_LAYER)
    kind = "vit" if any(k.startswith(p + "encoder.layer.0.layernorm_before") for k in sd) else "dinov2"
    hidden = sd[p + "embeddings.cls_token"].shape[-1]
    fc1 = p + ("encoder.layer.0.mlp.fc1.weight" if kind == "dinov2" else "encoder.layer.0.intermediate.dense.weight")
    if heads is None:
        if hidden not in dinov2.KNOWN_HEADS:
            raise CheckpointError(f"{WHAT_GPT}: control encoder width {hidden} is not a released DINOv2/ViT size "
                                  f"({sorted(dinov2.KNOWN_HEADS)}); give its head count")
        heads = dinov2.KNOWN_HEADS[hidden]
    return Dinov2Config(hidden_size=hidden, num_layers=(layers[-1] + 1) if layers else 0, num_heads=heads,
                        mlp_hidden=sd[fc1].shape[0],
                        patch_size=sd[p + "embeddings.patch_embeddings.projection.weight"].shape[-1],
                        num_positions=sd[p + "embeddings.position_embeddings"].shape[1], kind=kind,
                        layer_norm_eps=1e-6 if kind == "dinov2" else 1e-12)


def infer_gpt_config(sd: Mapping, n_head: Optional[int] = None, adapter_heads: Optional[int] = None,
                     block_size: Optional[int] = None) -> GPTConfig:
    """GPTConfig from the shapes (meta tensors are enough). n_head / adapter_heads: for sizes outside the known
    tables (test models); block_size: only for LlamaGen bases, whose weights do not record it."""
    check_gpt_layout(sd)
    try:
        vocab, dim = sd["tok_embeddings.weight"].shape
        n_layer = _indices(sd, _LAYER)[-1] + 1
        if n_head is None:
            if (dim, n_layer) not in KNOWN_HEADS:
                raise CheckpointError(f"{WHAT_GPT}: dim {dim} × {n_layer} layers is not a LlamaGen size "
                                      f"({sorted(KNOWN_HEADS)}); give its head count")
            n_head = KNOWN_HEADS[(dim, n_layer)]
        control = infer_control_config(sd, adapter_heads)
        if "cls_embedding.cap_proj.fc1.weight" in sd:
            kw = dict(model_type="t2i", cls_token_num=sd["cls_embedding.uncond_embedding"].shape[0],
                      caption_dim=sd["cls_embedding.cap_proj.fc1.weight"].shape[1])
        elif "cls_embedding.embedding_table.weight" in sd:
            kw = dict(model_type="c2i", cls_token_num=1,
                      num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1)
        else:
            raise CheckpointError(f"{WHAT_GPT}: neither a caption prefix (cls_embedding.cap_proj.*) nor a class "
                                  f"table (cls_embedding.embedding_table.weight); found {describe_foreign(sd)}")
        if "condition_mlp.uncond_embedding" in sd:
            found = sd["condition_mlp.uncond_embedding"].shape[0]
            if block_size is not None and block_size != found:
                raise CheckpointError(f"{WHAT_GPT}: block size {block_size} asked, the weights record {found}")
            block_size = found
        elif block_size is None:
            block_size = 1024 if kw["model_type"] == "t2i" else 256   # LlamaGen's 512-px t2i / 256-px c2i
        cfg = GPTConfig(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab,
                        ffn_hidden=sd["layers.0.feed_forward.w1.weight"].shape[0], block_size=block_size,
                        control=control, condition_norm="condition_norm.weight" in sd, **kw)
    except KeyError as e:
        raise CheckpointError(f"{WHAT_GPT}: cannot read the configuration from the weights, {e.args[0]} is "
                              f"missing ({len(sd)} tensors found)") from None
    if dim % n_head or cfg.head_dim % 4:
        raise CheckpointError(f"{WHAT_GPT}: {n_head} heads do not split dim {dim} into 2-D RoPE heads")
    if int(round(block_size ** 0.5)) ** 2 != block_size:
        raise CheckpointError(f"{WHAT_GPT}: block size {block_size} is not a square token grid")
    return cfg


def gpt_expected_shapes(cfg: GPTConfig) -> dict:
    """{name: shape} of GPT(cfg) (meta device: costs no memory)."""
    return meta_shapes(lambda: GPT(cfg))


def prepare_gpt(sd: Mapping, what: str = WHAT_GPT, **config_overrides) -> tuple:
    """(state dict without the tolerated keys, config); raises CheckpointError naming every problem."""
    cfg = infer_gpt_config(sd, **config_overrides)
    stray = tolerated_keys(sd)
    try:
        check_strict(gpt_expected_shapes(cfg), sd, f"{what} ({cfg.describe()})", tolerated=stray)
    except CheckpointError as e:
        if any(_TRANSFORMERS5.search(k) for k in sd):
            raise CheckpointError(f"{e}\nThe control encoder is in transformers-5 naming (attention.q_proj / "
                                  f"o_proj, …): the released ControlAR files use transformers-4.x names "
                                  f"(attention.attention.query, attention.output.dense, …); load the released "
                                  f"file, not a re-saved copy") from None
        raise
    stray = set(stray)
    return {k: v for k, v in sd.items() if k not in stray}, cfg


def load_gpt(sd: Mapping, operations=nn, dtype=None, device=None, **config_overrides) -> tuple:
    """Strictly load a ControlAR / LlamaGen GPT state dict -> (model, config)."""
    sd, cfg = prepare_gpt(sd, **config_overrides)
    model = assign_load(lambda: GPT(cfg, operations=operations, dtype=dtype), sd, dtype, device)
    return model.eval(), cfg


def load_gpt_file(path: str, operations=nn, dtype=None, device=None, **config_overrides) -> tuple:
    """.safetensors (ControlAR release) or .pt (LlamaGen, `{"model": …}` or raw FSDP); NaN/Inf checked on read."""
    return load_gpt(read_state_dict(path), operations=operations, dtype=dtype, device=device, **config_overrides)


# -- VQ -------------------------------------------------------------------------------------------

def check_vq_layout(sd: Mapping) -> None:
    if not all(k in sd for k in VQ_MARKERS):
        hint = " (this is the GPT: load it with the GPT loader)" if all(k in sd for k in GPT_MARKERS) else ""
        raise CheckpointError(f"expected a {WHAT_VQ} (VQ-16: {', '.join(VQ_MARKERS)}, "
                              f"decoder.conv_blocks.N.res.M.*, …); found {describe_foreign(sd)}{hint}")


def infer_vq_config(sd: Mapping) -> VQConfig:
    check_vq_layout(sd)
    try:
        levels = _indices(sd, re.compile(r"decoder\.conv_blocks\.(\d+)\."))
        res = _indices(sd, re.compile(r"decoder\.conv_blocks\.0\.res\.(\d+)\."))
        ch = sd["decoder.conv_out.weight"].shape[1]                 # ch · ch_mult[0], and ch_mult[0] = 1 for VQ-16
        widths = [sd[f"decoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] for i in levels]   # top-down
        ch_mult = tuple(w // ch for w in reversed(widths))
        n, e = sd["quantize.embedding.weight"].shape
        return VQConfig(codebook_size=n, codebook_embed_dim=e, ch=ch, ch_mult=ch_mult,
                        num_res_blocks=len(res) - 1, z_channels=sd["post_quant_conv.weight"].shape[0],
                        in_channels=sd["encoder.conv_in.weight"].shape[1] if "encoder.conv_in.weight" in sd else 3,
                        out_channels=sd["decoder.conv_out.weight"].shape[0],
                        usage_buffer=sd["quantize.codebook_used"].shape[0] if "quantize.codebook_used" in sd
                        else 65536)
    except KeyError as e:
        raise CheckpointError(f"{WHAT_VQ}: cannot read the configuration from the weights, {e.args[0]} is "
                              f"missing ({len(sd)} tensors found)") from None


def vq_expected_shapes(cfg: VQConfig) -> dict:
    return meta_shapes(lambda: VQModel(cfg))


def prepare_vq(sd: Mapping, what: str = WHAT_VQ) -> tuple:
    cfg = infer_vq_config(sd)
    check_strict(vq_expected_shapes(cfg), sd, f"{what} ({cfg.describe()})")
    return dict(sd), cfg


def load_vq(sd: Mapping, operations=nn, dtype=None, device=None) -> tuple:
    """Strictly load a VQ state dict (encoder and the usage buffer included, as the reference's strict load)."""
    sd, cfg = prepare_vq(sd)
    model = assign_load(lambda: VQModel(cfg, operations=operations, dtype=dtype), sd, dtype, device)
    return model.eval(), cfg


def load_vq_file(path: str, operations=nn, dtype=None, device=None) -> tuple:
    """`vq_ds16_t2i.pt` / `vq_ds16_c2i.pt` (`{"model": …}`, also `ema` / `state_dict`) or a flat .safetensors."""
    return load_vq(read_state_dict(path), operations=operations, dtype=dtype, device=device)
