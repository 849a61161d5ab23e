"""The per-kind EasyControl templates (issue 28) through a real ComfyUI server: Ghibli, inpainting, HED sketch,
depth, pose, segmentation, and canny img2img; plus Apply EasyControl on a FLUX.1-schnell-configured model.

Same test models and conditioning stand-in as tests/api/test_api_easycontrol.py (its `api_graph`: 128 px,
2 steps, 128 px conditions). Each template runs once per host; that run also reports, through the probe
DiTControlProbe_EasyControlConditionImage, the 8-bit pixels the graph hands the condition stream, which must
equal the reference's preparation of the same input file bit for bit:
- every spatial LoRA: diffusers' VaeImageProcessor (what EasyControl's pipeline calls): PIL Lanczos to S×S;
- inpainting: the photo with the masked pixels black (EasyControl's test_imgs/inpainting.png; UniControl's
  Inpainter), then the same resize;
- HED sketch: the graph's own HED map (as the HED annotator writes it, 8-bit truncated) through UniControl's
  hedsketch steps in OpenCV (cv2.threshold, bitwise_not, GaussianBlur 3×3), then the same resize.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dit_control.tests.api.test_api_easycontrol import COND_SIZE, SIZE, api_graph, ids, one, prepare_server, rel
from dit_control.tests.comfy_host import DEFAULT_HOST, REPO, load_api_graph
from dit_control.tests.generators.make_checkpoints import EASYCONTROL_INPAINT_MASK, EASYCONTROL_PHOTO

KIND_WORKFLOWS = ("easycontrol_ghibli", "easycontrol_inpainting", "easycontrol_hedsketch", "easycontrol_depth",
                  "easycontrol_pose", "easycontrol_seg")
IMG2IMG = "easycontrol_canny_img2img"
PROBE, HED_SAVE = "91", "92"


@pytest.fixture(scope="module")
def server(comfy, models_dir):
    return prepare_server(comfy, models_dir)


def kind_graph(name: str, condition_input: str | None = None) -> dict:
    """A shipped graph as the EasyControl API tests run it, the img2img start image scaled to the test size and
    the HED sketch's photo to 256×192 (the full-size random HED costs seconds per megapixel); its condition's
    input file replaced by `condition_input` if given."""
    g = api_graph(name, tokens=256)
    for node in g.values():
        if node["class_type"] == "ImageScale":
            node["inputs"].update(width=SIZE, height=SIZE)
    if ids(g, "DiTControl_HEDSoftEdge"):
        hed = g[one(g, "DiTControl_HEDSoftEdge")]["inputs"]
        g["95"] = {"class_type": "ImageScale", "inputs": {"image": hed["image"], "upscale_method": "area",
                                                          "width": 256, "height": 192, "crop": "disabled"}}
        hed["image"] = ["95", 0]
    if condition_input is not None:
        node = g[condition_file_node(g)]
        node["inputs"]["image"] = condition_input
    return g


def condition_file_node(g: dict) -> str:
    """The loader of the file that makes the condition: the mask for inpainting, else the (only) LoadImage."""
    return one(g, "LoadImageMask") if ids(g, "LoadImageMask") else one(g, "LoadImage")


def with_probes(g: dict) -> dict:
    g[PROBE] = {"class_type": "DiTControlProbe_EasyControlConditionImage",
                "inputs": {"model": [one(g, "DiTControl_ApplyEasyControl"), 0]}}
    if ids(g, "DiTControl_HEDSoftEdge"):
        g[HED_SAVE] = {"class_type": "SaveImage", "inputs": {"images": [one(g, "DiTControl_HEDSoftEdge"), 0],
                                                             "filename_prefix": "ec_test/hed"}}
    return g


def probed_condition(history: dict) -> np.ndarray:
    report = json.loads(history["outputs"][PROBE]["text"][0])
    return np.frombuffer(base64.b64decode(report["uint8"]), np.uint8).reshape(report["shape"])[0]


# -- the reference's preparation, from the input files -------------------------------------------------------

def lanczos(img: Image.Image, size: int = COND_SIZE) -> np.ndarray:
    """diffusers' VaeImageProcessor.resize (EasyControl's pipeline, height = width = cond_size): PIL Lanczos."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.LANCZOS))


