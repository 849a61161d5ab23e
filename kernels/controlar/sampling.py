"""ControlAR / LlamaGen token sampling: CFG on logits, temperature, top-k, top-p, one multinomial draw per token,
and the generate loop (prefill + one-token decode over a static KV cache) with a per-token callback.

Lineage: hustvl/ControlAR@87e32e9 autoregressive/models/generate.py (= LlamaGen's with the control condition).
Facts: ../shared/specs/controlar.md §4, §5.

RNG: nothing but one `torch.multinomial(p, 1)` per image token draws from the generator, so a generator seeded
with s gives the reference's tokens after `torch.manual_seed(s)` (CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .gpt import GPT


@dataclass
class SamplingSettings:
    cfg_scale: float = 4.0          # ControlAR sample_t2i.py default
    cfg_interval: int = -1          # > −1: after that many decode steps only the cond logits are used
    temperature: float = 1.0
    top_k: int = 2000
    top_p: float = 1.0
    sample: bool = True             # False: argmax (greedy), no RNG
    control_strength: float = 1.0   # README/demo use 0.6 for the *_base models


def combine_cfg(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """[2B, …] with cond rows first -> uncond + (cond − uncond)·cfg, on raw logits (before temperature)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * cfg_scale


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[B, V]: top-k keeps every logit ≥ the k-th largest (ties kept); top-p removes sorted entries whose
    cumulative softmax exceeds p, shifted by one so the first entry over the threshold stays; −inf elsewhere."""
    logits = logits.clone()
    if top_k > 0:
        k = min(max(top_k, 1), logits.size(-1))
        logits[logits < torch.topk(logits, k)[0][..., -1, None]] = -float("inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, order, remove)] = -float("inf")
    return logits


def sample_token(logits: torch.Tensor, s: SamplingSettings, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Last-position logits [B, V] -> tokens [B, 1]: temperature, top-k/top-p, softmax, one multinomial draw."""
    logits = logits / max(s.temperature, 1e-5)
    if s.top_k > 0 or s.top_p < 1.0:
        logits = filter_logits(logits, s.top_k, s.top_p)
    probs = F.softmax(logits, dim=-1)
    if not s.sample:
        return torch.topk(probs, k=1, dim=-1)[1]
    return torch.multinomial(probs, num_samples=1, generator=generator)


# callback(j, n, tokens): called after image token j (0-based) of n is chosen; tokens [B, j + 1] so far.
# For progress, previews (decode the finished rows) and interrupts (raise from the callback).
TokenCallback = Callable[[int, int, torch.Tensor], None]


@torch.no_grad()
def generate(model: GPT, prefix: torch.Tensor, num_tokens: int, settings: SamplingSettings,
             generator: Optional[torch.Generator] = None, caption_mask: Optional[torch.Tensor] = None,
             control: Optional[torch.Tensor] = None, uncond_prefix: Optional[torch.Tensor] = None,
             callback: Optional[TokenCallback] = None) -> torch.Tensor:
    """Image tokens [B, num_tokens] in raster order.

    prefix [B, T, dim]: model.embed_prefix(caption) (t2i) or of class ids (c2i). caption_mask [B, T] (1 = token,
    left-padded) masks the caption columns for the cond and the uncond half alike. control [3, B, N, dim]:
    model.control_tokens(...) of the cond half; the uncond half gets zeros (exactly what zero adapter features
    give). uncond_prefix [B, T, dim]: default, for t2i, the embedded `uncond_embedding` (all rows, not zeroed at
    pads); for c2i the null class (index num_classes). CFG runs when cfg_scale > 1, as in the reference."""
    cfg = model.cfg
    b, t, _ = prefix.shape
    if t != cfg.cls_token_num:
        raise ValueError(f"the prefix has {t} rows; this model was trained with T = {cfg.cls_token_num}")
    if num_tokens > cfg.block_size:
        raise ValueError(f"{num_tokens} image tokens exceed the model's block size {cfg.block_size}")
    if control is not None and control.shape[2] != num_tokens:
        raise ValueError(f"{control.shape[2]} control tokens for {num_tokens} image tokens: the control image "
                         f"must be the generation size (one control token per 16-px image token)")
    use_cfg = settings.cfg_scale > 1.0
    if use_cfg:
        if uncond_prefix is None and cfg.model_type == "t2i":
            null = model.cls_embedding.uncond_embedding.to(prefix.dtype)
            uncond_prefix = model.embed_prefix(null.expand(b, -1, -1))
        elif uncond_prefix is None:                              # c2i: the null class
            uncond_prefix = model.embed_prefix(torch.full((b,), cfg.num_classes, device=prefix.device))
        prefix = torch.cat([prefix, uncond_prefix.to(prefix.dtype)])
        if caption_mask is not None:
            caption_mask = torch.cat([caption_mask, caption_mask])
        if control is not None:
            control = torch.cat([control, torch.zeros_like(control)], dim=1)
    cache = model.new_cache(prefix.shape[0], num_tokens, caption_mask)
    strength = settings.control_strength

    def pick(logits: torch.Tensor, cfg_on: bool) -> torch.Tensor:
        if use_cfg:
            logits = combine_cfg(logits, settings.cfg_scale) if cfg_on else logits.chunk(2, dim=0)[0]
        return sample_token(logits, settings, generator)

    tokens = torch.empty(b, num_tokens, dtype=torch.long, device=prefix.device)
    logits = model.prefill(prefix, cache, control, strength)[:, -1]                  # [B(·2), V]
    tokens[:, 0:1] = pick(logits, True)
    if callback is not None:
        callback(0, num_tokens, tokens[:, :1])
    for j in range(1, num_tokens):
        cur = tokens[:, j - 1:j]
        if use_cfg:
            cur = torch.cat([cur, cur])                          # the same token is fed to both halves
        logits = model.decode(cur, t + j - 1, cache, control, strength)[:, -1]
        cfg_on = not (settings.cfg_interval > -1 and (j - 1) > settings.cfg_interval)
        tokens[:, j:j + 1] = pick(logits, cfg_on)
        if callback is not None:
            callback(j, num_tokens, tokens[:, :j + 1])
    return tokens
