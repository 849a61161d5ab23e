"""What a picture of a procedural scene shows, by pixel statistics (no network), and ControlNet++'s edge F1.

`caption_agreement(image, caption)` parses the caption (tests/training/scenes.py's grammar) and returns the
fraction of its attributes the image agrees with: the background colour, and for every shape its colour,
kind and position (optionally its size). How each is read off the image:

- the image is area-averaged to 32×32 blocks (the pixel VAE's latent grid: a rendered scene and the same
  scene decoded from its latent give the same blocks); each block gets the nearest palette colour, or no
  label when it is far from all (a mixed edge block);
- background: the most common label on the outer ring of blocks;
- colour of the shape at cell P: the most common non-background label among P's blocks (at least 3);
- position: some connected blob of the shape's colour (≥ 3 blocks) has its centre inside cell P;
- kind: that blob (or else the largest non-background blob of cell P) as soft coverage — each block's
  colour projected onto the background→colour line, which is exactly the shape's area fraction for an
  averaged block — matched against every kind's own block coverage (both sizes, every 2 px shift within
  ±2 blocks of the blob's centre): the kind of the least squared difference. (The first reader cut the
  coverage at 0.5 and thresholded fill / solidity / bottom mass; one ragged block on a generated outline
  made any shape a "star" there, so it read the model's shapes as 0.33 where this reads what they
  resemble; tests/training/README.md keeps the numbers);
- size (optional): the blob's box side against a per-kind threshold between the two sizes.
A scene's ground-truth rendering scores ≥ 0.98 (tests); noise or a plain image scores near zero.

`edge_f1(pred, target, radius)`: ControlNet++'s controllability measure for Canny — F1 of the edge pixels
of the output's Canny map against the control map — with a tolerance: a predicted edge pixel counts as
correct when a target edge pixel is within `radius` pixels (Euclidean), and vice versa for recall.
The default radius is 4 px, half a latent block: the pixel VAE decodes 8×8 blocks, so even a perfect
model's edges are staircases up to 4 px off the smooth control edges.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

import cv2
import numpy as np

from dit_control.tests.training.scenes import COLOURS, POSITION_PHRASE, POSITIONS, SHAPES, Scene, Shape, canny_np

BLOCK = 8
GRID = 32                     # blocks per side at 256 px
PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[n] for n in PALETTE_NAMES], np.float32) / 255.0
LABEL_DISTANCE = 0.2          # RGB distance (0-1 scale) beyond which a block has no palette label
MIN_BLOCKS = 3
DEFAULT_RADIUS = 4.0
# box side (px, as read from 8 px blocks) from which a shape counts as big: between the two sizes' ranges
BIG_SIDE = {"circle": 65, "square": 56, "triangle": 56, "star": 49}

_SHAPE_RE = re.compile(r"a (small|big) (\w+) (\w+) ((?:at|in) the [a-z ]+)")


def parse_caption(caption: str) -> Scene:
    """The Scene a caption of scenes.py's grammar describes (jitter unknown: 0)."""
    m = re.fullmatch(r"(.+) on an? (\w+) background", caption.strip())
    if not m:
        raise ValueError(f"not a scene caption: {caption!r}")
    body, background = m.groups()
    phrase_to_pos = {v: k for k, v in POSITION_PHRASE.items()}
    shapes = []
    for part in re.split(r", | and ", body):
        s = _SHAPE_RE.fullmatch(part.strip())
        if not s:
            raise ValueError(f"cannot read the shape phrase {part!r} of {caption!r}")
        size, colour, kind, phrase = s.groups()
        if phrase not in phrase_to_pos or colour not in COLOURS or kind not in SHAPES:
            raise ValueError(f"unknown colour, shape or position in {part!r}")
        shapes.append(Shape(kind, colour, size, phrase_to_pos[phrase]))
    return Scene(background, tuple(shapes))


def _blocks(image: np.ndarray) -> np.ndarray:
    """HWC [0, 1] (any size) -> [32, 32, 3] block means at the 256 px scale."""
    img = np.asarray(image, np.float32)
    if img.shape[:2] != (GRID * BLOCK, GRID * BLOCK):
        img = cv2.resize(img, (GRID * BLOCK, GRID * BLOCK), interpolation=cv2.INTER_AREA)
    return img.reshape(GRID, BLOCK, GRID, BLOCK, 3).mean(axis=(1, 3))


