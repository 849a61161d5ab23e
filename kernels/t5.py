"""T5-v1.1 text encoder (PixArt's T5-XXL, FLAN-T5): the model math and a strict checkpoint loader.

Lineage: T5 (arXiv 1910.10683) with the v1.1 changes: gated-GELU feed-forward, no bias anywhere,
RMS-style layer norm, untied heads. Only the encoder is built; its output is HF T5EncoderModel's
`last_hidden_state`. Facts: ../shared/specs/pixart.md "Text conditioning".

HF semantics kept on purpose: attention logits are not scaled by 1/sqrt(d_kv) (the scale is folded
into the trained weights), one relative position bias table (block 0) serves every layer, padding is
an additive finfo.min bias, and the layer norm takes its variance in float32.

Every layer with weights is built from an `operations` namespace (default `torch.nn`), as ComfyUI's
own model code is, so a caller can hand in casting / offloading / 8-bit layers. Parameter names are
HF's. This module imports nothing from ComfyUI or transformers.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint_io import (
    CheckpointError,
    SafetensorsStream,
    check_strict,
    describe_foreign,
    meta_shapes,
    read_state_dict,
    safetensors_paths,
    stream_into,
)

# ---------------------------------------------------------------------------------------------
#                                          Config
# ---------------------------------------------------------------------------------------------

@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int                    # per-head width; inner width is num_heads * d_kv (need not equal d_model)
    num_heads: int
    d_ff: int
    num_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128   # not visible in the weights; 128 for every T5
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def xxl(cls) -> "T5Config":
        """google/t5-v1_1-xxl encoder (PixArt-α, SD3, FLUX)."""
        return cls(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def describe(self) -> str:
        """One line for error messages and logs."""
        return (f"{self.num_layers} blocks, d_model {self.d_model}, {self.num_heads} heads x d_kv {self.d_kv}, "
                f"d_ff {self.d_ff}, vocab {self.vocab_size}")


# ---------------------------------------------------------------------------------------------
#                                          Layers
# ---------------------------------------------------------------------------------------------

class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtraction, no bias; variance in float32 whatever the activations' dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # a bare parameter, not an `operations` layer: follow the activations' dtype/device ourselves
        return self.weight.to(dtype=x.dtype, device=x.device) * x32.to(x.dtype)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket (Mesh-TF): exact buckets near 0, log-spaced up to max_distance."""
    half = num_buckets // 2                                      # one half per direction
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    # clamp before the log so distances below max_exact do not produce -inf (they use the exact branch)
    far = distance.clamp(min=max_exact).float()
    # same float32 op order as the reference so that bucket boundaries round identically
    log_bucket = max_exact + (torch.log(far / max_exact) / math.log(max_distance / max_exact)
                              * (half - max_exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, log_bucket)


class T5SelfAttention(nn.Module):
    """Multi-head self-attention without logit scaling; block 0 also owns the relative bias table."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool, ops, **kw):
        super().__init__()
        self.cfg = cfg
        self.q = ops.Linear(cfg.d_model, cfg.inner_dim, bias=False, **kw)
        self.k = ops.Linear(cfg.d_model, cfg.inner_dim, bias=False, **kw)
        self.v = ops.Linear(cfg.d_model, cfg.inner_dim, bias=False, **kw)
        self.o = ops.Linear(cfg.inner_dim, cfg.d_model, bias=False, **kw)
        if has_relative_bias:
            self.relative_attention_bias = ops.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads, **kw)

    def position_bias(self, length: int, device, dtype) -> torch.Tensor:
        """[1, heads, L, L] additive bias from the bucketed key-minus-query distance."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None],         # [L, L]
                                           self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).to(dtype).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # x: [B, L, D]
        b, n, _ = x.shape
        h, dk = self.cfg.num_heads, self.cfg.d_kv
        q, k, v = (proj(x).view(b, n, h, dk).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # scale=1.0: T5 never divides by sqrt(d_kv); bias carries position and padding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # [B, h, L, dk]
        return self.o(out.transpose(1, 2).reshape(b, n, h * dk))


class T5GatedGeluFF(nn.Module):
    """v1.1 feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x). HF calls it DenseReluDense for history."""

    def __init__(self, cfg: T5Config, ops, **kw):
        super().__init__()
        self.wi_0 = ops.Linear(cfg.d_model, cfg.d_ff, bias=False, **kw)
        self.wi_1 = ops.Linear(cfg.d_model, cfg.d_ff, bias=False, **kw)
        self.wo = ops.Linear(cfg.d_ff, cfg.d_model, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh-approximate GELU is exactly HF's `gelu_new`
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5AttentionLayer(nn.Module):
    """Pre-norm residual around self-attention (HF `layer.0`)."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool, ops, **kw):
        super().__init__()
        self.SelfAttention = T5SelfAttention(cfg, has_relative_bias, ops, **kw)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5FeedForwardLayer(nn.Module):
    """Pre-norm residual around the gated FF (HF `layer.1`)."""

    def __init__(self, cfg: T5Config, ops, **kw):
        super().__init__()
        self.DenseReluDense = T5GatedGeluFF(cfg, ops, **kw)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, ops, **kw):
        super().__init__()
        self.layer = nn.ModuleList([T5AttentionLayer(cfg, has_relative_bias, ops, **kw),
                                    T5FeedForwardLayer(cfg, ops, **kw)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    """Embedding lookup, the blocks, the final norm (HF `encoder.`)."""

    def __init__(self, cfg: T5Config, embed_tokens: nn.Module, ops, **kw):
        super().__init__()
        self.embed_tokens = embed_tokens               # the same module as `shared`: HF ties them
        self.block = nn.ModuleList([T5Block(cfg, i == 0, ops, **kw) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                                 # [B, L, D]
        if dtype is None:
            dtype = x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) \
                else torch.float32                                       # fp8 / int8 tables: compute in fp32
        if x.dtype.itemsize == 1:
            # e4m3fn has a NaN code; a stray one in a quantised table must not poison the whole caption
            x = torch.nan_to_num(x.to(dtype))
        x = x.to(dtype)
        b, n, _ = x.shape
        bias = self.block[0].layer[0].SelfAttention.position_bias(n, x.device, dtype)   # [1, h, L, L]
        if attention_mask is not None:
            # finfo.min rather than -inf: a fully padded row then stays finite, as in HF
            pad = torch.zeros(b, 1, 1, n, device=x.device, dtype=dtype)
            pad = pad.masked_fill(attention_mask.to(x.device).view(b, 1, 1, n) == 0, torch.finfo(dtype).min)
            bias = bias + pad                                            # [B, h, L, L]
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """T5EncoderModel: token ids [B, L] (+ mask, 1 = token) -> last_hidden_state [B, L, d_model]."""

    def __init__(self, config: T5Config, operations=nn, dtype=None, device=None):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, device=device)
        self.shared = operations.Embedding(config.vocab_size, config.d_model, **kw)
        self.encoder = T5Stack(config, self.shared, operations, **kw)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """`dtype`: compute dtype; default the embedding's (float32 for fp8 tables)."""
        return self.encoder(input_ids, attention_mask, dtype)


# ---------------------------------------------------------------------------------------------
#                                        Checkpoints
# ---------------------------------------------------------------------------------------------

class T5CheckpointError(CheckpointError):
    """A file or state dict that is not a loadable T5-v1.1 encoder (CheckpointError is a ValueError)."""


# Full T5ForConditionalGeneration files carry these; the encoder never reads them.
DROPPED_PREFIXES = ("decoder.", "lm_head.")
EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")
_ATTN = "encoder.block.{}.layer.0.SelfAttention."
_FF = "encoder.block.{}.layer.1.DenseReluDense."
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")


def read_t5_state_dict(path) -> dict:
    """Tensors of a T5 encoder from a .safetensors/.bin file, an HF folder (sharded or not), or a
    diffusers repo root (its `text_encoder/`). Keys are returned as stored; load_t5_encoder checks them."""
    path = _weights_path(path)
    try:
        return read_state_dict(path)
    except CheckpointError as e:
        raise T5CheckpointError(f"cannot read T5 encoder weights from {path}: {e}") from None
    except (OSError, KeyError, ValueError) as e:   # e.g. an index json naming a missing shard
        raise T5CheckpointError(f"cannot read T5 encoder weights from {path}: {type(e).__name__}: {e}") from None


def _block_indices(sd: Mapping) -> list:
    return sorted({int(m.group(1)) for k in sd for m in [_BLOCK.match(k)] if m})


def infer_t5_config(state_dict: Mapping[str, torch.Tensor]) -> T5Config:
    """T5Config from tensor shapes alone (max distance and epsilon are not stored: T5 defaults)."""
    sd = state_dict
    blocks = _block_indices(sd)

    def first(*names):
        for name in names:
            if name in sd:
                return sd[name]
        raise T5CheckpointError(f"cannot infer the T5 config: none of {list(names)} is in the state dict")

    embed = first(*EMBED_KEYS)                                            # [vocab, d_model]
    rel = first(_ATTN.format(0) + "relative_attention_bias.weight")       # [buckets, heads]
    q = first(*(_ATTN.format(i) + "q.weight" for i in blocks))            # [heads * d_kv, d_model]
    wi = first(*(_FF.format(i) + "wi_0.weight" for i in blocks))          # [d_ff, d_model]
    buckets, heads = rel.shape
    if q.shape[0] % heads:
        raise T5CheckpointError(f"cannot infer the T5 config: q.weight has {q.shape[0]} rows, "
                                f"not a multiple of the {heads} heads of relative_attention_bias")
    return T5Config(vocab_size=embed.shape[0], d_model=embed.shape[1], d_kv=q.shape[0] // heads,
                    num_heads=heads, d_ff=wi.shape[0], num_layers=blocks[-1] + 1,
                    relative_attention_num_buckets=buckets)


def t5_expected_shapes(config: T5Config) -> dict:
    """{name: shape} of T5Encoder(config), built on the meta device (costs no memory)."""
    return meta_shapes(lambda: T5Encoder(config))


def _hints(sd: Mapping) -> list:
    """Plain-words guesses for the common wrong T5 files, appended to a strict-load error."""
    keys = list(sd)
    hints = []
    if "scaled_fp8" in sd or any(k.endswith((".scale_weight", ".scale_input")) for k in keys):
        n = sum(k.endswith((".scale_weight", ".scale_input")) for k in keys)
        hints.append(f"this is a ComfyUI scaled-fp8 file (`scaled_fp8` marker, {n} per-layer scale_weight/"
                     "scale_input tensors); its weights are only right after multiplying by those scales, "
                     "which this loader does not do: use the plain t5xxl_fp16 / t5xxl_fp8_e4m3fn file")
    if any(k.endswith("DenseReluDense.wi.weight") for k in keys):
        hints.append("an un-gated `DenseReluDense.wi` feed-forward means original T5 (v1.0, ReLU), not v1.1")
    if any(".relative_attention_bias." in k and not k.startswith(_ATTN.format(0)) for k in keys):
        hints.append("relative attention bias in every block means UMT5, not T5-v1.1")
    return hints


def _not_t5_error(sd: Mapping) -> T5CheckpointError:
    sample = ", ".join(sorted(sd)[:6]) if sd else "(no tensors)"
    msg = f"not a T5 encoder: found keys like {sample}"
    nested = sorted({k[: k.index("encoder.block.")] for k in sd if ".encoder.block." in k})
    if nested:
        msg += f"\nT5 keys sit under the prefix {nested[0]!r}: strip it before loading"
    elif sd:
        msg += f"\nthe weights look like {describe_foreign(sd)}"
    return T5CheckpointError(msg + "\nexpected a T5-v1.1 encoder: shared.weight, "
                             "encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight, "
                             "encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight, ...")


def _check(sd: dict, config: Optional[T5Config]) -> T5Config:
    """Raise T5CheckpointError naming every missing / unexpected / mis-shaped key; return the config."""
    found = f"found {len(sd)} tensors"
    try:
        cfg = config or infer_t5_config(sd)
    except T5CheckpointError as e:
        # no config, so no shapes to check: name every wrong key from the names alone
        n = (_block_indices(sd) or [0])[-1] + 1
        names = t5_expected_shapes(T5Config(vocab_size=1, d_model=1, d_kv=1, num_heads=1, d_ff=1, num_layers=n))
        expected, what = {k: tuple(sd[k].shape) if k in sd else () for k in names}, f"T5-v1.1 encoder ({e})"
    else:
        expected, what = t5_expected_shapes(cfg), f"T5-v1.1 encoder ({cfg.describe()})"
    try:
        check_strict(expected, sd, f"expected a {what}; {found}")
    except CheckpointError as e:
        raise T5CheckpointError("\n".join([str(e), *_hints(sd)])) from None
    return cfg


def _checked(sd: dict, operations, dtype, config) -> T5Config:
    """Validate a (real or meta) encoder state dict in place: ties the embedding names, checks strictly."""
    if not any(k in sd for k in EMBED_KEYS) and not _block_indices(sd):
        raise _not_t5_error(sd)
    # HF ties encoder.embed_tokens to shared: files hold one or both; use one tensor for both names
    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if emb is not None and all(tuple(sd.get(k, emb).shape) == tuple(emb.shape) for k in EMBED_KEYS):
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"] = emb
    cfg = _check(sd, config)
    if operations is nn and dtype is None and any(v.dtype.itemsize == 1 for v in sd.values()):
        raise ValueError("the T5 weights are 8-bit (e.g. fp8) and torch.nn layers cannot compute with them: "
                         "pass dtype= (e.g. torch.bfloat16) or casting `operations` (e.g. comfy.ops.manual_cast)")
    return cfg


def _empty_encoder(cfg: T5Config, operations, dtype) -> T5Encoder:
    """The encoder on the meta device, for inference: no random init, no second copy (weights are assigned)."""
    with torch.device("meta"):
        model = T5Encoder(cfg, operations=operations, dtype=dtype)
    return model.requires_grad_(False).eval()


def _load(state_dict: dict, operations, dtype, device, config, consume: bool) -> Tuple[T5Encoder, T5Config]:
    sd = {k: v for k, v in state_dict.items() if not k.startswith(DROPPED_PREFIXES)}
    if consume:
        state_dict.clear()        # from here on `sd` holds the only reference to each tensor
    cfg = _checked(sd, operations, dtype, config)

    model = _empty_encoder(cfg, operations, dtype)
    sd.pop("encoder.embed_tokens.weight")
    out = {}
    for name in list(sd):
        t = sd.pop(name)          # with consume, the cast copy is the only one left alive
        out[name] = t if dtype is None and device is None else t.to(device=device, dtype=dtype)
    out["encoder.embed_tokens.weight"] = out["shared.weight"]   # cast once, tied again
    model.load_state_dict(out, strict=True, assign=True)
    return model, cfg


def load_t5_encoder(state_dict: Mapping[str, torch.Tensor], operations=nn, dtype=None, device=None,
                    config: Optional[T5Config] = None) -> Tuple[T5Encoder, T5Config]:
    """Strictly load a T5-v1.1 encoder; returns (model, config).

    decoder.* and lm_head.* (full T5ForConditionalGeneration files) are dropped; anything else that
    does not match raises T5CheckpointError naming every key. The config is inferred from shapes
    unless given. dtype=None keeps the stored dtypes (tensors are then shared, not copied). The input
    dict is left as it is; use load_t5_encoder_file to let go of each tensor as soon as it is cast."""
    return _load(state_dict, operations, dtype, device, config, consume=False)


def _weights_path(path) -> str:
    """A diffusers repo root stands for its text_encoder/ folder."""
    path = os.fspath(path)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _WEIGHT_FILES) \
            and os.path.isdir(os.path.join(path, "text_encoder")):
        return os.path.join(path, "text_encoder")
    return path


def t5_stored_dtype(path) -> torch.dtype:
    """The dtype of a T5 file's block weights, without loading them (safetensors: from the headers;
    other formats are memory-mapped, so only their metadata is read)."""
    path = _weights_path(path)
    paths = safetensors_paths(path)
    if paths is not None:
        sd = SafetensorsStream(paths).meta_state_dict()
    else:
        sd = read_t5_state_dict(path)
    return next((v.dtype for k, v in sd.items() if ".block." in k), torch.float32)


def load_t5_encoder_file(path, operations=nn, dtype=None, device=None,
                         config: Optional[T5Config] = None) -> Tuple[T5Encoder, T5Config]:
    """Strictly load a T5 encoder from a file, shards or folder, keeping little more than the result
    resident: safetensors are checked from their headers, then read one tensor at a time and each layer
    converted (cast, or quantised by int8 `operations`) before the next is read. Other formats are read
    whole (memory-mapped), then converted tensor by tensor."""
    path = _weights_path(path)
    paths = safetensors_paths(path)
    if paths is None:
        return _load(read_t5_state_dict(path), operations, dtype, device, config, consume=True)
    try:
        stream = SafetensorsStream(paths)
    except CheckpointError as e:
        raise T5CheckpointError(f"cannot read T5 encoder weights from {path}: {e}") from None
    sd = {k: v for k, v in stream.meta_state_dict().items() if not k.startswith(DROPPED_PREFIXES)}
    cfg = _checked(sd, operations, dtype, config)
    model = _empty_encoder(cfg, operations, dtype)

    def fetch(name):
        if name in EMBED_KEYS:   # the tied embedding: whichever name the file stores
            name = next(k for k in EMBED_KEYS if k in stream.entries)
        return stream.read(name) if name in stream.entries else None

    stream_into(model, fetch, dtype=dtype, device=device)
    return model, cfg
