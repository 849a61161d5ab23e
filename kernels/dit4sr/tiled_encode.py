"""The LR image's VAE encode in tiles (DiT4SR Conditioning): one pass, blended in latent space.

Why: the SD3 VAE's encoder ends in a self-attention over every latent pixel, so encoding the upscaled image
whole costs memory quadratic in its area — a 2000² image asks for 7.8 GB in one allocation, 16000² for far
more than any machine has — and ComfyUI's VAE encode falls back to tiles only on a CUDA out-of-memory error,
never on the CPU allocator's. Core's own tiled encode encodes everything three times (tiles of three shapes,
averaged). Here, like the pack's one-pass tiled decode (kernels/tiled_decode.py) in reverse:

- an image that fits one tile is encoded whole: exactly core's VAE encode;
- a larger one in the fewest tiles no larger than `tile` px whose neighbours overlap by at least `overlap` px
  (kernels/tiled_decode.tile_spans on the latent grid: equal lengths, evenly spread, whole latent pixels),
  each encoded by itself; inside an overlap each latent pixel is a convex combination of the tiles covering
  it, with weights rising linearly from each tile's inner edge (image borders get full weight).

The tile side comes from a memory budget (DiT4SR Conditioning's `tile_batch_mb`, the transformer's) and the
VAE's own estimate of encode memory per pixel, so the encode stays within what one transformer call may use.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from ..tiled_decode import edge_ramp, tile_spans

ENCODE_OVERLAP_PX = 64      # as core's tiled encode and our tiled decode: 8 latent pixels of cross-fade
TILE_STEP_PX = 64           # tile sides are multiples of this (whole latent pixels, a tidy grid)


def encode_tile_side(bytes_per_pixel: float, budget_bytes: int, floor_px: int) -> int:
    """The largest multiple of TILE_STEP_PX px whose square tile's estimated encode memory fits
    `budget_bytes`, and at least `floor_px` (the transformer's own tile side: one tile always runs)."""
    side = int(math.sqrt(max(budget_bytes, 0) / max(bytes_per_pixel, 1e-9))) // TILE_STEP_PX * TILE_STEP_PX
    return max(side, floor_px, TILE_STEP_PX)


def encode_spans(height: int, width: int, tile: int, overlap: int = ENCODE_OVERLAP_PX,
                 scale: int = 8) -> Tuple[list, list]:
    """(rows, columns) of (start, length) spans in latent pixels for an image of height × width px."""
    lat_tile = max(tile // scale, 1)
    lat_overlap = min(overlap // scale, lat_tile // 2)
    return tile_spans(height // scale, lat_tile, lat_overlap), tile_spans(width // scale, lat_tile, lat_overlap)


def _ramps(spans: List[Tuple[int, int]], device=None) -> List[torch.Tensor]:
    """Per tile, latent-resolution weights ramping across its overlaps with the previous / next tile."""
    out = []
    for i, (start, length) in enumerate(spans):
        ramp_in = spans[i - 1][0] + spans[i - 1][1] - start if i > 0 else 0
        ramp_out = start + length - spans[i + 1][0] if i + 1 < len(spans) else 0
        out.append(edge_ramp(length, ramp_in, ramp_out, device))
    return out


def tiled_encode(pixels: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], tile: int,
                 overlap: int = ENCODE_OVERLAP_PX, scale: int = 8,
                 on_tile: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """`encode` ([B, h, w, C] image in [0, 1] -> [B, C', h/scale, w/scale] latent, ComfyUI's `vae.encode`)
    applied tile by tile to `pixels` [B, H, W, C] (H, W multiples of `scale`); `tile`, `overlap` in px.

    `on_tile(done, total)` is called before the first tile (done 0) and after each one: progress, interrupts.
    Returns `encode(pixels)` itself when the image fits one tile."""
    _, height, width, _ = pixels.shape
    if height % scale or width % scale:
        raise ValueError(f"tiled_encode: the image is {width}×{height} px; expected multiples of {scale}")
    ys, xs = encode_spans(height, width, tile, overlap, scale)
    total = len(ys) * len(xs)
    if on_tile is not None:
        on_tile(0, total)
    if total == 1:
        latent = encode(pixels)
        if on_tile is not None:
            on_tile(1, 1)
        return latent
    out = weight = wy = wx = None
    done = 0
    for iy, (y, th) in enumerate(ys):
        for ix, (x, tw) in enumerate(xs):
            piece = encode(pixels[:, y * scale:(y + th) * scale, x * scale:(x + tw) * scale])   # [B, C', th, tw]
            if tuple(piece.shape[-2:]) != (th, tw):
                raise ValueError(f"tiled_encode: a {tw * scale}×{th * scale} px tile encoded to "
                                 f"{piece.shape[-1]}×{piece.shape[-2]}; expected {tw}×{th} (scale {scale})")
            if out is None:
                out = torch.zeros(piece.shape[0], piece.shape[1], height // scale, width // scale,
                                  device=piece.device, dtype=torch.float32)
                weight = torch.zeros(1, 1, height // scale, width // scale, device=piece.device)
                # made where `encode` puts the latent, once (not on the CPU, copied over for every tile)
                wy, wx = _ramps(ys, piece.device), _ramps(xs, piece.device)
            ramp = (wy[iy][:, None] * wx[ix][None, :])[None, None]
            region = (slice(None), slice(None), slice(y, y + th), slice(x, x + tw))
            out[region] += piece.float() * ramp
            weight[region] += ramp
            dtype = piece.dtype
            del piece
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    return (out / weight).to(dtype)
