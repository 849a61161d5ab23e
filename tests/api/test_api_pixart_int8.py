"""PixArt-δ in 8 bit through a real ComfyUI server: the shipped int8 workflow (int8 DiT + int8 T5
released after encoding + tiled VAE decode), its closeness to the float graph, and the T5 release."""
import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit_control.tests.comfy_host import REPO, execution_error

WORKFLOW = REPO / "workflows" / "api" / "pixart_delta_lcm_t2i_int8.json"
PROMPT = "a lighthouse on a cliff at dusk"


def shipped():
    return json.loads(WORKFLOW.read_text())


def latent_graph(dit_dtype="int8", t5_dtype="int8", t5_name=None, release=True, text=PROMPT, prefix="int8"):
    """The shipped graph at 384x256, ending in SaveLatent."""
    g = shipped()
    g["1"]["inputs"]["weight_dtype"] = dit_dtype
    g["2"]["inputs"].update(weight_dtype=t5_dtype, release_after_encode=release)
    if t5_name:
        g["2"]["inputs"]["t5_name"] = t5_name
    g["3"]["inputs"]["text"] = text
    g["5"]["inputs"].update(width=384, height=256)
    for k in ("9", "10", "11"):
        del g[k]
    g["30"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"int8/{prefix}"}}
    return g


def run_latent(comfy, graph) -> torch.Tensor:
    history = comfy.run(graph)
    assert history["status"]["status_str"] == "success", execution_error(history)
    entry = history["outputs"]["30"]["latents"][0]
    return load_file(str(comfy.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def server_rss_mb(comfy) -> float:
    status = open(f"/proc/{comfy.proc.pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.both_hosts
def test_shipped_int8_workflow_decodes_tiled_to_the_requested_size(comfy):
    g = shipped()
    g["5"]["inputs"].update(width=512, height=384)
    g["10"]["inputs"].update(tile_size=256, overlap=32)     # several tiles at this size
    history = comfy.run(g)
    assert history["status"]["status_str"] == "success", execution_error(history)
    assert g["10"]["class_type"] == "DiTControl_VAEDecodeTiledOnePass"
    assert g["4"]["class_type"] == "ConditioningZeroOut"    # one T5 load per prompt
    image = Image.open(io.BytesIO(comfy.images(history)[0]))
    assert image.size == (512, 384)


@pytest.mark.parametrize("dtype, tolerance", [("int8", 0.05), ("int8_fast", 0.10)])
def test_int8_graph_stays_close_to_the_float_graph(comfy, dtype, tolerance):
    """Same seed and prompt: int8 DiT + int8 T5 against fp32 DiT + fp32 T5 (tiny random weights)."""
    ref = run_latent(comfy, latent_graph("fp32", "fp32", release=False, prefix="fp32"))
    q = run_latent(comfy, latent_graph(dtype, dtype, prefix=dtype))
    assert q.shape == ref.shape == (1, 4, 32, 48)
    assert 0 < rel(q, ref) <= tolerance


@pytest.fixture(scope="module")
def wide_t5(models_dir):
    """A T5 with a 500k-wide feed-forward (caption width 64, as the tiny DiT wants): 384 MB in fp32,
    big enough for the server's resident memory to show whether it is held or released."""
    from dit_control.tests.generators.make_checkpoints import save_tiny_t5
    path = models_dir / "text_encoders" / "t5_wide_ff.safetensors"
    if not path.exists():
        save_tiny_t5(path, seed=11, d_ff=500_000, num_layers=1)
    return path.name, 3 * 500_000 * 64 * 4 / 2**20


def test_release_after_encode_frees_the_encoder_and_reloads_it_identically(comfy, wide_t5):
    name, fp32_mb = wide_t5
    kept = run_latent(comfy, latent_graph("fp32", "fp32", t5_name=name, release=False, prefix="kept"))
    rss_kept = server_rss_mb(comfy)
    released = run_latent(comfy, latent_graph("fp32", "fp32", t5_name=name, release=True, prefix="released"))
    rss_released = server_rss_mb(comfy)
    assert torch.equal(released, kept)               # the same weights, loaded again from the file
    # the first prompt's loader output (holding 384 MB of weights) left ComfyUI's cache with that prompt;
    # the second one's encoder was freed right after encoding
    assert rss_kept - rss_released >= 0.5 * fp32_mb, (rss_kept, rss_released)
    # a changed prompt on the cached (released) loader reloads the encoder and encodes the new text
    other = run_latent(comfy, latent_graph("fp32", "fp32", t5_name=name, release=True, text="a red bicycle",
                                           prefix="other"))
    assert rel(other, released) > 1e-3


def decode_graph():
    """A small LCM latent decoded three ways: core VAE Decode, core VAE Decode (Tiled), ours."""
    g = latent_graph("fp32", "fp32", release=False, prefix="decode")
    del g["30"]
    g["5"]["inputs"].update(width=256, height=192)      # 2 × 2 tiles of 128 px with 32 px overlap: seams to blend
    g["9"] = {"class_type": "VAELoader", "inputs": {"vae_name": "sd-vae-ft-ema.safetensors"}}
    g["40"] = {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["9", 0]}}
    g["41"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["8", 0], "vae": ["9", 0], "tile_size": 128,
                                                          "overlap": 32, "temporal_size": 64, "temporal_overlap": 8}}
    g["42"] = {"class_type": "DiTControl_VAEDecodeTiledOnePass",
               "inputs": {"samples": ["8", 0], "vae": ["9", 0], "tile_size": 128, "overlap": 32}}
    for node in ("40", "41", "42"):
        g[f"5{node}"] = {"class_type": "SaveImage", "inputs": {"images": [node, 0],
                                                               "filename_prefix": f"decode/{node}"}}
    return g


def test_one_pass_tiled_decode_matches_the_untiled_decode_as_closely_as_core_tiling(comfy):
    import numpy as np
    history = comfy.run(decode_graph())
    assert history["status"]["status_str"] == "success", execution_error(history)

    def image(node):
        entry = history["outputs"][f"5{node}"]["images"][0]
        path = comfy.base_dir / "output" / entry["subfolder"] / entry["filename"]
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)

    full, core, ours = image("40"), image("41"), image("42")
    assert full.shape == ours.shape == (192, 256, 3)

    def rel(a):
        return float(np.linalg.norm(a - full) / np.linalg.norm(full))

    assert rel(ours) <= max(1.25 * rel(core), 0.02), (rel(ours), rel(core))


