"""Colour fix of the decoded image against the upscaled input (the DiT4SR reference's
utils/wavelet_color_fix.py, from StableSR), on [B, C, H, W] tensors in [0, 1].

- AdaIN (the reference's default): each channel of the output is shifted and scaled to the reference's
  per-channel mean and standard deviation (unbiased variance, eps 1e-5 added to it).
- wavelet: the output's high frequencies + the reference's low frequencies, from a 5-level à-trous
  decomposition with the 3×3 binomial kernel (dilation 2^i, replicate padding).
The result is clamped to [0, 1], as the reference's conversion back to a PIL image does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("adain", "wavelet")


def _mean_std(x: torch.Tensor, eps: float = 1e-5):
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    c_mean, c_std = _mean_std(content)
    s_mean, s_std = _mean_std(style)
    return (content - c_mean) / c_std * s_std + s_mean


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    c = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(x, k[None, None].repeat(c, 1, 1, 1), groups=c, dilation=radius)


def wavelet_decomposition(x: torch.Tensor, levels: int = 5):
    """(high frequencies, low frequencies), high = Σ (x_i − blur_i(x_i))."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    return wavelet_decomposition(content)[0] + wavelet_decomposition(style)[1]


def colour_fix(content: torch.Tensor, style: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """content, style: [B, C, H, W] in [0, 1], same size (style broadcast over the batch when it has one image)."""
    if method not in METHODS:
        raise ValueError(f"colour fix method {method!r}: expected one of {METHODS}")
    if style.shape[0] == 1 and content.shape[0] > 1:
        style = style.expand(content.shape[0], -1, -1, -1)
    out = (adain if method == "adain" else wavelet)(content.float(), style.float())
    return out.clamp(0.0, 1.0)
