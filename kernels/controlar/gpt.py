"""LlamaGen GPT with ControlAR's control injection: config, 2-D RoPE, static KV cache, prefill + one-token decode.

Lineage: LlamaGen (FoundationVision/LlamaGen@ce98ec4 autoregressive/models/gpt.py, arXiv 2406.06525), a Llama
decoder over VQ-16 image tokens with a caption (T2I) or class (C2I) prefix; ControlAR
(hustvl/ControlAR@87e32e9 gpt_t2i.py / gpt.py, arXiv 2410.02705) adds a control encoder whose per-token features
are added to the hidden state before layers 0, n/3, 2n/3. Facts: ../shared/specs/controlar.md §1, §4, §8.

Parameter names are the released files' (no prefix). Every layer with weights is built from an `operations`
namespace (default `torch.nn`), as ComfyUI's own model code is. The KV cache is an object of its own, not module
state, so the state dict stays exactly the released one and one model can serve several generations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dinov2 import ControlEncoder, Dinov2Config

# ---------------------------------------------------------------------------------------------
#                                          Config
# ---------------------------------------------------------------------------------------------

# (dim, n_layer) -> n_head: the head count is not visible in the weights (wqkv is [3·dim, dim] for any split).
# GPT_models of LlamaGen, released sizes first, then the defined-but-unreleased ones.
KNOWN_HEADS = {
    (768, 12): 12,     # GPT-B
    (1024, 24): 16,    # GPT-L
    (1280, 36): 20,    # GPT-XL
    (1536, 48): 24,    # GPT-XXL
    (3200, 24): 32,    # GPT-3B (head_dim 100)
    (2560, 48): 40,    # GPT-XXXL
    (2048, 22): 32,    # GPT-1B
    (4096, 32): 32,    # GPT-7B
}
MODEL_NAMES = {(768, 12): "GPT-B", (1024, 24): "GPT-L", (1280, 36): "GPT-XL", (1536, 48): "GPT-XXL",
               (3200, 24): "GPT-3B", (2560, 48): "GPT-XXXL", (2048, 22): "GPT-1B", (4096, 32): "GPT-7B"}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class GPTConfig:
    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    ffn_hidden: int = 3584         # round_up(int(8·dim/3), 256); read from w1 so odd test models work too
    vocab_size: int = 16384
    model_type: str = "t2i"        # "t2i": caption prefix (cap_proj); "c2i": class prefix (embedding_table)
    cls_token_num: int = 120       # prefix length T: caption tokens (rows of cls_embedding.uncond_embedding); 1 for c2i
    caption_dim: int = 2048        # FLAN-T5-XL width (t2i)
    num_classes: int = 1000        # c2i; the table has one more row, the null class
    block_size: int = 1024         # image tokens the RoPE grid covers: 1024 (32²), 2304 (48², *_MR), 256 (c2i 256 px)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    control: Optional[Dinov2Config] = None   # ControlAR: the control encoder; None for a plain LlamaGen base
    condition_norm: bool = False   # C2I ControlAR files carry an unused `condition_norm.weight`

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid(self) -> int:
        return int(round(self.block_size ** 0.5))

    @property
    def layer_internal(self) -> int:
        """Control is injected before every layer i with i % layer_internal == 0 (0, n/3, 2n/3)."""
        return self.n_layer // 3

    @property
    def injection_layers(self) -> tuple:
        return tuple(i for i in range(self.n_layer) if i % self.layer_internal == 0)

    def describe(self) -> str:
        name = MODEL_NAMES.get((self.dim, self.n_layer), f"GPT dim {self.dim} x {self.n_layer} layers")
        ctrl = f", control {self.control.describe()}" if self.control is not None else ""
        return (f"{name} {self.model_type} ({self.n_head} heads, FFN {self.ffn_hidden}, vocab {self.vocab_size}, "
                f"T {self.cls_token_num}, block {self.block_size}{ctrl})")


# ---------------------------------------------------------------------------------------------
#                                     2-D RoPE (LlamaGen's)
# ---------------------------------------------------------------------------------------------

def rope_table_2d(grid: int, head_dim: int, prefix: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """[prefix + grid², head_dim/2, 2] (cos, sin), float32 as the reference builds it.

    Rows 0…prefix−1 are ZEROS (cos = sin = 0, not identity): the released weights were trained with the prefix's
    q and k wiped out. Row prefix + i is grid cell (i // grid, i % grid): row angles first, then column angles.
    The table is indexed by sequence position, so an MR model on a non-48-wide image wraps on the 48-wide grid,
    exactly as it was trained (spec §8)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half))   # [hd/4]
    t = torch.arange(grid, device=device).float()
    f = torch.outer(t, freqs)                                                          # [g, hd/4]
    cells = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], dim=-1)  # [g,g,hd/2]
    table = torch.stack([torch.cos(cells), torch.sin(cells)], dim=-1).flatten(0, 1)   # [g², hd/2, 2]
    return torch.cat([torch.zeros(prefix, half, 2, device=device), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, hd], table [S, hd/2, 2]: rotate interleaved pairs (x[2i], x[2i+1]) (Meta Llama's layout).
    The reference rotates in float32 (x.float()) and casts back."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)                                       # [B, S, H, hd/2, 2]
    t = table.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                       xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


# ---------------------------------------------------------------------------------------------
#                                          Layers
# ---------------------------------------------------------------------------------------------

class LlamaGenRMSNorm(nn.Module):
    """x·rsqrt(mean(x²) + eps) in float32, cast back, times weight (upstream: LlamaGen's `RMSNorm`)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out * self.weight.to(x.dtype)


class LlamaGenMLP(nn.Module):
    """Linear → GELU(tanh) → Linear, no biases: cap_proj, adapter_mlp, condition_mlp, condition_layers
    (upstream: LlamaGen's `MLP`)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, ops=nn, **kw):
        super().__init__()
        self.fc1 = ops.Linear(in_features, hidden, bias=False, **kw)
        self.fc2 = ops.Linear(hidden, out_features, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class LlamaGenCaptionEmbedder(nn.Module):
    """T2I prefix: cap_proj over the T5 rows. `uncond_embedding` is a buffer (a random init persisted in the
    file, never trained): it is the CFG null caption, so it must come from the file (upstream: LlamaGen's
    `CaptionEmbedder`)."""

    def __init__(self, caption_dim: int, dim: int, rows: int, ops=nn, dtype=None, device=None):
        super().__init__()
        self.register_buffer("uncond_embedding", torch.empty(rows, caption_dim, dtype=dtype, device=device))
        self.cap_proj = LlamaGenMLP(caption_dim, dim, dim, ops, dtype=dtype, device=device)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:   # [B, T, caption_dim] -> [B, T, dim]
        return self.cap_proj(caption)


class LabelEmbedder(nn.Module):
    """C2I prefix: one row per class plus the null class (index num_classes) used for CFG."""

    def __init__(self, num_classes: int, dim: int, ops=nn, **kw):
        super().__init__()
        self.embedding_table = ops.Embedding(num_classes + 1, dim, **kw)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:   # [B] -> [B, 1, dim]
        return self.embedding_table(labels).unsqueeze(1)


class ConditionMLP(nn.Module):
    """ControlAR's `condition_mlp`: cap_proj dim → dim → dim. Its zeros buffer `uncond_embedding [block_size, dim]`
    only served training dropout; it is kept because it is in the file (and its row count tells block_size)."""

    def __init__(self, dim: int, block_size: int, ops=nn, dtype=None, device=None):
        super().__init__()
        self.register_buffer("uncond_embedding", torch.zeros(block_size, dim, dtype=dtype, device=device))
        self.cap_proj = LlamaGenMLP(dim, dim, dim, ops, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(x)


# a decode step multiplies 2·batch rows (CFG): at most this many rows count as "few" (prefill has B·T rows)
FEW_ROWS = 8


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, with the decode steps' bf16 CPU GEMMs ordered as W·xᵀ. With so few rows oneDNN's x·Wᵀ takes a
    small-M path that runs well below the memory bound; as W·xᵀ the weight is the large left operand, streamed once:
    a GPT-XL decode step in bf16 takes 185 ms of CPU time instead of 258 ms (Intel Xeon with AMX, 1 thread;
    tests/benchmarks/README.md). The same products, summed in another order. Only plain float layers whose weight
    already has the activations' dtype and device take it; int8, casting or patched layers run their own forward."""
    w = getattr(layer, "weight", None)
    if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.numel() > FEW_ROWS * x.shape[-1]
            or not isinstance(layer, nn.Linear) or w.dtype != x.dtype or w.device != x.device
            or getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
            or getattr(layer, "bias_function", None)):
        return layer(x)
    y = torch.mm(w, x.reshape(-1, x.shape[-1]).t()).t()
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], w.shape[0])


class LlamaGenFeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) ⊙ w3 x) (upstream: LlamaGen's `FeedForward`)."""

    def __init__(self, dim: int, hidden: int, ops=nn, **kw):
        super().__init__()
        self.w1 = ops.Linear(dim, hidden, bias=False, **kw)
        self.w3 = ops.Linear(dim, hidden, bias=False, **kw)
        self.w2 = ops.Linear(hidden, dim, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.w2, F.silu(linear(self.w1, x)) * linear(self.w3, x))


class KVCache:
    """Static, preallocated per-layer K/V `[B, heads, L, head_dim]` plus the boolean attention mask `[B, L, L]`,
    L = round_up(T + N, 8) as the reference allocates. Not module state: the state dict stays the released one."""

    def __init__(self, cfg: GPTConfig, batch: int, length: int, dtype, device,
                 caption_mask: Optional[torch.Tensor] = None):
        self.length = find_multiple(length, 8)
        shape = (batch, cfg.n_head, self.length, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        mask = torch.tril(torch.ones(self.length, self.length, dtype=torch.bool, device=device))
        mask = mask.unsqueeze(0).repeat(batch, 1, 1)                                   # [B, L, L]
        if caption_mask is not None:
            # left-padded caption: pad columns are closed for EVERY row, then the diagonal is reopened, so a pad
            # row attends only to itself (its q is 0 anyway: zero RoPE rows)
            t = caption_mask.shape[1]
            mask[:, :, :t] &= caption_mask.to(device=device, dtype=torch.bool)[:, None, :]
            mask |= torch.eye(self.length, dtype=torch.bool, device=device)[None]
        self.mask = mask

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, filled: int):
        """Write k, v at input_pos; return the cache's first `filled` positions (all written so far): attention
        never reads the unwritten tail, whose mask columns are closed anyway. A decode step is memory-bound, so
        this halves the K/V bytes an image's steps read on average."""
        self.k[layer][:, :, input_pos] = k
        self.v[layer][:, :, input_pos] = v
        return self.k[layer][:, :, :filled], self.v[layer][:, :, :filled]


class Attention(nn.Module):
    """Multi-head self-attention with fused q|k|v, 2-D RoPE on q and k, over the static cache."""

    def __init__(self, cfg: GPTConfig, ops=nn, **kw):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = ops.Linear(cfg.dim, 3 * cfg.dim, bias=False, **kw)
        self.wo = ops.Linear(cfg.dim, cfg.dim, bias=False, **kw)

    def forward(self, x, rope, layer: int, input_pos, cache: Optional[KVCache], mask):
        b, s, _ = x.shape
        q, k, v = linear(self.wqkv, x).view(b, s, 3, self.n_head, self.head_dim).unbind(2)   # [B, S, H, hd] each
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                               # [B, H, S, hd]
        if cache is not None:
            k, v = cache.update(layer, input_pos, k, v, mask.shape[-1])                # [B, H, filled, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return linear(self.wo, out.transpose(1, 2).reshape(b, s, -1))


class TransformerBlock(nn.Module):
    """Pre-norm Llama block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: GPTConfig, ops=nn, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.attention = Attention(cfg, ops, **kw)
        self.feed_forward = LlamaGenFeedForward(cfg.dim, cfg.ffn_hidden, ops, **kw)
        self.attention_norm = LlamaGenRMSNorm(cfg.dim, cfg.norm_eps, **kw)
        self.ffn_norm = LlamaGenRMSNorm(cfg.dim, cfg.norm_eps, **kw)

    def forward(self, x, rope, layer, input_pos, cache, mask):
        h = x + self.attention(self.attention_norm(x), rope, layer, input_pos, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


# ---------------------------------------------------------------------------------------------
#                                           GPT
# ---------------------------------------------------------------------------------------------

class GPT(nn.Module):
    """LlamaGen Transformer (t2i / c2i), with ControlAR's control parts when `cfg.control` is set.

    Inference is two calls on a `KVCache` (see sampling.generate): `prefill` over the T prefix rows, then
    `decode` one image token at a time. Control tokens (`control_tokens`) are computed once per image."""

    def __init__(self, cfg: GPTConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        ops, kw = operations, dict(dtype=dtype, device=device)
        if cfg.control is not None:
            self.adapter = ControlEncoder(cfg.control, operations, **kw)
            self.adapter_mlp = LlamaGenMLP(cfg.control.hidden_size, cfg.dim, cfg.dim, ops, **kw)
        if cfg.model_type == "t2i":
            self.cls_embedding = LlamaGenCaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num, ops, **kw)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, ops, **kw)
        self.tok_embeddings = ops.Embedding(cfg.vocab_size, cfg.dim, **kw)
        if cfg.control is not None:
            # condition_embeddings: in the layout, never read at inference (kept so the load is strict)
            self.condition_embeddings = ops.Embedding(cfg.vocab_size, cfg.dim, **kw)
            self.condition_mlp = ConditionMLP(cfg.dim, cfg.block_size, ops, **kw)
            self.condition_layers = nn.ModuleList([LlamaGenMLP(cfg.dim, cfg.dim, cfg.dim, ops, **kw) for _ in range(3)])
        self.layers = nn.ModuleList([TransformerBlock(cfg, ops, **kw) for _ in range(cfg.n_layer)])
        self.norm = LlamaGenRMSNorm(cfg.dim, cfg.norm_eps, **kw)
        if cfg.condition_norm:
            self.condition_norm = LlamaGenRMSNorm(cfg.dim, cfg.norm_eps, **kw)   # C2I layout only; unused
        self.output = ops.Linear(cfg.dim, cfg.vocab_size, bias=False, **kw)
        self._rope = None
        # the dtype activations and the KV cache use; None: the stored weights' (float32 for fp8/int8 storage).
        # A loader handing in casting `operations` (ComfyUI's manual cast) sets it to its compute dtype.
        self.compute_dtype: Optional[torch.dtype] = None

    @property
    def dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        w = self.tok_embeddings.weight.dtype
        return w if w in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32

    # -- pieces -------------------------------------------------------------------------------

    def rope(self, device) -> torch.Tensor:
        """The float32 (cos, sin) table, built once per device (a plain attribute, not in the state dict)."""
        if self._rope is None or self._rope.device != torch.device(device):
            self._rope = rope_table_2d(self.cfg.grid, self.cfg.head_dim, self.cfg.cls_token_num,
                                       self.cfg.rope_base, device=device)
        return self._rope

    def embed_prefix(self, cond: torch.Tensor) -> torch.Tensor:
        """t2i: caption rows [B, T, caption_dim] -> [B, T, dim]; c2i: class ids [B] -> [B, 1, dim]."""
        if self.cfg.model_type == "t2i":
            return self.cls_embedding(cond.to(self.dtype))
        return self.cls_embedding(cond).to(self.dtype)

    def adapter_features(self, control_image: torch.Tensor, resize: str = "nearest") -> torch.Tensor:
        """control image [B, 3, H, W] in [−1, 1] -> adapter_mlp(DINOv2 tokens) [B, N, dim], N = (H/16)(W/16).
        `resize`: "nearest" (condition types canny, seg) or "bicubic" (every other type)."""
        return self.adapter_mlp(self.adapter(control_image.to(self.dtype), resize))

    def control_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """adapter_mlp output [B, N, dim] -> [3, B, N, dim]: condition_layers[k](condition_mlp(·)), strength NOT
        applied (bias-free MLPs: zero features give exactly zero tokens, the CFG uncond half)."""
        c = self.condition_mlp(features)
        return torch.stack([layer(c) for layer in self.condition_layers])

    # -- forward --------------------------------------------------------------------------------

    def forward_hidden(self, h: torch.Tensor, input_pos: torch.Tensor, cache: Optional[KVCache],
                       control: Optional[torch.Tensor] = None, strength: float = 1.0,
                       filled: Optional[int] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h [B, S, dim] at sequence positions input_pos [S] -> logits [B, S, vocab] (float32).

        filled: with a cache, how many leading cache positions hold keys after this call (the last input position
        + 1, a Python int so that no device sync is needed); attention reads only those. None: the whole cache.

        control [3, B, N, dim]: the hidden state at position p receives control token p − T + 1 (the input whose
        output predicts image token j gets token j: prefill adds token 0 at position T − 1 only, feeding image
        token j adds token j + 1), times `strength`, before each injection layer.

        mask [B, 1, S, S] (bool, True = attend): only without a cache, for a whole sequence at once (training on
        left-padded captions); without a cache or a mask, attention is causal."""
        cfg = self.cfg
        rope = self.rope(h.device)[input_pos]                                          # [S, hd/2, 2]
        if cache is not None:
            mask = cache.mask[:, None, input_pos, :filled]                             # [B, 1, S, filled]
        add = None
        if control is not None:
            idx = input_pos - cfg.cls_token_num + 1                                    # control token per position
            keep = (idx >= 0) & (idx < control.shape[2])
            # no bool(keep.any()) or boolean indexing: each is a device-to-host sync, three per generated token on
            # a GPU. Every position gathers a token (index clamped) and the positions without one get exact zeros.
            picked = control[:, :, idx.clamp(0, control.shape[2] - 1)].to(h.dtype) * strength
            add = torch.where(keep[:, None], picked, 0.0)                               # [3, B, S, dim]
        for i, layer in enumerate(self.layers):
            if add is not None and i % cfg.layer_internal == 0:
                h = h + add[i // cfg.layer_internal]
            h = layer(h, rope, i, input_pos, cache, mask)
        return linear(self.output, self.norm(h)).float()

    def prefill(self, prefix: torch.Tensor, cache: KVCache, control=None, strength: float = 1.0) -> torch.Tensor:
        """prefix [B, T, dim] (embed_prefix) -> logits at every prefix position [B, T, vocab]."""
        pos = torch.arange(prefix.shape[1], device=prefix.device)
        return self.forward_hidden(prefix, pos, cache, control, strength, filled=prefix.shape[1])

    def decode(self, tokens: torch.Tensor, position: int, cache: KVCache, control=None,
               strength: float = 1.0) -> torch.Tensor:
        """Feed image tokens [B, 1] at sequence position `position` (= T + j for image token j) -> [B, 1, vocab]."""
        pos = torch.tensor([position], device=tokens.device)
        return self.forward_hidden(self.tok_embeddings(tokens).to(self.dtype), pos, cache, control, strength,
                                   filled=position + 1)

    def new_cache(self, batch: int, num_tokens: int, caption_mask: Optional[torch.Tensor] = None) -> KVCache:
        return KVCache(self.cfg, batch, self.cfg.cls_token_num + num_tokens, self.dtype,
                       self.tok_embeddings.weight.device, caption_mask)