@pytest.mark.both_hosts
def test_one_pass_tiled_decode_rejects_video_latents(comfy):
    g = decode_graph()
    g["5"] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 256, "height": 256, "length": 9,
                                                                   "batch_size": 1}}
    keep = {"5", "9", "42", "542"}
    g = {k: v for k, v in g.items() if k in keep}
    g["42"]["inputs"]["samples"] = ["5", 0]
    history = comfy.run(g)
    err = execution_error(history)
    assert err and "image latents" in err["exception_message"], err


def test_one_pass_tiled_decode_refuses_an_image_the_memory_cannot_hold(comfy):
    """The decoded float32 image (+ blend weights + the clamped copy: 28 bytes a pixel) is checked against the
    free memory before the first tile: a batch of 16384² latents (core's largest) past what this machine has."""
    import math

    import psutil
    pixels = 16384 * 16384
    batch = math.ceil(1.5 * psutil.virtual_memory().available / (28 * pixels))
    g = {"5": {"class_type": "EmptyLatentImage", "inputs": {"width": 16384, "height": 16384, "batch_size": batch}},
         "9": {"class_type": "VAELoader", "inputs": {"vae_name": "sd-vae-ft-ema.safetensors"}},
         "42": {"class_type": "DiTControl_VAEDecodeTiledOnePass",
                "inputs": {"samples": ["5", 0], "vae": ["9", 0], "tile_size": 512, "overlap": 64}},
         "542": {"class_type": "PreviewImage", "inputs": {"images": ["42", 0]}}}
    err = execution_error(comfy.run(g))
    assert err and f"a 16384×16384 px image (batch {batch}) needs about" in err["exception_message"] \
        and "refused before allocating" in err["exception_message"], err
