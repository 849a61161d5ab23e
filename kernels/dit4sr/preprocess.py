"""The DiT4SR reference's input preparation (test/test_wllava.py), on ComfyUI-style IMAGE tensors [B, H, W, C]
in [0, 1]. Resizing is PIL's bicubic on 8-bit images, as upstream resizes the PIL image it loaded.

1. If either side is smaller than `process_size // upscale`, bicubic-upscale so the short side equals it
   (sizes truncated with int(), as upstream);
2. bicubic ×upscale;
3. bicubic to the nearest lower multiple of 8 (PIL returns a copy when the size is already right).

The result is both the control image (VAE-encoded, then `(z − 0.0609)·1.5305`, SD3's latent format) and the
colour reference of the colour fix. Upstream finally resizes the output to `original × upscale` (bicubic);
in a graph that is core's ImageScale, if wanted (`resize_bicubic` here is that resize).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PROCESS_SIZE = 512          # the reference's --process_size: minimum short side of the output


def _to_pil(img: torch.Tensor) -> Image.Image:
    arr = (img.clamp(0, 1).cpu().float().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr[..., :3])


def _from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)


def processed_size(width: int, height: int, upscale: int, process_size: int = PROCESS_SIZE) -> tuple:
    """(width, height) of the upscaled control image, and the sizes of every resize on the way."""
    steps = []
    w, h = width, height
    floor = process_size // upscale
    if w < floor or h < floor:
        scale = floor / min(w, h)
        w, h = int(scale * w), int(scale * h)
        steps.append((w, h))
    w, h = w * upscale, h * upscale
    steps.append((w, h))
    w, h = w // 8 * 8, h // 8 * 8
    steps.append((w, h))
    return (w, h), steps


def upscale_image(images: torch.Tensor, upscale: int, process_size: int = PROCESS_SIZE) -> torch.Tensor:
    """[B, H, W, C] in [0, 1] -> [B, H', W', 3]: the reference's resize chain (PIL bicubic, 8-bit)."""
    _, steps = processed_size(images.shape[2], images.shape[1], upscale, process_size)
    out = []
    for im in images:
        pil = _to_pil(im)
        for size in steps:
            pil = pil.resize(size, Image.BICUBIC)
        out.append(_from_pil(pil))
    return torch.stack(out)


def resize_bicubic(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, height, width, 3], PIL bicubic (8-bit), as upstream's last resize."""
    return torch.stack([_from_pil(_to_pil(im).resize((width, height), Image.BICUBIC)) for im in images])
