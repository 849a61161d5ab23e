"""Procedural scenes for the micro demo model: 1-3 coloured shapes on a plain background, their caption
and their Canny edge map. numpy + OpenCV only, deterministic by seed, nothing downloaded.

A scene is a background colour and 1-3 shapes, each with a colour (never the background's), a kind
(circle, square, triangle, star), a size (small / big) and one of the 3×3 grid cells, all cells distinct.
Shapes are drawn 4× supersampled and area-averaged (anti-aliased edges) at 256 px. Caption, shapes in
reading order of their cells: "a big red circle at the top left and a small blue square in the center
on a yellow background".

Held-out captions: `heldout_scenes()` draws its scenes from a separate seed range, and `training_scene`
redraws any scene whose caption is one of them, so the held-out captions are never trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np

SIZE = 256
SUPERSAMPLE = 4

# name -> sRGB (0-255); far apart in RGB so that nearest-colour classification is unambiguous
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 180), "pink": (245, 140, 200), "cyan": (40, 210, 220),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 52, "big": 76}          # outer diameter in pixels (the grid cell is 85 px)
# 3×3 grid, reading order; the phrase used in captions
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASE = {p: ("in the center" if p == "center" else f"at the {p}") for p in POSITIONS}
CANNY_LOW, CANNY_HIGH = 100, 200          # our Canny Edge node's defaults
HELDOUT_SEED0 = 1_000_000                 # held-out scenes: seeds HELDOUT_SEED0 + i
HELDOUT_COUNT = 64
# Scale of the random shift of a shape's centre inside its cell (1: up to 2.5 px for big shapes, 14.5 px for
# small ones; 0: every shape at its cell's centre). The micro model is trained at 0: with the shift, its
# 8×8 tokens (32 px each) had to draw a shape at any sub-token offset, and after 24 000 steps it drew one
# kind-averaged blob for every kind (kind read right 0.19, chance 0.25); on centred shapes 2000 steps
# separated circle from square, 7000 reached kind 0.33 (README, "The micro demo model"). The shift is still drawn from
# the scene's random stream, so the
# captions, colours and sizes of every seed are the same at any scale.
JITTER = 0.0


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str
    dx: float = 0.0          # jitter of the centre inside its cell, pixels
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple = field(default_factory=tuple)

    @property
    def caption(self) -> str:
        return self._describe(with_places=True)

    @property
    def caption_without_places(self) -> str:
        """The caption minus its places ("a big red circle and a small blue star on a yellow background"): what
        a ControlNet prompt says when the control map gives the layout."""
        return self._describe(with_places=False)

    def _describe(self, with_places: bool) -> str:
        parts = [f"a {s.size} {s.colour} {s.kind}" + (f" {POSITION_PHRASE[s.position]}" if with_places else "")
                 for s in self.shapes]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"{body} on {article} {self.background} background"


def cell_centre(position: str, size: int = SIZE) -> tuple:
    """(x, y) centre of a grid cell in pixels."""
    i = POSITIONS.index(position)
    cell = size / 3
    return (i % 3 + 0.5) * cell, (i // 3 + 0.5) * cell


def cell_box(position: str, size: int = SIZE) -> tuple:
    """(x0, y0, x1, y1) of a grid cell, integer pixel bounds."""
    i = POSITIONS.index(position)
    edges = [round(size * k / 3) for k in range(4)]
    return edges[i % 3], edges[i // 3], edges[i % 3 + 1], edges[i // 3 + 1]


def random_scene(rng: np.random.Generator) -> Scene:
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    count = int(rng.integers(1, 4))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    shapes = []
    for cell in sorted(int(c) for c in cells):
        colour = background
        while colour == background:
            colour = names[rng.integers(len(names))]
        size = ("small", "big")[rng.integers(2)]
        slack = (85 - SIZES[size]) / 2 - 2           # keep the shape inside its cell
        dx, dy = (JITTER * rng.uniform(-slack, slack, size=2)).tolist()
        shapes.append(Shape(SHAPES[rng.integers(len(SHAPES))], colour, size, POSITIONS[cell], dx, dy))
    return Scene(background, tuple(shapes))


def scene_from_seed(seed: int) -> Scene:
    return random_scene(np.random.default_rng(seed))


@lru_cache(maxsize=1)
def heldout_scenes() -> tuple:
    """The fixed held-out evaluation scenes (their captions are never trained on)."""
    return tuple(scene_from_seed(HELDOUT_SEED0 + i) for i in range(HELDOUT_COUNT))


@lru_cache(maxsize=1)
def heldout_captions() -> frozenset:
    return frozenset(s.caption for s in heldout_scenes())


def training_scene(seed: int) -> Scene:
    """Scene `seed` of the training stream; redrawn (seed chain) if its caption is held out."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    while scene.caption in heldout_captions():
        scene = random_scene(rng)
    return scene