def _labels(blocks: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(blocks[:, :, None, :] - PALETTE[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > LABEL_DISTANCE] = -1
    return lab


def _cell_slice(position: str) -> tuple:
    i = POSITIONS.index(position)
    edges = [round(GRID * k / 3) for k in range(4)]
    return slice(edges[i // 3], edges[i // 3 + 1]), slice(edges[i % 3], edges[i % 3 + 1])


def _in_cell(position: str, cy: float, cx: float) -> bool:
    rows, cols = _cell_slice(position)
    return rows.start <= cy + 0.5 <= rows.stop and cols.start <= cx + 0.5 <= cols.stop


def _blobs(mask: np.ndarray) -> list:
    """[(area in blocks, centre y, centre x, component mask)] of 8-connected blobs ≥ MIN_BLOCKS."""
    n, comp, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [(int(stats[i, cv2.CC_STAT_AREA]), cents[i][1], cents[i][0], comp == i)
            for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= MIN_BLOCKS]


def shape_features(blocks: np.ndarray, blob: np.ndarray, colour: np.ndarray, background: np.ndarray) -> dict:
    """Fill, solidity, bottom-heaviness and box side (px) of one blob, from its soft coverage."""
    cov = blob_coverage(blocks, blob, colour, background)
    # block means sit at block centres: upsample with bilinear weights on that grid
    up = cv2.resize(cov, (GRID * BLOCK, GRID * BLOCK), interpolation=cv2.INTER_LINEAR)
    mask = (up >= 0.5).astype(np.uint8)
    if mask.sum() < 16:
        return {"fill": 0.0, "solidity": 0.0, "bottom": 0.0, "side": 0.0}
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = float(mask.sum())
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = cv2.convexHull(np.concatenate(contours))
    hull_area = max(cv2.contourArea(hull), 1.0)
    mid = (y0 + y1) / 2
    return {"fill": area / ((y1 - y0) * (x1 - x0)), "solidity": min(area / hull_area, 1.0),
            "bottom": float((ys >= mid).mean()), "side": float(max(y1 - y0, x1 - x0))}


TEMPLATE_SHIFT = 2                     # px between the template positions tried
TEMPLATE_REACH = 2                     # blocks either side of the blob's centre


@lru_cache(maxsize=None)
def _templates() -> tuple:
    """((kind, size, [P, P] block coverage)...) of every kind and size at every TEMPLATE_SHIFT sub-block
    phase, on a P = 16-block canvas with the shape's centre at block 8 (+ phase)."""
    from dit_control.tests.training.scenes import SIZES, kind_coverage
    side = 16 * BLOCK
    out = []
    for kind in SHAPES:
        for size, diameter in SIZES.items():
            for py in range(0, BLOCK, TEMPLATE_SHIFT):
                for px in range(0, BLOCK, TEMPLATE_SHIFT):
                    cov = kind_coverage(kind, side / 2 + px, side / 2 + py, diameter, side)
                    out.append((kind, size, cov.reshape(16, BLOCK, 16, BLOCK).mean(axis=(1, 3))))
    return tuple(out)


@lru_cache(maxsize=None)
def _template_stack() -> np.ndarray:
    return np.stack([t[2] for t in _templates()])


def blob_coverage(blocks: np.ndarray, blob: np.ndarray, colour: np.ndarray, background: np.ndarray) -> np.ndarray:
    """[32, 32] soft coverage of one blob (its 3×3-dilated region; 0 elsewhere) — see the module doc."""
    axis = colour - background
    cov = ((blocks - background) @ axis) / max(float(axis @ axis), 1e-6)
    region = cv2.dilate(blob.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return np.clip(np.where(region, cov, 0.0), 0.0, 1.0).astype(np.float32)


def classify_kind(cov: np.ndarray) -> Optional[str]:
    """The kind whose template (any size, any tried position) is nearest the coverage in squared difference."""
    if cov.sum() < 1.0:
        return None
    ys, xs = np.nonzero(cov > 0)
    w = cov[ys, xs]
    cy, cx = int(round(float((ys * w).sum() / w.sum()))), int(round(float((xs * w).sum() / w.sum())))
    padded = np.pad(cov, 16)                       # canvas windows may reach past the image edge
    best, best_kind = np.inf, None
    for dy in range(-TEMPLATE_REACH, TEMPLATE_REACH + 1):
        for dx in range(-TEMPLATE_REACH, TEMPLATE_REACH + 1):
            y0, x0 = cy + dy - 8 + 16, cx + dx - 8 + 16
            window = padded[y0:y0 + 16, x0:x0 + 16]
            # coverage of the blob outside the window counts against every template alike
            outside = float(cov.sum() - window.sum())
            err = ((window[None] - _template_stack()) ** 2).sum(axis=(1, 2)) + outside
            k = int(err.argmin())
            if err[k] < best:
                best, best_kind = float(err[k]), _templates()[k][0]
    return best_kind


def read_scene_attributes(image: np.ndarray, scene: Scene) -> dict:
    """{attribute name: agrees (bool)} for the claims of `scene` about `image`."""
    blocks = _blocks(image)
    labels = _labels(blocks)
    ring = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    ring = ring[ring >= 0]
    bg_label = int(np.bincount(ring, minlength=len(PALETTE)).argmax()) if ring.size else -1
    out = {"background": bg_label >= 0 and PALETTE_NAMES[bg_label] == scene.background}
    bg_rgb = np.median(np.concatenate([blocks[0], blocks[-1], blocks[:, 0], blocks[:, -1]]), axis=0)
    for i, shape in enumerate(scene.shapes):
        rows, cols = _cell_slice(shape.position)
        cell = labels[rows, cols]
        cell = cell[(cell >= 0) & (cell != bg_label)]
        counts = np.bincount(cell, minlength=len(PALETTE)) if cell.size else np.zeros(len(PALETTE), int)
        dominant = int(counts.argmax()) if counts.max() >= MIN_BLOCKS else -1
        want = PALETTE_NAMES.index(shape.colour)
        out[f"shape{i}.colour"] = dominant == want
        mine = [b for b in _blobs(labels == want) if _in_cell(shape.position, b[1], b[2])]
        out[f"shape{i}.position"] = bool(mine) and want != bg_label
        blob, colour = None, None
        if mine and want != bg_label:
            blob, colour = max(mine, key=lambda b: b[0])[3], PALETTE[want]
        elif dominant >= 0:
            local = np.zeros_like(labels, bool)
            local[rows, cols] = True
            cands = [b for b in _blobs((labels == dominant) & local)]
            if cands:
                blob, colour = max(cands, key=lambda b: b[0])[3], PALETTE[dominant]
        if blob is None:
            out[f"shape{i}.kind"] = False
            out[f"shape{i}.size"] = False
            continue
        f = shape_features(blocks, blob, colour, bg_rgb)
        out[f"shape{i}.kind"] = classify_kind(blob_coverage(blocks, blob, colour, bg_rgb)) == shape.kind
        out[f"shape{i}.size"] = (f["side"] >= BIG_SIDE[shape.kind]) == (shape.size == "big")
    return out


def caption_agreement(image: np.ndarray, caption, with_size: bool = False) -> float:
    """Fraction of the caption's attributes (background; each shape's colour, kind, position; and size
    if asked) that the image agrees with. `caption`: a string or a Scene."""
    scene = parse_caption(caption) if isinstance(caption, str) else caption
    attrs = read_scene_attributes(image, scene)
    used = [v for k, v in attrs.items() if with_size or not k.endswith(".size")]
    return float(np.mean(used))


def edge_f1(pred: np.ndarray, target: np.ndarray, radius: float = DEFAULT_RADIUS) -> float:
    """F1 of two binary edge maps [H, W] with a tolerance `radius` in pixels (see module doc)."""
    p, t = np.asarray(pred) > 0.5, np.asarray(target) > 0.5
    if p.shape != t.shape:
        raise ValueError(f"edge maps differ in size: {p.shape} vs {t.shape}")
    if not p.any() and not t.any():
        return 1.0
    if not p.any() or not t.any():
        return 0.0
    # distance of every pixel to the nearest edge pixel of the other map
    dist_to_t = cv2.distanceTransform((~t).astype(np.uint8), cv2.DIST_L2, 5)
    dist_to_p = cv2.distanceTransform((~p).astype(np.uint8), cv2.DIST_L2, 5)
    precision = float((dist_to_t[p] <= radius).mean())
    recall = float((dist_to_p[t] <= radius).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def image_edge_f1(image: np.ndarray, control: np.ndarray, radius: float = DEFAULT_RADIUS) -> float:
    """Edge F1 of an image's Canny map (our Canny node's math and defaults) against a control edge map."""
    return edge_f1(canny_np(image), control, radius)


def psnr(image: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of an image in [0, 1] against the truth (same shape)."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(truth, np.float64)) ** 2))
    return 10.0 * np.log10(1.0 / max(mse, 1e-12))
