"""ControlAR's caption: FLAN-T5-XL through our T5 encoder (kernels/t5.py, config from the weights), 120 tokens,
LEFT-padded with the pad rows zeroed, as ControlAR was trained (../shared/specs/controlar.md §6).

Tokenising and cleaning happen outside the kernel (the node has the tokenizer); this module takes the token ids
and mask as T5 returns them (right-padded, `padding="max_length"`, truncation) and applies the sampler's rule.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..t5 import T5Encoder

MAX_LENGTH = 120   # caption rows (= cls_token_num of the released models)


def left_pad(emb: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded T5 output [B, T, C] + mask [B, T] -> (left-padded, pads exactly 0; flipped mask).

    The reference (sample_t2i.py) moves the v valid rows of each caption to the end (cat(emb[v:], emb[:v])),
    flips the mask, and multiplies the embeddings by it."""
    rows, masks = [], []
    for e, m in zip(emb, mask):
        v = int(m.sum())
        rows.append(torch.cat([e[v:], e[:v]]))
        masks.append(m.flip(0))
    new_mask = torch.stack(masks)
    return torch.stack(rows) * new_mask[:, :, None].to(emb.dtype), new_mask


@torch.no_grad()
def encode_caption(encoder: T5Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids / mask [B, 120] (right-padded, as the tokenizer gives them) -> the GPT's caption input
    ([B, 120, 2048] left-padded with zero pads, [B, 120] left-padded mask)."""
    device = encoder.shared.weight.device
    emb = encoder(input_ids.to(device), attention_mask.to(device), dtype=dtype)
    return left_pad(emb, attention_mask.to(device))
