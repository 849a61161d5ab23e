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


# ---------------------------------------------------------------------------------------------
#        Condition images of the kinds whose maps are made from a photo (issue 28)
# ---------------------------------------------------------------------------------------------
# The released spatial LoRAs' names are MultiGen-20M's tasks (salesforce/UniControl), whose data makes
# their condition images; EasyControl's own inpainting example (test_imgs/inpainting.png) is a photo with
# the hole painted pure black, as UniControl's Inpainter writes it.

INPAINT_MASK_THRESHOLD = 0.5
# UniControl's hedsketch drew the binarising threshold at random from [110, 160) per image; the middle
# of that range is the default, the node lets users move it
HED_SKETCH_THRESHOLD = 135


def inpainting_condition(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] image, [H, W] / [B|1, H, W] mask (1 = to repaint, ComfyUI's MASK) -> [B, H, W, 3]:
    the image with every pixel whose mask is at least 0.5 set to black (0, 0, 0), as the inpainting LoRA's
    condition images are. A mask of another size is resized to the image's (bilinear) first."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"inpainting mask: expected [H, W] or [B, H, W] with B = 1 or {images.shape[0]} "
                         f"(the image batch); got shape {tuple(mask.shape)}")
    mask = mask.to(images.device, torch.float32)
    if mask.shape[-2:] != images.shape[1:3]:
        mask = torch.nn.functional.interpolate(mask[:, None], size=images.shape[1:3], mode="bilinear",
                                               align_corners=False)[:, 0]
    keep = (mask < INPAINT_MASK_THRESHOLD).to(images.dtype)[..., None]
    return images[..., :3] * keep


def hed_sketch(edges: torch.Tensor, threshold: int = HED_SKETCH_THRESHOLD) -> torch.Tensor:
    """HED soft edges [B, H, W, C] in [0, 1] (white on black) -> the hedsketch LoRA's sketch [B, H, W, 3]:
    black strokes on white, as UniControl's hedsketch data: the 8-bit edge map (x·255 truncated, as the HED
    annotator writes it) binarised (> threshold -> 255), inverted, then a 3×3 Gaussian blur (kernel
    [1, 2, 1]/4 each way, border reflected without repeating the edge pixel) rounded to 8 bits."""
    if not 0 <= threshold <= 255:
        raise ValueError(f"hed_sketch: threshold must be in 0..255 (the 8-bit edge scale), got {threshold}")
    e8 = (edges[..., :3].clamp(0, 1).float() * 255.0).floor()      # float32, as the annotator multiplies
    inverted = torch.where(e8 > threshold, 0.0, 255.0).double().movedim(-1, 1)   # [B, 3, H, W]
    k = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64, device=edges.device)
    channels = inverted.shape[1]
    x = torch.nn.functional.pad(inverted, (1, 1, 1, 1), mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, 3).expand(channels, 1, 1, 3), groups=channels)
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 3, 1).expand(channels, 1, 3, 1), groups=channels)
    # x is an integer 0..255·16: exact in float64; round half up to 8 bits like the fixed-point blur
    return (((x + 8.0) / 16.0).floor() / 255.0).to(edges.dtype).movedim(1, -1).contiguous()
