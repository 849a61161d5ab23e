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
    """(content − mean) / std · style std + style mean, in one full-size tensor (updated in place: the colour fix
    runs at the output size, where every temporary is 12 bytes per pixel)."""
    c_mean, c_std = _mean_std(content)
    s_mean, s_std = _mean_std(style)
    return (content - c_mean).div_(c_std).mul_(s_std).add_(s_mean)


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The 3×3 binomial kernel [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16 with dilation `radius` and replicate
    padding, as its two separable [1, 2, 1] / 4 passes over shifted views: at the output size a depthwise
    conv's unfolded input costs ~9 copies of the image, this costs two."""
    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        pad = (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0)
        padded = F.pad(t, pad, mode="replicate")
        n = t.shape[dim]
        out = padded.narrow(dim, 0, n) + padded.narrow(dim, 2 * radius, n)
        return out.add_(padded.narrow(dim, radius, n), alpha=2.0).mul_(0.25)
    return along(along(x, 2), 3)


def wavelet_decomposition(x: torch.Tensor, levels: int = 5):
    """(high frequencies, low frequencies), high = Σ (x_i − blur_i(x_i))."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_low(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The low frequencies of `wavelet_decomposition`: the blurs alone (no high-frequency sum to keep)."""
    for i in range(levels):
        x = _blur(x, 2 ** i)
    return x


def wavelet(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """content's high frequencies + style's low ones. The high part telescopes, Σ (x_i − x_{i+1}) = x_0 − x_L,
    so this is content − low(content) + low(style): the same sum without a full-size accumulator per level."""
    out = wavelet_low(content).neg_().add_(content)
    return out.add_(wavelet_low(style))


def colour_fix(content: torch.Tensor, style: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """content, style: [B, C, H, W] in [0, 1], same size (style broadcast over the batch when it has one image)."""
    if method not in METHODS:
        raise ValueError(f"colour fix method {method!r}: expected one of {METHODS}")
    if style.shape[0] == 1 and content.shape[0] > 1:
        style = style.expand(content.shape[0], -1, -1, -1)
    out = (adain if method == "adain" else wavelet)(content.float(), style.float())
    return out.clamp_(0.0, 1.0)
