"""Write workflows/<name>.jpg, the thumbnail ComfyUI's template browser shows beside each shipped workflow.

    .venv/bin/python tests/generators/make_thumbnails.py [name ...]    # default: every workflow

The pinned frontend asks a custom node pack's templates for `/api/workflow_templates/<pack>/<name>.jpg`
(core serves the pack's workflows/ folder there), so each UI file gets a same-name JPEG:
- the PixArt graphs the micro demo model draws (tests/training/): the picture the graph draws on it, at the
  thumbnail's size (256 px, the micro model's training size; the graph otherwise as shipped; the ControlNet graph with
  the Canny stand-in
  of tests/api/test_api_micro_model.py, as the micro ControlNet is trained on Canny maps);
- the DiT4SR graph, which the micro DiT4SR runs (tests/training/train_dit4sr.py): a held-out scene degraded as its
  test degrades it, as shipped except core's text encoders (the API tests' SD3 conditioning stand-in; the micro model
  ignores text), split: the input enlarged on the left half, the output on the right;
- the two ControlAR graphs: the micro ControlAR's picture (tests/training/train_controlar.py) at its trained sizes
  (384×256, stretched back to square; 256×256), on a held-out scene as the input with its caption without places as
  the prompt — the micro model knows only the scenes' words —, the hed graph with the Canny stand-in;
- the other graphs, whose embedded weights are random (nothing can be trained here at their size): their
  example input, labelled as such — a random model's output would only show noise.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

from dit_control.tests.comfy_host import ComfyServer  # noqa: E402
from dit_control.tests.generators.make_checkpoints import make_all, write_example_inputs  # noqa: E402

THUMB = 256
THUMB_SCENE = 29          # held-out scene the ControlAR thumbnails draw: of scenes 20-31 (not their test's) with more
                          # than one shape, the one both graphs scored best on in-process (F1 0.74 / 0.72, caption
                          # agreement 1.0 each; scene 30, one small square, scored higher)
# the graphs the micro model draws; each is run as shipped at THUMB px
MICRO_DRAWN = ("pixart_delta_lcm_t2i", "pixart_delta_lcm_t2i_int8", "pixart_alpha_t2i", "pixart_delta_controlnet")
MICRO_UPSCALED = ("dit4sr_upscale_x4",)
UPSCALE_SCENE = 43        # held-out scene of the DiT4SR thumbnail (not its test's 41-42)
# the graphs the micro ControlAR draws (tests/training/train_controlar.py), at its trained sizes: mode -> graph
CONTROLAR_DRAWN = {"controlar_canny_mr": "mr", "controlar_hed_512": "hed"}


def micro_graph(name: str) -> dict:
    from dit_control.tests.api.api_graphs import at_size, canny_instead_of_hed
    graph = at_size(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()), THUMB)
    if name == "pixart_delta_controlnet":
        canny_instead_of_hed(graph)
    return graph


def upscale_card(server, input_dir: Path):
    """The DiT4SR graph on a held-out scene degraded as the micro DiT4SR's test degrades it (512 px truth, 128 px
    input): a split view, the input enlarged by nearest on the left half, the graph's output on the right."""
    from PIL import Image

    from dit_control.tests.api.test_api_dit4sr import api_graph, one
    from dit_control.tests.training.scenes import HELDOUT_SEED0, render, scene_from_seed
    from dit_control.tests.training.train_dit4sr import EVAL_DEGRADATION, degrade
    lr = degrade(render(scene_from_seed(HELDOUT_SEED0 + UPSCALE_SCENE), 512), *EVAL_DEGRADATION,
                 np.random.default_rng(UPSCALE_SCENE))
    Image.fromarray(lr).save(input_dir / "dit4sr_thumbnail.png")
    graph = api_graph(steps=20, save_latent=False)
    graph[one(graph, "LoadImage")]["inputs"]["image"] = "dit4sr_thumbnail.png"
    (data,) = server.images(server.run_ok(graph))
    out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    before = np.asarray(Image.fromarray(lr).resize((out.shape[1], out.shape[0]), Image.NEAREST))
    half = out.shape[1] // 2
    split = np.concatenate([before[:, :half], out[:, half:]], axis=1)
    return Image.fromarray(split).resize((THUMB, THUMB), Image.LANCZOS)


