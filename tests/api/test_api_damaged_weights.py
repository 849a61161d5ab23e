"""Damaged weights are named, never drawn: through the API, a file with NaN or Inf values in one tensor,
in each loader's folder (DiT, T5, ControlNet, HED), is refused with an error that names the tensor, and
the server runs the next prompt; a model whose maths overflows stops at the step instead of decoding
black. The files are made by tests/generators/make_checkpoints.py (write_damaged_weights)."""
import json

import numpy as np
import pytest
from PIL import Image

from dit_control.tests.api.api_graphs import served_latent_graph
from dit_control.tests.comfy_host import REPO, execution_error
from dit_control.tests.generators.make_checkpoints import DAMAGED_SOURCES

T2I = REPO / "workflows" / "api" / "pixart_alpha_t2i.json"
CONTROLNET = REPO / "workflows" / "api" / "pixart_delta_controlnet.json"
CONTROL_IMAGE = "damaged_test_input.png"


def t2i(size=256, steps=2, inputs=None):
    g = json.loads(T2I.read_text())
    g["5"]["inputs"].update(width=size, height=size)
    g["6"]["inputs"]["steps"] = steps
    for (node, name), value in (inputs or {}).items():
        g[node]["inputs"][name] = value
    return g


def controlnet_graph(controlnet_name):
    g = json.loads(CONTROLNET.read_text())
    g["1"]["inputs"]["controlnet_name"] = controlnet_name
    g["5"]["inputs"]["image"] = CONTROL_IMAGE
    for node in ("7", "11"):
        g[node]["inputs"].update(width=256, height=256)
    g["12"]["inputs"]["steps"] = 2
    return g


def hed_graph(hed_name):
    return {"1": {"class_type": "LoadImage", "inputs": {"image": CONTROL_IMAGE}},
            "2": {"class_type": "DiTControl_HEDLoader", "inputs": {"hed_name": hed_name}},
            "3": {"class_type": "DiTControl_HEDSoftEdge", "inputs": {"hed_model": ["2", 0], "image": ["1", 0]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "damaged/hed"}}}


@pytest.fixture(scope="module", autouse=True)
def control_image(comfy):
    img = np.zeros((256, 256, 3), np.uint8)
    img[64:192, 64:192] = 255
    Image.fromarray(img).save(comfy.base_dir / "input" / CONTROL_IMAGE)


def _graph_for(folder, name):
    if folder == "diffusion_models":
        return t2i(inputs={("1", "dit_name"): name})
    if folder == "text_encoders":
        return t2i(inputs={("2", "t5_name"): name})
    if folder == "controlnet":
        return controlnet_graph(name)
    return hed_graph(name)


def _next_prompt_runs(comfy):
    ok = comfy.run(served_latent_graph(t2i(), "6"))
    assert ok["status"]["status_str"] == "success", execution_error(ok)


CASES = [(folder, kind) for folder in DAMAGED_SOURCES for kind in ("nan", "inf")]


@pytest.mark.both_hosts
@pytest.mark.parametrize("folder,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_damaged_file_is_refused_naming_the_tensor(comfy, models_dir, folder, kind):
    source, tensor = DAMAGED_SOURCES[folder]
    name = f"damaged/{kind}-{source}"
    assert (models_dir / folder / name).exists()
    err = execution_error(comfy.run(_graph_for(folder, name)))
    assert err is not None, f"{name} loaded without a word"
    message = err["exception_message"]
    assert "is damaged" in message and tensor in message, message
    count = "3 NaN, 0 Inf" if kind == "nan" else "0 NaN, 3 Inf"
    assert count in message, message
    _next_prompt_runs(comfy)


@pytest.mark.both_hosts
def test_overflowing_step_stops_with_the_step_named_instead_of_a_black_image(comfy):
    damaged = {("1", "dit_name"): "damaged/overflow-PixArt-XL-2-512x512.pth"}
    err = execution_error(comfy.run(t2i(steps=3, inputs=damaged)))
    assert err is not None, "the overflowing model decoded an image"
    assert err["node_type"] == "KSampler", err["node_type"]
    message = err["exception_message"]
    assert "step 1 of 3" in message and "NaN/Inf" in message and "overflowing weights" in message, message
    _next_prompt_runs(comfy)
