"""ControlAR text-to-image in one call: control image -> control tokens -> tokens -> image (the golden test's
end-to-end check and any script's entry point), and what the ControlAR nodes share with it: the one size
check (`token_grid`).

The ControlAR Sampler node (nodes/controlar/sampler.py) runs the same steps itself, one token at a time
(sampling.generate, with progress, interrupts and row previews), after checking the size with `token_grid`.
Facts: ../shared/specs/controlar.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dinov2 import resize_mode
from .gpt import GPT, GPTConfig
from .sampling import SamplingSettings, TokenCallback, generate
from .vq import VQModel


def token_grid(config: GPTConfig, height: int, width: int, name: str = "this model") -> tuple:
    """(rows, cols) of image tokens; refuses sizes that are not multiples of 16 (one VQ-16 token is 16×16 px)
    or over the model's token budget ((H/16)·(W/16) ≤ block size). The one size check: the pipeline and the
    ControlAR Sampler node (before it makes the control map) both call it."""
    if height % 16 or width % 16:
        raise ValueError(f"{width}×{height} is not a multiple of 16 px (ControlAR generates multiples of 16 px: "
                         f"one VQ-16 token is 16×16 px)")
    rows, cols = height // 16, width // 16
    budget = config.block_size
    if rows * cols > budget:
        g = 16 * config.grid
        raise ValueError(f"{width}×{height} needs {cols}×{rows} = {rows * cols} image tokens, over the token budget "
                         f"of {budget} tokens (block size) of {name} (width/16 · height/16 ≤ {budget}, e.g. "
                         f"{g}×{g}); choose a smaller size")
    return rows, cols


@torch.no_grad()
def text_to_image(gpt: GPT, vq: VQModel, caption: torch.Tensor, caption_mask: torch.Tensor,
                  control_image: Optional[torch.Tensor], condition_type: str, settings: SamplingSettings,
                  generator: Optional[torch.Generator], callback: Optional[TokenCallback] = None,
                  size: Optional[tuple] = None) -> tuple:
    """caption [B, T, 2048] left-padded with zero pads + mask [B, T]; control_image [B, 3, H, W] in [−1, 1] at the
    generation size (None: no control). Returns (tokens [B, N], image [B, 3, H, W] ≈[−1, 1], not clamped).
    `size` (H, W) is needed only without a control image."""
    height, width = control_image.shape[2:] if control_image is not None else size
    h, w = token_grid(gpt.cfg, height, width)
    control = None
    if control_image is not None:
        control = gpt.control_tokens(gpt.adapter_features(control_image, resize_mode(condition_type)))
    tokens = generate(gpt, gpt.embed_prefix(caption), h * w, settings, generator, caption_mask, control,
                      callback=callback)
    return tokens, vq.decode_code(tokens, h, w)