def shape_polygon(kind: str, cx: float, cy: float, diameter: float) -> np.ndarray:
    """Vertices (x, y) of a square / upward triangle / 5-point star of this outer diameter."""
    r = diameter / 2
    if kind == "square":
        h = r * 0.86                                  # a square looks as big as a circle of the same width
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    if kind == "triangle":
        # centred on its bounding box, not its centroid, so it sits in its cell like the others
        return np.array([[cx, cy - r], [cx + r, cy + r * 0.8], [cx - r, cy + r * 0.8]])
    if kind == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append([cx + rr * math.cos(a), cy + rr * math.sin(a) + r * 0.1])
        return np.array(pts)
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def shape_mask(shape: Shape, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage [size, size] float32 in [0, 1]."""
    cx, cy = cell_centre(shape.position, size)
    return kind_coverage(shape.kind, cx + shape.dx, cy + shape.dy, SIZES[shape.size] * size / SIZE, size)


def kind_coverage(kind: str, cx: float, cy: float, diameter: float, size: int) -> np.ndarray:
    """Anti-aliased coverage [size, size] of one shape of `kind` centred at (cx, cy) px (SUPERSAMPLE× drawn)."""
    s = SUPERSAMPLE
    canvas = np.zeros((size * s, size * s), np.uint8)
    cx, cy, d = cx * s, cy * s, diameter * s
    if kind == "circle":
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(d / 2)), 255, -1)
    else:
        cv2.fillPoly(canvas, [np.round(shape_polygon(kind, cx, cy, d)).astype(np.int32)], 255)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """HWC float32 RGB in [0, 1]."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array(COLOURS[scene.background], np.float32) / 255.0
    for shape in scene.shapes:
        m = shape_mask(shape, size)[..., None]
        img = img * (1 - m) + m * (np.array(COLOURS[shape.colour], np.float32) / 255.0)
    return img


def canny_np(image: np.ndarray) -> np.ndarray:
    """Alias of `edge_map` for any HWC [0, 1] image (a rendered or a generated one)."""
    return edge_map(image)


def edge_map(image: np.ndarray) -> np.ndarray:
    """Canny edges [H, W] float32 in {0, 1} of an HWC [0, 1] image: our Canny node's math and defaults
    (kernels/canny.py: cv2.Canny on the uint8 RGB frame, thresholds 100 / 200)."""
    # the same frame conversion and cv2.Canny call as kernels.canny.canny_edges (a test checks they are
    # equal), without its tensor round trip, which costs ~40× the Canny itself at this size
    from dit_control.kernels.canny import _to_uint8_frames
    frame = _to_uint8_frames(np.asarray(image))[0][0]
    return cv2.Canny(frame, float(CANNY_LOW), float(CANNY_HIGH)).astype(np.float32) / 255.0


def sample(seed: int) -> tuple:
    """(scene, image HWC [0, 1], edge map HW {0, 1}) of training scene `seed`."""
    scene = training_scene(seed)
    img = render(scene)
    return scene, img, edge_map(img)