def reference_inpainting(input_dir) -> np.ndarray:
    photo = np.asarray(Image.open(input_dir / EASYCONTROL_PHOTO).convert("RGB")).copy()
    mask = np.asarray(Image.open(input_dir / EASYCONTROL_INPAINT_MASK).convert("RGB"))[..., 0]   # its red channel
    photo[mask >= 128] = 0                                   # >= 0.5 of 255: the hole, black as in the example
    return lanczos(Image.fromarray(photo))


def reference_hedsketch(hed_png: Image.Image, threshold: int) -> np.ndarray:
    import cv2
    edge = np.asarray(hed_png.convert("RGB"))
    binary = cv2.threshold(edge, threshold, 255, cv2.THRESH_BINARY)[1]
    return lanczos(Image.fromarray(cv2.GaussianBlur(cv2.bitwise_not(binary), (3, 3), 0)))


def reference_condition(server, name: str, g: dict, history: dict) -> np.ndarray:
    input_dir = server.base_dir / "input"
    if name == "easycontrol_inpainting":
        return reference_inpainting(input_dir)
    if name == "easycontrol_hedsketch":
        entry = history["outputs"][HED_SAVE]["images"][0]
        hed = Image.open(server.base_dir / "output" / entry["subfolder"] / entry["filename"])
        return reference_hedsketch(hed, g[one(g, "DiTControl_EasyControlHEDSketch")]["inputs"]["threshold"])
    return lanczos(Image.open(input_dir / g[one(g, "LoadImage")]["inputs"]["image"]))


# -- the templates ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", (*KIND_WORKFLOWS, IMG2IMG))
def test_shipped_schedule_settings(name):
    """As shipped (no server): ModelSamplingFlux is set to the size the graph samples at (the empty latent's, or
    img2img's scaled start image), so the σ list is the reference's (tests/api/test_easycontrol_schedule.py);
    the reference's 25 steps, guidance 3.5, condition size 512, the recommended size (Ghibli: 768, the
    reference app's default; the others 1024) and, for Ghibli, the trigger words."""
    g = load_api_graph(REPO / "workflows" / "api" / f"{name}.json")
    sized = ids(g, "EmptySD3LatentImage") or ids(g, "ImageScale")
    (size_node,) = sized
    size = (g[size_node]["inputs"]["width"], g[size_node]["inputs"]["height"])
    msf = g[one(g, "ModelSamplingFlux")]["inputs"]
    assert (msf["width"], msf["height"]) == size == ((768, 768) if name == "easycontrol_ghibli" else (1024, 1024))
    assert g[one(g, "KSampler")]["inputs"]["steps"] == 25 and g[one(g, "FluxGuidance")]["inputs"]["guidance"] == 3.5
    assert g[one(g, "DiTControl_ApplyEasyControl")]["inputs"]["condition_size"] == 512
    if name == "easycontrol_ghibli":
        assert g[one(g, "CLIPTextEncode")]["inputs"]["text"].startswith(
            "Ghibli Studio style, Charming hand-drawn anime-style illustration")
    assert g[one(g, "KSampler")]["inputs"]["denoise"] == (0.75 if name == IMG2IMG else 1.0)


def latent_only(g: dict) -> dict:
    """Without VAE Decode and Save Image: for runs whose latent is all a test reads (SaveLatent stays)."""
    for cls in ("VAEDecode", "SaveImage"):
        for k in ids(g, cls):
            del g[k]
    return g


def mirrored_input(server, g: dict) -> str:
    """The condition's input file mirrored left-right, written beside it; returns its name."""
    src = g[condition_file_node(g)]["inputs"]["image"]
    target = f"mirrored_{src}"
    folder = server.base_dir / "input"
    Image.open(folder / src).transpose(Image.FLIP_LEFT_RIGHT).save(folder / target)
    return target


