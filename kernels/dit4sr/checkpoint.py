"""DiT4SR checkpoints: the released diffusers layout (acceptee/DiT4SR `dit4sr_{q,f,r1}/transformer/`), config read
from the weights (cross-checked with the config.json beside the file when there is one), strict loading, and
errors that name a foreign file.

The release is a self-contained full transformer in diffusers' `SD3Transformer2DModel` naming plus the control
tensors (manifests/sd3_dit4sr/dit4sr_transformer.json). Strict apart from one documented list: the dead `attn2`
tensors (DEAD_TENSOR_PARTS) that exist only because upstream's `AttentionZero` passes `added_kv_proj_dim` to
`attn2` too; they are random, untrained and never read, so they may be present or absent and are dropped.
`to_k_control` is NOT in that list: it is trained and must be in the file, although the forward never uses it.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional

import torch.nn as nn

from ..checkpoint_io import (
    CheckpointError,
    assign_load,
    check_strict,
    describe_foreign,
    meta_shapes,
    read_json_beside,
    read_state_dict,
)
from .model import DiT4SR, DiT4SRConfig

# The dead tensors, per dual-attention block i: transformer_blocks.{i}.attn2.<part>. (130 tensors / 122.8 M
# parameters in the release, its manifest's `unused_untrained_tensors`.)
DEAD_TENSOR_PARTS = ("add_q_proj.weight", "add_q_proj.bias", "add_k_proj.weight", "add_k_proj.bias",
                     "add_v_proj.weight", "add_v_proj.bias", "to_add_out.weight", "to_add_out.bias",
                     "norm_added_q.weight", "norm_added_k.weight")

# Keys a DiT4SR file has and an SD3 / SD3.5 base transformer does not.
CONTROL_MARKERS = ("attn.to_q_control.weight", "attn.to_v_control.weight", "attn.to_out_control.weight",
                   "ff.control_conv.weight")

WHAT = "DiT4SR transformer"


def dead_tensor_names(cfg: DiT4SRConfig) -> list:
    """The documented list for `cfg`: every dead attn2 tensor of every dual-attention block."""
    return [f"transformer_blocks.{i}.attn2.{part}" for i in cfg.dual_attention_layers for part in DEAD_TENSOR_PARTS]


def _block_indices(sd) -> list:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(r"transformer_blocks\.(\d+)\.", k)] if m})


def check_layout(sd: dict) -> None:
    """Raise a CheckpointError that says what the file is, unless it is a diffusers-layout DiT4SR transformer."""
    sd3_keys = ("pos_embed.proj.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
                "transformer_blocks.0.attn.to_q.weight")
    has_control = any(k.endswith("_control.weight") or ".control_conv." in k for k in sd)
    # a DiT4SR file that lost some of the SD3 keys is still DiT4SR: the strict check names what is missing
    if (not has_control and not all(k in sd for k in sd3_keys)) \
            or any(k.startswith("single_transformer_blocks.") for k in sd):
        native = any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in sd)
        hint = (" (ComfyUI's single-file MMDiT naming: DiT4SR needs its own diffusers-layout transformer, "
                "dit4sr_q/transformer/diffusion_pytorch_model.safetensors)") if native else ""
        raise CheckpointError(f"expected a {WHAT} (diffusers SD3 naming: pos_embed.proj.weight, "
                              f"transformer_blocks.N.attn.to_q_control.weight, ff.control_conv.weight, …); "
                              f"found {describe_foreign(sd)}{hint}")
    if not has_control:
        dual = sum(1 for k in sd if re.match(r"transformer_blocks\.\d+\.attn2\.to_q\.weight$", k))
        base = "an SD3.5 base transformer" if dual else "an SD3 base transformer"
        raise CheckpointError(f"this is {base} (diffusers layout, {len(sd)} tensors) without DiT4SR's control "
                              f"tensors (transformer_blocks.N.{{{', '.join(CONTROL_MARKERS)}}}): it is the base "
                              f"model, not DiT4SR. Load acceptee/DiT4SR's dit4sr_q (or _f, _r1) transformer.")


# config.json key -> DiT4SRConfig field, for the keys that decide the layout (caption_projection_dim is the
# hidden size, derived; ff_inner_dim is not written by diffusers: 4 × hidden)
CONFIG_JSON_FIELDS = {"num_layers": "num_layers", "num_attention_heads": "num_heads",
                      "attention_head_dim": "head_dim", "patch_size": "patch_size", "in_channels": "in_channels",
                      "out_channels": "out_channels", "joint_attention_dim": "joint_attention_dim",
                      "pooled_projection_dim": "pooled_projection_dim", "pos_embed_max_size": "pos_embed_max_size",
                      "dual_attention_layers": "dual_attention_layers", "sample_size": "sample_size"}


def infer_config(sd: dict, config_json: Optional[dict] = None) -> DiT4SRConfig:
    """DiT4SRConfig from the shapes (meta tensors are enough); config.json, when given, must agree."""
    try:
        cfg = _infer_config(sd, config_json)
    except KeyError as e:
        raise CheckpointError(f"{WHAT}: cannot read the configuration from the weights, {e.args[0]} is missing "
                              f"({len(sd)} tensors found)") from None
    _check_config_json(cfg, config_json)
    return cfg


def _infer_config(sd: dict, config_json: Optional[dict]) -> DiT4SRConfig:
    proj = sd["pos_embed.proj.weight"]                              # [D, C, p, p]
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    blocks = _block_indices(sd)
    head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0] \
        if "transformer_blocks.0.attn.norm_q.weight" in sd else 64
    if "pos_embed.pos_embed" in sd:
        max_size = int(round(sd["pos_embed.pos_embed"].shape[1] ** 0.5))
    else:                                                           # strict check will name it missing
        max_size = (config_json or {}).get("pos_embed_max_size", 384)
    return DiT4SRConfig(
        num_layers=1 + max(blocks), num_heads=hidden // head_dim, head_dim=head_dim, patch_size=patch,
        in_channels=in_ch, out_channels=sd["proj_out.weight"].shape[0] // (patch * patch),
        joint_attention_dim=sd["context_embedder.weight"].shape[1],
        pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        pos_embed_max_size=max_size,
        ff_inner_dim=sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0],
        dual_attention_layers=tuple(i for i in blocks if f"transformer_blocks.{i}.attn2.to_q.weight" in sd),
        sample_size=(config_json or {}).get("sample_size", 128))


def _config_json_disagreements(cfg: DiT4SRConfig, config_json: Optional[dict]) -> list:
    """Lines 'key: config.json says X, the weights have Y' for every layout key that config.json gets wrong."""
    if not config_json:
        return []
    said = {"num_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim, "patch_size": cfg.patch_size, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "joint_attention_dim": cfg.joint_attention_dim,
            "pooled_projection_dim": cfg.pooled_projection_dim, "pos_embed_max_size": cfg.pos_embed_max_size,
            "caption_projection_dim": cfg.hidden_size, "dual_attention_layers": list(cfg.dual_attention_layers)}
    wrong = [f"{k}: config.json says {config_json[k]}, the weights have {v}" for k, v in said.items()
             if k in config_json and config_json[k] is not None
             and (list(config_json[k]) if isinstance(config_json[k], (list, tuple)) else config_json[k]) != v]
    if config_json.get("qk_norm", "rms_norm") != "rms_norm":
        wrong.append(f"qk_norm: config.json says {config_json['qk_norm']!r}, DiT4SR uses 'rms_norm'")
    return wrong


def _check_config_json(cfg: DiT4SRConfig, config_json: Optional[dict]) -> None:
    wrong = _config_json_disagreements(cfg, config_json)
    if wrong:
        raise CheckpointError(f"{WHAT}: the config.json beside the weights does not describe them:\n"
                              + "\n".join(wrong))


def config_from_json(config_json: dict, base: Optional[DiT4SRConfig] = None) -> DiT4SRConfig:
    """The configuration config.json declares (layout keys over `base`, else over the released defaults with
    a feed-forward of 4 × hidden, as diffusers builds it). A key of the wrong type is a CheckpointError."""
    fields = {}
    for key, field in CONFIG_JSON_FIELDS.items():
        value = config_json.get(key)
        if value is None:
            continue
        if field == "dual_attention_layers":
            if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) for i in value):
                raise CheckpointError(f"{WHAT}: config.json's {key} is {value!r}; expected a list of block "
                                      f"numbers, e.g. [0, 1, …, 12]")
            value = tuple(value)
        elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{WHAT}: config.json's {key} is {value!r}; expected a positive integer")
        fields[field] = value
    if base is None:
        heads = fields.get("num_heads", DiT4SRConfig.num_heads)
        head_dim = fields.get("head_dim", DiT4SRConfig.head_dim)
        base = DiT4SRConfig(ff_inner_dim=4 * heads * head_dim)
    return replace(base, **fields)


def _layout_problems(cfg: DiT4SRConfig, sd: dict) -> tuple:
    """(missing, unexpected, mismatched) tensor names of `sd` against the model `cfg` describes."""
    expected, tolerated = expected_shapes(cfg), set(dead_tensor_names(cfg))
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and k not in tolerated]
    mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    return missing, unexpected, mismatched


def variant_name(cfg: DiT4SRConfig) -> str:
    size = "SD3.5-medium" if (cfg.hidden_size, cfg.num_layers) == (1536, 24) else f"D{cfg.hidden_size}x{cfg.num_layers}"
    return f"DiT4SR ({size}, dual attention in {len(cfg.dual_attention_layers)} blocks)"


def expected_shapes(cfg: DiT4SRConfig) -> dict:
    """{name: shape} of the model for `cfg`, without the dead tensors (meta device: costs no memory)."""
    return meta_shapes(lambda: DiT4SR(cfg))


def prepare_dit4sr(sd: dict, config_json: Optional[dict] = None, what: str = WHAT) -> tuple:
    """(checked state dict without the dead tensors, config). Raises CheckpointError naming every problem.

    Missing tensors are named as missing before config.json is compared: a file that lost whole blocks reads
    as a smaller model from its shapes, so the weights are first checked strictly against what config.json
    declares; only when they fit a model of their own but not config.json's is config.json blamed."""
    check_layout(sd)
    if not config_json:
        cfg = infer_config(sd)
        _check_strict(cfg, sd, what)
        return _without_dead(sd, cfg), cfg
    try:
        from_weights = _infer_config(sd, config_json)
    except KeyError:
        from_weights = None                              # too little left to read: config.json says what to expect
    declared = config_from_json(config_json, from_weights)
    missing, unexpected, mismatched = _layout_problems(declared, sd)
    if (missing and not unexpected and not mismatched) or from_weights is None:
        # only tensors config.json's model has are absent (or too many to read a model from the rest): the
        # file lost them. A config.json that is wrong about a complete file shows as shapes that differ, or
        # as tensors the declared model does not have, and is handled below.
        _check_strict(declared, sd, what + " as its config.json declares it")
    if missing or unexpected or mismatched:
        _check_strict(from_weights, sd, what)             # the weights are not even a model of their own
    _check_config_json(from_weights, config_json)         # a model, but not the one config.json describes
    return _without_dead(sd, from_weights), from_weights


