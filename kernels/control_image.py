"""Fitting a control image to the generation size, and turning an edge map into the RGB image the VAE encodes.

PixArt-δ's app (PixArt-alpha/PixArt-alpha@cac2fd3b app/app_controlnet.py) prepares the control image with
`T.Resize(min(H, W))` (short side, bilinear; on a PIL image, which always antialiases) then
`T.CenterCrop([H, W])` and `T.ToTensor()`. Here the image is already a float tensor, so the resize is
torch bilinear with antialias=True: what torchvision's Resize does on tensors from 0.17 on, and a close
match to PIL's antialiased bilinear (PIL rounds to uint8 after resizing; this stays in float).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FIT_MODES = ("center_crop", "resize", "pixart_app")


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased, align_corners=False; untouched when the size already matches (as torchvision)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def _center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's center_crop: zero-pad if too small (the extra pixel goes right/bottom), then crop."""
    in_h, in_w = image.shape[-2:]
    if height > in_h or width > in_w:
        pad_h, pad_w = max(height - in_h, 0), max(width - in_w, 0)
        image = F.pad(image, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        in_h, in_w = image.shape[-2:]
    # Python's round (half to even) on purpose: torchvision computes the offset this way.
    top = int(round((in_h - height) / 2.0))
    left = int(round((in_w - width) / 2.0))
    return image[..., top:top + height, left:left + width]


def resized_size(in_h: int, in_w: int, height: int, width: int, mode: str) -> tuple:
    """(h, w) the image is resized to before the centre crop (the target itself for "resize"). For a strip
    far from the target's aspect this is much larger than the target: a 1×8000 px strip covering 1024×1024
    becomes 1024×8 192 000 px, of which 1/8000 is kept."""
    if mode not in FIT_MODES:
        raise ValueError(f"unknown fit mode {mode!r}; choose one of {FIT_MODES}")
    if mode == "resize":
        return height, width
    if mode == "center_crop":
        # Scale so both sides cover the target: never pads. Equals "pixart_app" whenever the app's
        # short-side rule already covers the target (same orientation, image at least as elongated).
        scale = max(height / in_h, width / in_w)
        return max(height, round(in_h * scale)), max(width, round(in_w * scale))
    # The app's exact rule: short side -> min(height, width), long side truncated as torchvision's
    # Resize(int) does. If that leaves a side short of the target, CenterCrop pads with black.
    short = min(height, width)
    if in_w <= in_h:
        return int(short * in_h / in_w), short
    return short, int(short * in_w / in_h)


def fit_control_image(image: torch.Tensor, height: int, width: int, mode: str = "center_crop") -> torch.Tensor:
    """[B,C,h,w] -> [B,C,height,width]: "center_crop" (cover, then crop), "resize" (stretch) or "pixart_app"."""
    if image.ndim != 4:
        raise ValueError(f"fit_control_image wants [B,C,H,W]; got {tuple(image.shape)}")
    new_h, new_w = resized_size(*image.shape[-2:], height, width, mode)
    if not image.is_floating_point():
        image = image.float()
    if mode == "resize":
        return _resize(image, height, width)
    return _center_crop(_resize(image, new_h, new_w), height, width)


def edges_to_control_rgb(edges: torch.Tensor) -> torch.Tensor:
    """Edge map [B,1,H,W] in [0,1] -> [B,3,H,W] in [0,1]; ComfyUI's VAE encode maps it to [-1,1] itself."""
    if edges.ndim != 4 or edges.shape[1] not in (1, 3):
        raise ValueError(f"edges_to_control_rgb wants [B,1,H,W]; got {tuple(edges.shape)}")
    return edges.float().clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