@pytest.mark.both_hosts
@pytest.mark.parametrize("name", (*KIND_WORKFLOWS, IMG2IMG))
def test_kind_workflow_runs_with_the_reference_condition_image(server, name):
    """One run of the template per host: it completes, and its condition pixels are the reference's. On the
    default host one more run with the condition's input mirrored: the sampled latent changes."""
    g = with_probes(kind_graph(name))
    history = server.run_ok(g)
    pngs = server.images(history)                   # the template's SaveImage first, then the HED map's
    assert len(pngs) == 1 + (HED_SAVE in g)
    assert Image.open(io.BytesIO(pngs[0])).size == (SIZE, SIZE)
    lat = server.saved_latent(history)
    assert lat.shape == (1, 16, SIZE // 8, SIZE // 8) and torch.isfinite(lat).all()
    got = probed_condition(history)
    assert got.shape == (COND_SIZE, COND_SIZE, 3)
    if name == IMG2IMG:                                      # a canny condition, checked by the canny tests
        return
    want = reference_condition(server, name, g, history)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() == 0, f"{name}: condition pixels differ from the reference's preparation in " \
                            f"{int((diff > 0).sum())} values (largest {diff.max()})"
    if server.host != DEFAULT_HOST:
        return
    mirrored = server.saved_latent(server.run_ok(latent_only(kind_graph(name, mirrored_input(server, g)))))
    # the runs are deterministic (the same graph gives the same latent bit for bit); the random rank-4 test
    # LoRAs steer weakly (a mirrored map moves the latent by ~1e-4 relative), hence the small bound
    assert rel(mirrored, lat) > 1e-5, f"{name}: a mirrored condition image left the latent unchanged"


# -- img2img ------------------------------------------------------------------------------------------------

def img2img_graph(denoise: float, start: str = "photo") -> dict:
    """The img2img template at `denoise`, latent only; start "noise": the same graph from an empty latent."""
    g = latent_only(kind_graph(IMG2IMG))
    ks = one(g, "KSampler")
    g[ks]["inputs"]["denoise"] = denoise
    g["93"] = {"class_type": "SaveLatent", "inputs": {"samples": [one(g, "VAEEncode"), 0],
                                                      "filename_prefix": "ec_test/img2img_start"}}
    if start == "noise":
        g["94"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
        g[ks]["inputs"]["latent_image"] = ["94", 0]
    return g


def test_img2img_denoise_bounds(server):
    """denoise 0 gives back the VAE-encoded start latent; denoise 1 is the from-noise run of the same seed
    (the start image weighs 1 − σ_max = 0 in the first noisy latent); a partial denoise lies between."""
    history = server.run_ok(img2img_graph(0.0))
    start, out = server.saved_latent(history, "93"), server.saved_latent(history)
    assert rel(out, start) <= 1e-6, f"denoise 0: the sampled latent is {rel(out, start):.3g} away from the start"
    full = server.saved_latent(server.run_ok(img2img_graph(1.0)))
    from_noise = server.saved_latent(server.run_ok(img2img_graph(1.0, start="noise")))
    assert rel(full, from_noise) <= 1e-6, f"denoise 1 differs from the from-noise run by {rel(full, from_noise):.3g}"
    # at the tests' 2 steps core's KSampler runs int(2 / denoise) steps and keeps the last 2: 0.75 would still
    # start at σ = 1, 0.5 starts half-way down a 4-step schedule
    partial = server.saved_latent(server.run_ok(img2img_graph(0.5)))
    assert rel(partial, start) > 1e-2 and rel(partial, from_noise) > 1e-2, (rel(partial, start),
                                                                            rel(partial, from_noise))


# -- FLUX.1-schnell ----------------------------------------------------------------------------------------

def test_apply_easycontrol_runs_on_a_schnell_flux(server):
    """A FLUX without guidance embedding (schnell; core detects it by the missing guidance_in): the condition
    stream's t = 0 modulation then takes no guidance, as the model's own; the run completes and the
    condition changes the result."""
    g = latent_only(api_graph("easycontrol_canny"))
    g[one(g, "UNETLoader")]["inputs"]["unet_name"] = "flux1-schnell.safetensors"
    with_cond = server.saved_latent(server.run_ok(g))
    assert torch.isfinite(with_cond).all()
    g[one(g, "ModelSamplingFlux")]["inputs"]["model"] = [one(g, "UNETLoader"), 0]
    for cls in ("LoadImage", "DiTControl_EasyControlLoRALoader", "DiTControl_ApplyEasyControl"):
        del g[one(g, cls)]
    plain = server.saved_latent(server.run_ok(g))
    assert rel(with_cond, plain) > 1e-3