def _check_strict(cfg: DiT4SRConfig, sd: dict, what: str) -> None:
    check_strict(expected_shapes(cfg), sd, f"{what} ({variant_name(cfg)})", tolerated=dead_tensor_names(cfg))


def _without_dead(sd: dict, cfg: DiT4SRConfig) -> dict:
    dead = set(dead_tensor_names(cfg))
    return {k: v for k, v in sd.items() if k not in dead}


def load_dit4sr(sd: dict, config_json: Optional[dict] = None, operations=nn, dtype=None, device=None) -> tuple:
    """Strictly load a DiT4SR state dict -> (model, config).

    dtype None keeps a single-dtype file as it is; a mixed file (the release: F16 base, F32 control tensors)
    is brought to the base's dtype, as the reference's fp16 autocast computes every layer in it."""
    sd, cfg = prepare_dit4sr(sd, config_json)
    if dtype is None:
        dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
        if len(dtypes) > 1:
            dtype = sd["pos_embed.proj.weight"].dtype
    model = assign_load(lambda: DiT4SR(cfg, operations=operations, dtype=dtype), sd, dtype, device)
    return model, cfg


def load_dit4sr_file(path: str, operations=nn, dtype=None, device=None) -> tuple:
    """A file or a diffusers `transformer/` folder (its config.json beside it is read and checked)."""
    return load_dit4sr(read_state_dict(path), read_json_beside(path), operations=operations, dtype=dtype,
                       device=device)
