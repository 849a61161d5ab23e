"""What DiT4SR Conditioning accepts, decided from the sizes alone — before anything is allocated.

The transformer and the two VAE passes work in tiles, so their memory does not grow with the output. What
does grow are the tensors the graph holds at full output size: the empty and the sampled latent (and the
sampler's copies of it), the LR latent, the upscaled input (DiT4SR Conditioning's `upscaled`, the colour
reference, kept by ComfyUI until the prompt ends), the decoded image, the colour-fixed image and the save's
8-bit copy, plus the temporaries of the decode's blend and of the colour fix. Measured after sampling, where
they peak (tests/benchmarks/bench_dit4sr_graph.py, part `fullsize`): 62 bytes per output pixel with the AdaIN
colour fix, 86 with the wavelet one, at 4096² (0.96 / 1.34 GiB); FULL_SIZE_BYTES_PER_PIXEL rounds that up
with the latents (1 byte per pixel each). The limit, 4096 × 4096 px (16.8 MP), keeps that part at most
1.6 GiB, a fifth of the transformer's own working set (8.45 GiB, bench_dit4sr_step.py), so the graph's peak
stays that of the transformer's tiles; an 8000² result would add 6 GiB, a 16000² one (4000² ×4) 24 GiB.

Strips: an input more than `max_aspect` (16) times as long as it is wide holds no 2-D detail to restore, and the
reference's preparation enlarges its short side to min_short_side / upscale — its long side with it: a 512×1
strip at ×1 becomes a 32768×64 picture of one stretched row, a 1×512 strip at ×4 a 512×262144 one. Refused by
name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .preprocess import processed_size

MIN_OUTPUT_SIDE = 16                    # px: two latent pixels, the transformer's patch
FULL_SIZE_BYTES_PER_PIXEL = 100         # graph-held bytes per output pixel (measured 62-86, rounded up)
TRANSFORMER_WORKING_SET_GIB = 8.45      # bench_dit4sr_step.py: peak RSS at 1024² and 2048², full-size model


@dataclass(frozen=True)
class SizeLimits:
    max_output_pixels: int = 4096 * 4096    # per prompt: width × height × batch of the result
    max_aspect: float = 16.0                # long side / short side of the input


class SizeLimitError(ValueError):
    """An input DiT4SR Conditioning refuses from its size alone (the message says why and what to do)."""


def _mp(pixels: float) -> str:
    return f"{pixels / 1e6:.1f} MP"


def _fits(width: int, height: int, upscale: int, min_short_side: int, batch: int, limits: SizeLimits) -> bool:
    (w, h), _ = processed_size(width, height, upscale, min_short_side)
    return w * h * batch <= limits.max_output_pixels


def check_output_size(width: int, height: int, upscale: int, min_short_side: int, batch: int = 1,
                      limits: SizeLimits = SizeLimits()) -> tuple:
    """(output width, output height) of DiT4SR's preparation of a width × height input, or a SizeLimitError
    that names the size, the limit, why, and what to do. Arithmetic only: nothing is allocated."""
    long_side, short_side = max(width, height), min(width, height)
    (w, h), steps = processed_size(width, height, upscale, min_short_side)
    if long_side > limits.max_aspect * short_side:
        pad_w, pad_h = ((width, math.ceil(width / limits.max_aspect)) if width >= height
                        else (math.ceil(height / limits.max_aspect), height))
        raise SizeLimitError(
            f"DiT4SR Conditioning: the input is {width}×{height} px, a strip ({long_side / short_side:.0f}:1); "
            f"this node takes images up to {limits.max_aspect:g}:1. A strip holds no 2-D detail to restore, and "
            f"the preparation enlarges its short side to min_short_side / upscale = {min_short_side // upscale} px "
            f"and its long side with it: the result would be {w}×{h} px ({_mp(w * h)}) of stretched rows. Crop "
            f"the image to a picture, or pad it to at most {limits.max_aspect:g}:1 (e.g. {pad_w}×{pad_h} px).")
    if w < MIN_OUTPUT_SIDE or h < MIN_OUTPUT_SIDE:
        raise SizeLimitError(f"DiT4SR Conditioning: the upscaled image would be {w}×{h} px; it must be at least "
                             f"{MIN_OUTPUT_SIDE}×{MIN_OUTPUT_SIDE} px: raise min_short_side or the upscale")
    pixels = w * h * batch
    if pixels <= limits.max_output_pixels:
        return w, h
    side = math.isqrt(limits.max_output_pixels)
    what = f"{w}×{h} px result" + (f" × {batch} images" if batch > 1 else "")
    source = f"{width}×{height} px input ×{upscale}"
    if len(steps) == 3:
        source += f", first enlarged to {steps[0][0]}×{steps[0][1]} px by min_short_side {min_short_side}"
    held = pixels * FULL_SIZE_BYTES_PER_PIXEL / 2 ** 30
    options = []
    smaller = [f for f in (4, 2, 1) if f < upscale and _fits(width, height, f, min_short_side, batch, limits)]
    if smaller:
        (sw, sh), _ = processed_size(width, height, smaller[0], min_short_side)
        options.append(f"upscale ×{smaller[0]} ({sw}×{sh} px)")
    if len(steps) == 3:
        # the enlargement to min_short_side / upscale sets the size, not the input: a smaller input won't help
        lower = next((m for m in range(min_short_side - 8, 63, -8)
                      if _fits(width, height, upscale, m, batch, limits)), None)
        options.append(f"a lower min_short_side (at most {lower} here)" if lower else "a lower min_short_side")
    else:
        scale = math.sqrt(limits.max_output_pixels / pixels)
        iw, ih = max(1, int(width * scale)), max(1, int(height * scale))
        while (iw > 1 or ih > 1) and not _fits(iw, ih, upscale, min_short_side, batch, limits):
            iw, ih = max(1, int(iw * 0.99)), max(1, int(ih * 0.99))
        if _fits(iw, ih, upscale, min_short_side, batch, limits):
            options.append(f"a smaller input (at most about {iw}×{ih} px at ×{upscale})")
        options.append("upscale the image in parts (crops) and join the results")
    if batch > 1:
        options.append("fewer images per prompt")
    raise SizeLimitError(
        f"DiT4SR Conditioning: a {what} ({source}) is {_mp(pixels)}, over this node's limit of "
        f"{_mp(limits.max_output_pixels)} ({side}×{side} px). The transformer and the VAE work in tiles, but the "
        f"graph holds the result at full size several times (latents, the upscaled input that is the colour "
        f"reference, the decoded and the colour-fixed image: about {FULL_SIZE_BYTES_PER_PIXEL} bytes per output "
        f"pixel, {held:.1f} GiB here, on top of the transformer's {TRANSFORMER_WORKING_SET_GIB} GiB), so memory "
        f"would no longer stay bounded. Use " + ", or ".join(options) + ".")
