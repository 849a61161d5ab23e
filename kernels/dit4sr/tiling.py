"""Latent tiling as the DiT4SR reference pipeline does it (pipelines/pipeline_dit4sr.py, test/test_wllava.py).

The transformer was trained on 512 px (64-latent) square crops and its feed-forward conv assumes a square token
grid, so the reference never shows it anything else:
- a latent with h·w ≤ tile² runs in a single pass;
- otherwise square tiles of side min(tile, h, w), starting every tile − overlap, the last tile of each row and
  column aligned to the border; the LR latent is cut identically;
- each tile's prediction is weighted by a separable Gaussian (variance 0.01 of the normalised coordinate), the
  weighted predictions and the weights are summed, and the sum is normalised.

Reproduced exactly, including the reference's half-pixel asymmetry: the Gaussian's centre is (tile − 1)/2
along x but tile/2 along y. Two deliberate differences, both where the reference breaks:
- overlap ≥ tile side (a latent narrower than the overlap) makes the reference loop forever; we clamp the overlap
  to half the tile side;
- a latent that fits but is not square makes the reference assert (or, for a perfect-square token count, conv
  over the wrong neighbours); our model runs it in a single pass with the conv on the true grid (the golden's
  `ns_out_truegrid_EXTENSION`). `TileSettings(square_only=True)` tiles it with square tiles instead.

The tiles go through the model in batches: as many as `memory_budget` allows by the model's own estimate of
one tile's activations, at least one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class TileSettings:
    tile: int = 64                      # latent px (512 image px), the reference's latent_tiled_size
    overlap: int = 24                   # the reference's latent_tiled_overlap (the gradio app uses 16)
    memory_budget: Optional[int] = 1 << 30   # bytes of activations per model call; None: every tile at once
    square_only: bool = False           # tile a non-square latent that would fit, instead of one true-grid pass


def grid_starts(size: int, tile: int, overlap: int) -> list:
    """Tile origins along one axis: every tile − overlap, the last one aligned to the border (reference rule:
    the fewest tiles with (n − 1)(tile − overlap) + tile ≥ size)."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    n = 1
    while (n - 1) * stride + tile < size:
        n += 1
    return [i * stride for i in range(n - 1)] + [size - tile]


def gaussian_weights(tile: int, device=None) -> torch.Tensor:
    """[tile, tile] float64 tile weights on `device`, rows = y, columns = x; the reference's formula (numpy
    float64 there) and its centres ((tile − 1)/2 along x, tile/2 along y)."""
    var = 0.01
    i = torch.arange(tile, dtype=torch.float64, device=device)

    def probs(mid):
        return torch.exp(-(i - mid) * (i - mid) / (tile * tile) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(probs(tile / 2), probs((tile - 1) / 2))


@dataclass(frozen=True)
class TileLayout:
    tile: int
    boxes: tuple          # (y0, x0) of each tile, in the reference's order: x outer, y inner

    @property
    def count(self) -> int:
        return len(self.boxes)


def tile_and_overlap(h: int, w: int, settings: TileSettings) -> Optional[tuple]:
    """(tile side, overlap used) for an h × w latent, or None when it runs in a single pass. The overlap is at
    most half the tile side (see the module docstring): callers that want to say so compare it with theirs."""
    fits = h * w <= settings.tile * settings.tile
    if fits and (h == w or not settings.square_only):
        return None
    tile = min(settings.tile, h, w)
    return tile, min(settings.overlap, tile // 2)


def tile_layout(h: int, w: int, settings: TileSettings) -> Optional[TileLayout]:
    """None when the latent runs in a single pass; else the tiles."""
    sizes = tile_and_overlap(h, w, settings)
    if sizes is None:
        return None
    tile, overlap = sizes
    xs, ys = grid_starts(w, tile, overlap), grid_starts(h, tile, overlap)
    return TileLayout(tile=tile, boxes=tuple((y, x) for x in xs for y in ys))


def tiles_per_call(count: int, bytes_per_tile: Optional[int], budget: Optional[int]) -> int:
    if budget is None or not bytes_per_tile:
        return count
    return max(1, min(count, budget // bytes_per_tile))


def run_tiled(run: Callable, x: torch.Tensor, lr: torch.Tensor, settings: TileSettings,
              bytes_per_tile: Optional[int] = None) -> torch.Tensor:
    """`run(x_tiles, lr_tiles, k)` predicts k tiles of the whole batch stacked tile-major ([k·B, C, t, t]);
    returns the blended prediction [B, C, H, W] (or `run(x, lr, 1)` untouched when one pass fits)."""
    b, _, h, w = x.shape
    layout = tile_layout(h, w, settings)
    if layout is None:
        return run(x, lr, 1)
    t = layout.tile
    per_call = tiles_per_call(layout.count, bytes_per_tile, settings.memory_budget)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    weights = gaussian_weights(t, x.device).to(acc_dtype)
    out = None
    total = torch.zeros(h, w, device=x.device, dtype=acc_dtype)
    for first in range(0, layout.count, per_call):
        boxes = layout.boxes[first:first + per_call]
        xt = torch.cat([x[:, :, y:y + t, x0:x0 + t] for y, x0 in boxes], dim=0)
        lt = torch.cat([lr[:, :, y:y + t, x0:x0 + t] for y, x0 in boxes], dim=0)
        pred = run(xt, lt, len(boxes))                              # [k·B, C_out, t, t]
        if out is None:
            out = torch.zeros(b, pred.shape[1], h, w, device=x.device, dtype=acc_dtype)
        for j, (y, x0) in enumerate(boxes):
            out[:, :, y:y + t, x0:x0 + t] += pred[j * b:(j + 1) * b].to(acc_dtype) * weights
            total[y:y + t, x0:x0 + t] += weights
    return (out / total).to(x.dtype)
