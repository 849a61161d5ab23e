"""ControlAR text-to-image in one call, for the nodes: control image -> control tokens -> tokens -> image.

The node supplies the caption (text.encode_caption), a seeded torch.Generator and a per-token callback
(progress, interrupts, previews); everything else is the kernel. Facts: ../shared/specs/controlar.md.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..int8 import ROUTE_ENV, qlinear_engine, select_route

from .dinov2 import resize_mode
from .gpt import GPT
from .sampling import SamplingSettings, TokenCallback, generate
from .vq import VQModel


def fast_decode_route(device) -> tuple:
    """(int8 route or None for the default, reason): the fastest route for the GPT's int8 linear layers.

    A decode step multiplies only 2·batch rows (CFG). There the exact routes dequantise each weight into a
    float GEMM (torch._int_mm is only used above 16 rows), which moves more bytes than the float weights
    themselves. On the CPU, torch's dynamic quantized linear ("qlinear", fbgemm / oneDNN) reads the packed
    int8 weights directly at any row count, with per-tensor 7-bit activations (less exact). Elsewhere, or
    when DIT_CONTROL_INT8_ROUTE is set, the default route."""
    device = torch.device(device)
    if os.environ.get(ROUTE_ENV, "").strip().lower() not in ("", "auto"):
        return None, select_route(device)[1]
    if device.type == "cpu" and qlinear_engine() is not None:
        return "qlinear", (f"{qlinear_engine()} dynamic int8 linear: reads the int8 weights directly at the "
                           f"decode steps' few rows; per-tensor 7-bit activations")
    return None, select_route(device)[1]


def check_size(model: GPT, height: int, width: int) -> tuple:
    """(rows, cols) of image tokens; H and W must be multiples of 16 and (H/16)(W/16) ≤ block size."""
    if height % 16 or width % 16:
        raise ValueError(f"ControlAR generates multiples of 16 px (one VQ-16 token each); got {width}×{height}")
    h, w = height // 16, width // 16
    if h * w > model.cfg.block_size:
        raise ValueError(f"{width}×{height} needs {h * w} image tokens; this model's block size is "
                         f"{model.cfg.block_size} (e.g. {16 * model.cfg.grid}×{16 * model.cfg.grid})")
    return h, w


@torch.no_grad()
def text_to_image(gpt: GPT, vq: VQModel, caption: torch.Tensor, caption_mask: torch.Tensor,
                  control_image: Optional[torch.Tensor], condition_type: str, settings: SamplingSettings,
                  generator: Optional[torch.Generator], callback: Optional[TokenCallback] = None,
                  size: Optional[tuple] = None) -> tuple:
    """caption [B, T, 2048] left-padded with zero pads + mask [B, T]; control_image [B, 3, H, W] in [−1, 1] at the
    generation size (None: no control). Returns (tokens [B, N], image [B, 3, H, W] ≈[−1, 1], not clamped).
    `size` (H, W) is needed only without a control image."""
    height, width = control_image.shape[2:] if control_image is not None else size
    h, w = check_size(gpt, height, width)
    control = None
    if control_image is not None:
        control = gpt.control_tokens(gpt.adapter_features(control_image, resize_mode(condition_type)))
    tokens = generate(gpt, gpt.embed_prefix(caption), h * w, settings, generator, caption_mask, control,
                      callback=callback)
    return tokens, vq.decode_code(tokens, h, w)
