"""Canny edge maps as ControlNet's canny annotator makes them: cv2.Canny run on the uint8 RGB image.

Source: lllyasviel/ControlNet annotator/canny/__init__.py (`cv2.Canny(img, low, high)` on the HWC uint8
RGB frame, no grayscale conversion; for 3 channels OpenCV takes, per pixel, the channel with the
strongest gradient). The map is 0/255, white edges on black, and ControlNet feeds it as map / 255.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch


def _to_uint8_frames(image) -> tuple[list[np.ndarray], torch.device]:
    """[B,C,H,W] tensor or HW / HWC array -> list of contiguous uint8 HWC (or HW) frames, and the output device."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"canny_edges wants [B,3,H,W] (or [B,1,H,W]); got {tuple(image.shape)}")
        device = image.device
        frames = image.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    else:
        frames = np.asarray(image)
        if frames.ndim == 2:
            frames = frames[..., None]
        if frames.ndim != 3 or frames.shape[-1] not in (1, 3):
            raise ValueError(f"canny_edges wants an HWC array with 1 or 3 channels; got {frames.shape}")
        device = torch.device("cpu")
        frames = frames[None]
    if frames.dtype != np.uint8:
        # Round, not truncate: a float image that came from uint8 must map back to the same bytes
        # (0.2 * 255 is 50.99999 in float32, which truncation would turn into 50).
        frames = np.clip(np.rint(frames.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames], device


def canny_edges(image, low_threshold: float, high_threshold: float) -> torch.Tensor:
    """RGB [B,3,H,W] in [0,1] (or an HWC uint8/[0,1] array) -> Canny edges [B,1,H,W] float in {0,1}."""
    frames, device = _to_uint8_frames(image)
    maps = [cv2.Canny(f, float(low_threshold), float(high_threshold)) for f in frames]
    edges = torch.from_numpy(np.stack(maps)).unsqueeze(1).float() / 255.0
    return edges.to(device)
