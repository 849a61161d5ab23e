"""What the embedded micro ControlAR draws, measured through the shipped ControlAR workflows on a real ComfyUI.

The files under the released names are the micro ControlAR trained here (tests/training/train_controlar.py, README
"ControlAR micro"): one tiny network, exported as canny_MR (trained at 384×256, a non-square size) and hed (trained
at 256×256), drawing the procedural scenes of tests/training/scenes.py in the palette VQ-16's 10 colours. Each
check scores the pictures a shipped workflow writes, as ControlNet++ measures controllability: edge F1 between the
Canny map of the output and the control map, at strength 1 and 0 (same prompt and seed); caption agreement
(tests/training/metrics.py, read at 256 px) of the strength-1 pictures against the scene's full caption.

The graphs run as shipped except their size (the sizes the model was trained at: canny_MR at 384×256, hed at
256×256), the prompt (the control scene's caption without its places: the prompt says what, the control map
where; a full caption would fix the layout by itself), the input image, row previews off (a preview changes no
token), and, in the hed graph, the annotator: no HED weights can be had here (the embedded HED file is random), so
the micro hed file is trained on Canny maps — resized as the hed control type resizes (bicubic) — and its graph gets
our Canny Edge node instead of the HED loader and node, as the micro PixArt ControlNet's test does. Its metric is
therefore edge F1 too (ControlNet++ scores HED by SSIM of soft edges, which a random HED network cannot give).
"""
from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from dit_control.tests.api.api_graphs import canny_instead_of_hed
from dit_control.tests.api.api_graphs import first_node as first
from dit_control.tests.comfy_host import REPO
from dit_control.tests.training import install_controlar
from dit_control.tests.training.metrics import caption_agreement, image_edge_f1
from dit_control.tests.training.scenes import edge_map, heldout_scenes
from dit_control.tests.training.train_controlar import MODES, draw

SAMPLER = "DiTControl_ControlARSampler"
# the micro PixArt ControlNet's control scenes (tests/api/test_api_micro_model.py), so the two read alike
CONTROL_SCENES = list(heldout_scenes()[16:20])
GRAPHS = {"mr": "controlar_canny_mr", "hed": "controlar_hed_512"}
# What the committed model is held to: issue 29's bars — F1 ≥ 0.5 at strength 1, ≤ 0.25 at 0, caption agreement
# ≥ 0.8 — and a little under what it measured through these graphs (README, "ControlAR micro"), as sampled tokens
# may flip on another CPU (one attribute of one scene is 0.06 of the agreement): canny_MR measured 0.648 / 0.098 /
# 0.964, hed 0.577 / 0.099 / 0.875. A perfect picture through the 16-px palette VQ (plurality targets) scores F1
# 0.65 (384×256) and 0.58 (256×256) on these scenes, caption agreement 0.96 / 0.94.
# mode -> (min F1 at strength 1, max F1 at strength 0, min caption agreement at strength 1)
BOUNDS = {"mr": (0.58, 0.25, 0.85), "hed": (0.52, 0.25, 0.8)}
MIN_F1_GAIN = 4.0                     # F1 at strength 1 over F1 at 0 (measured 6.6× and 5.8×)
MEASURED = {}


def control_graph(mode: str, image: str, prompt: str, strength: float) -> dict:
    g = json.loads((REPO / "workflows" / "api" / f"{GRAPHS[mode]}.json").read_text())
    _, _, (width, height), _ = MODES[mode]
    g[first(g, "DiTControl_FitControlImage")]["inputs"].update(width=width, height=height)
    g[first(g, SAMPLER)]["inputs"].update(width=width, height=height, strength=strength, preview_every_rows=0)
    g[first(g, "DiTControl_ControlARTextEncode")]["inputs"]["text"] = prompt
    g[first(g, "LoadImage")]["inputs"]["image"] = image
    return canny_instead_of_hed(g) if mode == "hed" else g


@pytest.fixture(scope="module")
def pictures(comfy) -> dict:
    """mode -> [(scene, control map, {strength: picture})]: each control scene drawn at the mode's size as the
    input image, through the graph at strength 1 and 0."""
    assert install_controlar.available(), "tests/training/weights/controlar/ is missing: the micro ControlAR"
    out = {}
    for mode in GRAPHS:
        _, _, (width, height), _ = MODES[mode]
        rows = []
        for k, scene in enumerate(CONTROL_SCENES):
            image = draw(scene, width, height)
            name = f"controlar_micro_{mode}_{k}.png"
            Image.fromarray((image * 255).round().astype(np.uint8)).save(comfy.base_dir / "input" / name)
            drawn = {}
            for strength in (1.0, 0.0):
                (data,) = comfy.images(comfy.run_ok(control_graph(mode, name, scene.caption_without_places,
                                                                  strength)))
                drawn[strength] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32) / 255.0
                assert drawn[strength].shape == (height, width, 3)
            rows.append((scene, edge_map(image), drawn))
        out[mode] = rows
    return out


def mean_f1(rows, strength: float) -> float:
    return float(np.mean([image_edge_f1(drawn[strength], control) for _, control, drawn in rows]))


def mean_agreement(rows) -> float:
    """Caption agreement of the strength-1 pictures, read at 256 px (the non-square one squeezed back)."""
    return float(np.mean([caption_agreement(cv2.resize(drawn[1.0], (256, 256), interpolation=cv2.INTER_AREA),
                                            scene.caption) for scene, _, drawn in rows]))


@pytest.mark.parametrize("mode", tuple(GRAPHS))
def test_the_picture_follows_its_canny_map_and_its_caption(pictures, mode):
    """At strength 1 the shapes sit on the control's edges, in the prompt's colours and kinds; at strength 0
    (same prompt and seed, the uncontrolled model) the prompt without places puts them elsewhere."""
    rows = pictures[mode]
    f1_full, f1_zero, agreement = mean_f1(rows, 1.0), mean_f1(rows, 0.0), mean_agreement(rows)
    MEASURED[GRAPHS[mode]] = {"edge_f1_strength_1": round(f1_full, 3), "edge_f1_strength_0": round(f1_zero, 3),
                              "caption_agreement_strength_1": round(agreement, 3)}
    min_f1, max_f1_zero, min_agreement = BOUNDS[mode]
    assert f1_full >= min_f1, MEASURED
    assert f1_zero <= max_f1_zero, MEASURED
    assert f1_full >= MIN_F1_GAIN * max(f1_zero, 1e-3), MEASURED
    assert agreement >= min_agreement, MEASURED


@pytest.fixture(scope="module", autouse=True)
def print_measured():
    yield
    print("\nmicro ControlAR through the shipped graphs:", json.dumps(MEASURED, indent=1))