def controlar_graph(name: str, input_dir: Path) -> dict:
    """The ControlAR graph at the micro ControlAR's trained size, on a held-out scene (drawn as the input) with its
    caption without places as the prompt: the micro model knows only the scenes' words; the hed graph with the
    Canny stand-in (its micro file is trained on Canny maps, as test_api_controlar_micro.py runs it)."""
    from PIL import Image

    from dit_control.tests.api.test_api_controlar_micro import control_graph
    from dit_control.tests.training.scenes import heldout_scenes
    from dit_control.tests.training.train_controlar import MODES, draw
    mode = CONTROLAR_DRAWN[name]
    _, _, (width, height), _ = MODES[mode]
    scene = heldout_scenes()[THUMB_SCENE]
    image = f"controlar_thumbnail_{mode}.png"
    Image.fromarray((draw(scene, width, height) * 255).round().astype(np.uint8)).save(input_dir / image)
    graph = control_graph(mode, image, scene.caption_without_places, 1.0)
    (sampler,) = [k for k, v in graph.items() if v["class_type"] == "DiTControl_ControlARSampler"]
    shipped = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    graph[sampler]["inputs"]["preview_every_rows"] = shipped[sampler]["inputs"]["preview_every_rows"]
    return graph


def input_card(graph: dict, input_dir: Path):
    """The graph's first LoadImage input, fitted into THUMB×THUMB, with a label."""
    import cv2
    from PIL import Image
    names = [n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"]
    img = Image.open(input_dir / names[0]).convert("RGB")
    img.thumbnail((THUMB, THUMB))
    card = np.full((THUMB, THUMB, 3), 32, np.uint8)
    a = np.asarray(img)
    y, x = (THUMB - a.shape[0]) // 2, (THUMB - a.shape[1]) // 2
    card[y:y + a.shape[0], x:x + a.shape[1]] = a
    cv2.rectangle(card, (0, THUMB - 22), (THUMB, THUMB), (32, 32, 32), -1)
    cv2.putText(card, "example input", (8, THUMB - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (235, 235, 235), 1,
                cv2.LINE_AA)
    return Image.fromarray(card)


def main(names=()) -> list:
    from PIL import Image
    models = make_all(REPO / ".comfy_host" / "models")
    base = REPO / ".comfy_host" / "thumbnails_base"
    write_example_inputs(base / "input")
    written = []
    with ComfyServer(models, base_dir=base, probe=True) as server:
        for ui in sorted((REPO / "workflows").glob("*.json")):
            name = ui.stem
            if names and name not in names:
                continue
            api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
            if name in MICRO_DRAWN:
                (data,) = server.images(server.run_ok(micro_graph(name)))
                thumb = Image.open(io.BytesIO(data)).convert("RGB").resize((THUMB, THUMB), Image.LANCZOS)
            elif name in MICRO_UPSCALED:
                thumb = upscale_card(server, base / "input")
            elif name in CONTROLAR_DRAWN:
                (data,) = server.images(server.run_ok(controlar_graph(name, base / "input")))
                # the MR graph's 384×256 scene is a square scene squeezed: stretched back to square here
                thumb = Image.open(io.BytesIO(data)).convert("RGB").resize((THUMB, THUMB), Image.NEAREST)
            else:
                thumb = input_card(api, base / "input")
            target = ui.with_suffix(".jpg")
            thumb.save(target, quality=90)
            written.append(target)
            print(f"wrote {target.relative_to(REPO)}")
    return written


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
