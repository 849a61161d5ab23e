"""EasyControl's condition images, prepared as the reference pipeline does (its `VaeImageProcessor` and
subject rule), on ComfyUI-style IMAGE tensors [B, H, W, C] in [0, 1]. Resizing is PIL's Lanczos, as upstream's.

- spatial: resized to exactly S×S, the aspect ignored;
- subject: the long side scaled to S, both sides rounded down to a multiple of 16, centre-padded with
  mid-grey (0 in the VAE's [−1, 1]).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _to_pil(img: torch.Tensor) -> Image.Image:
    arr = (img.clamp(0, 1).cpu().float().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr[..., :3])


def _from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)


def prepare_spatial(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W, C] in [0, 1] -> [B, S, S, 3]: resized to exactly S×S, aspect ignored (Lanczos)."""
    return torch.stack([_from_pil(_to_pil(im).resize((size, size), Image.LANCZOS)) for im in images])


def prepare_subject(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, S, S, 3]: long side scaled to S, both sides rounded down to a multiple of 16,
    centre-padded with mid-grey (0 in the VAE's [−1, 1])."""
    out = []
    for im in images:
        h, w = im.shape[0], im.shape[1]
        scale = size / max(h, w)
        nh, nw = max(16, int(h * scale) // 16 * 16), max(16, int(w * scale) // 16 * 16)
        resized = _from_pil(_to_pil(im).resize((nw, nh), Image.LANCZOS))
        canvas = torch.full((size, size, 3), 0.5)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[top:top + nh, left:left + nw] = resized
        out.append(canvas)
    return torch.stack(out)


def prepare_condition(images: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    return prepare_subject(images, size) if kind == "subject" else prepare_spatial(images, size)
