"""Draw the pack's registry icon, workflows/icon.png ([tool.comfy] Icon in pyproject.toml points at it).

The motif is "DiT Control": a diffusion transformer's patch grid (6 x 6 latent tokens) on a dark rounded
tile, crossed by an amber control stroke (the control signal); the tokens the stroke runs through take
its colour, as a ControlNet-Transformer's control blocks add to exactly those tokens.

400 x 400 RGBA (the Comfy Registry wants a square icon of at most 400 x 400 px), transparent outside the
tile. Drawn with numpy alone from signed distances (pixel coverage = clip(0.5 - distance, 0, 1) gives the
anti-aliasing), using only +, -, *, /, sqrt, abs, min, max, floor: all exact or correctly rounded in IEEE
arithmetic, so the pixels are the same on every machine and numpy version (no sin/exp, whose SIMD code
differs by ulps).
Pillow only encodes the PNG, without any time stamp or text chunk: the same bytes on every run.

Usage: python tests/generators/make_icon.py [out.png]   (default: workflows/icon.png, the committed file)
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
ICON_REL = "workflows/icon.png"
ICON_PATH = REPO / ICON_REL
SIZE = 400

TILE_TOP = np.array([0x22, 0x2A, 0x4C], dtype=np.float64) / 255.0
TILE_BOTTOM = np.array([0x0E, 0x12, 0x24], dtype=np.float64) / 255.0
TOKEN_DARK = np.array([0x2E, 0x3C, 0x6E], dtype=np.float64) / 255.0
TOKEN_LIGHT = np.array([0x4E, 0x66, 0xAE], dtype=np.float64) / 255.0
AMBER = np.array([0xFF, 0xB0, 0x20], dtype=np.float64) / 255.0
TOKEN_HOT_COLOR = np.array([0xD8, 0x78, 0x18], dtype=np.float64) / 255.0
AMBER_CORE = np.array([0xFF, 0xE8, 0xB0], dtype=np.float64) / 255.0
HALO = np.array([0x0A, 0x0D, 0x1A], dtype=np.float64) / 255.0

GRID = 6                 # tokens per side
GRID_INSET = 58.0        # px from the tile's edge to the grid
TOKEN_GAP = 10.0
STROKE_HALF_WIDTH = 11.0
HALO_EXTRA = 7.0
TOKEN_HOT = 24.0         # a token whose centre is this close to the stroke takes its colour in full,
TOKEN_REACH = 52.0       # fading out to none at this distance


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Fraction of a pixel inside a shape, from the signed distance (px) at its centre."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _rounded_box(px, py, cx, cy, half, radius):
    """Signed distance to a square of half-size `half` centred at (cx, cy) with corner `radius`."""
    qx = np.abs(px - cx) - (half - radius)
    qy = np.abs(py - cy) - (half - radius)
    ox, oy = np.maximum(qx, 0.0), np.maximum(qy, 0.0)
    return np.sqrt(ox * ox + oy * oy) + np.minimum(np.maximum(qx, qy), 0.0) - radius


def _bezier(p0, p1, p2, p3, n: int) -> np.ndarray:
    """n + 1 points of a cubic Bezier (polynomial arithmetic only)."""
    t = np.arange(n + 1, dtype=np.float64) / n
    u = 1.0 - t
    pts = [np.array(p, dtype=np.float64) for p in (p0, p1, p2, p3)]
    return ((u * u * u)[:, None] * pts[0] + (3.0 * u * u * t)[:, None] * pts[1]
            + (3.0 * u * t * t)[:, None] * pts[2] + (t * t * t)[:, None] * pts[3])


def _polyline_distance(px, py, pts: np.ndarray) -> np.ndarray:
    """Distance from every (px, py) to the polyline through pts."""
    best = np.full(np.broadcast(px, py).shape, np.inf)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        dx, dy = bx - ax, by - ay
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        ex, ey = px - ax - t * dx, py - ay - t * dy
        best = np.minimum(best, ex * ex + ey * ey)
    return np.sqrt(best)


def _over(rgb: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return rgb * (1.0 - a) + color * a


def draw(size: int = SIZE) -> np.ndarray:
    """The icon as an (size, size, 4) uint8 RGBA array."""
    s = size / 400.0                                   # every length below is for 400 px
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    px, py = xs + 0.5, ys + 0.5
    c = size / 2.0

    # the tile: a rounded square with a vertical gradient
    tile_alpha = _coverage(_rounded_box(px, py, c, c, c - 4.0 * s, 72.0 * s))
    v = (py / size)[..., None]
    rgb = TILE_TOP * (1.0 - v) + TILE_BOTTOM * v

    # the control stroke: an S-curve from the lower left to the upper right, across the grid
    stroke = _bezier((70 * s, 318 * s), (150 * s, 330 * s), (150 * s, 90 * s), (330 * s, 84 * s), 96)
    dist = _polyline_distance(px, py, stroke)

    # the patch grid; each token shaded along the diagonal, tinted by its distance to the stroke
    lo, hi = GRID_INSET * s, size - GRID_INSET * s
    pitch = (hi - lo) / GRID
    half = (pitch - TOKEN_GAP * s) / 2.0
    for i in range(GRID):
        for j in range(GRID):
            tx, ty = lo + (j + 0.5) * pitch, lo + (i + 0.5) * pitch
            shade = (i + j) / (2.0 * (GRID - 1))
            base = TOKEN_LIGHT * (1.0 - shade) + TOKEN_DARK * shade
            near = _polyline_distance(np.array(tx), np.array(ty), stroke)
            heat = float(np.clip((TOKEN_REACH * s - near) / ((TOKEN_REACH - TOKEN_HOT) * s), 0.0, 1.0))
            color = base * (1.0 - heat) + TOKEN_HOT_COLOR * heat
            cov = _coverage(_rounded_box(px, py, tx, ty, half, 9.0 * s))
            rgb = _over(rgb, color, cov)

    # the stroke on top: dark halo, amber body, light core
    rgb = _over(rgb, HALO, 0.7 * _coverage(dist - (STROKE_HALF_WIDTH + HALO_EXTRA) * s))
    rgb = _over(rgb, AMBER, _coverage(dist - STROKE_HALF_WIDTH * s))
    rgb = _over(rgb, AMBER_CORE, _coverage(dist - 3.5 * s))

    rgba = np.concatenate([rgb * (tile_alpha[..., None] > 0.0), tile_alpha[..., None]], axis=-1)
    return np.floor(rgba * 255.0 + 0.5).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of an RGBA array: Pillow writes no time stamp or text chunk, so the bytes are reproducible."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def main(argv: list[str]) -> Path:
    out = Path(argv[0]) if argv else ICON_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png_bytes(draw()))
    return out


if __name__ == "__main__":
    print(main(sys.argv[1:]))
