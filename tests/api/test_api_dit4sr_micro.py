"""What the embedded micro DiT4SR does, measured through the shipped `dit4sr_upscale_x4` graph on a real ComfyUI.

The embedded DiT4SR files are the micro DiT4SR trained here (tests/training/train_dit4sr.py, tests/training/README.md
"The micro DiT4SR") with the hand-set SD3 pixel VAE. The input is made of held-out procedural scenes (never trained
on) rendered as the truth and degraded as its training degraded them, at one fixed heavy setting inside those ranges
(`train_dit4sr.EVAL_DEGRADATION`: blur σ 3 px, bicubic ×1/4, noise σ 25/255, JPEG 30). The graph runs as shipped —
20 Euler steps, CFG 7, AdaIN colour fix, tiled one-pass decode — with the API tests' SD3 conditioning stand-in for
core's text encoders (the micro model ignores text: its text projections are zero). Scored against the truth: PSNR
and edge F1 (Canny of the output against the truth's Canny map, 4 px tolerance), beside bicubic ×4 of the same input
(DiT4SR Conditioning's own upscale) and the input's latent decoded without the model (the pixel VAE alone).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dit_control.kernels.dit4sr.colour_fix import colour_fix
from dit_control.tests.api.test_api_dit4sr import api_graph, one
from dit_control.tests.training.install import dit4sr_available
from dit_control.tests.training.metrics import image_edge_f1, psnr
from dit_control.tests.training.scenes import HELDOUT_SEED0, edge_map, render, scene_from_seed
from dit_control.tests.training.train_dit4sr import (
    EVAL_DEGRADATION,
    bicubic_x4,
    decoded,
    degrade,
    hr_model_latent,
    lr_model_latent,
)

# held-out scenes: one input of 3:2 (two 64-latent tiles, a seam to look for) and three square ones (one tile):
# four graph runs, ~15 s each idle
WIDE = "dit4sr_micro_wide.png"
WIDE_SCENE = 41                       # held-out scene of the wide input (43 is the thumbnail's)
SQUARE_SCENES = (44, 45, 46)          # held-out scenes of the square inputs
# PSNR gains over bicubic ×4 of the same input, issue 29's 2 dB on average and 1 dB on each input: the upscale
# (the graph's decode, before its colour fix; measured +4.45) and the graph's picture after the shipped AdaIN colour
# fix (+3.02; each +2.1 to +4.1). The model's own part, over the input's latent decoded as it is: 0.5 dB on average
# (measured +3.38)
MIN_PSNR_GAIN_DB = 2.0
MIN_PSNR_GAIN_EACH_DB = 1.0
MIN_GAIN_OVER_VAE_DB = 0.5
MEASURED = {}                         # printed at the end of the module (pytest -s), for the README


def truths() -> dict:
    """{input name: the truth}: 768×512, a held-out scene drawn at 768 px, its middle 512 rows; three held-out scenes
    at 512 px."""
    wide = render(scene_from_seed(HELDOUT_SEED0 + WIDE_SCENE), 768)[128:640]
    squares = {f"dit4sr_micro_{k}.png": render(scene_from_seed(HELDOUT_SEED0 + k), 512) for k in SQUARE_SCENES}
    return {WIDE: wide, **squares}


@pytest.fixture(scope="module")
def runs(comfy):
    """{input: (truth, input uint8, graph output, the decode before the colour fix)} through the shipped graph."""
    out = {}
    for i, (name, truth) in enumerate(truths().items()):
        lr = degrade(truth, *EVAL_DEGRADATION, np.random.default_rng(i))
        Image.fromarray(lr).save(comfy.base_dir / "input" / name)
        g = api_graph(steps=20, save_latent=False)
        g[one(g, "LoadImage")]["inputs"]["image"] = name
        save = one(g, "SaveImage")
        g["95"] = {"class_type": "SaveImage", "inputs": {"images": [one(g, "DiTControl_VAEDecodeTiledOnePass"), 0],
                                                         "filename_prefix": "dit4sr_micro/raw"}}
        history = comfy.run_ok(g)
        final, raw = (node_image(comfy, history, k) for k in (save, "95"))
        assert final.shape == truth.shape, (final.shape, truth.shape)
        out[name] = (truth, lr, final, raw)
    yield out
    print(f"\nmicro DiT4SR through the shipped graph: {MEASURED}")


def node_image(comfy, history: dict, node: str) -> np.ndarray:
    (img,) = history["outputs"][node]["images"]
    data = comfy.get("/view?filename={filename}&subfolder={subfolder}&type={type}".format(**img))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32) / 255.0


def test_the_micro_dit4sr_is_the_embedded_default(models_dir):
    assert dit4sr_available(), "tests/training/weights/ has no micro DiT4SR: it is not committed"
    from dit_control.tests.training.install import DIT4SR_FILES, WEIGHTS
    assert all((models_dir / p).read_bytes() == (WEIGHTS / p).read_bytes() for p in DIT4SR_FILES)


def test_upscale_beats_bicubic_in_psnr_and_edge_f1(runs):
    rows = {}
    for name, (truth, lr, final, raw) in runs.items():
        edges = edge_map(truth)
        up, latent_only = bicubic_x4(lr), decoded(lr_model_latent(lr))   # the pixel VAE alone: no model
        rows[name] = {"psnr": psnr(raw, truth), "psnr_bicubic": psnr(up, truth),
                      "psnr_vae_only": psnr(latent_only, truth), "psnr_after_colour_fix": psnr(final, truth),
                      "f1": image_edge_f1(raw, edges), "f1_bicubic": image_edge_f1(up, edges),
                      "f1_vae_only": image_edge_f1(latent_only, edges),
                      "f1_after_colour_fix": image_edge_f1(final, edges)}
        MEASURED[name] = {k: round(float(v), 3) for k, v in rows[name].items()}
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    MEASURED["mean"] = {k: round(v, 3) for k, v in mean.items()}
    assert mean["psnr"] >= mean["psnr_bicubic"] + MIN_PSNR_GAIN_DB, MEASURED
    assert all(r["psnr"] >= r["psnr_bicubic"] + MIN_PSNR_GAIN_EACH_DB for r in rows.values()), MEASURED
    assert mean["f1"] > mean["f1_bicubic"], MEASURED
    # the model itself restores: better than its input's latent decoded as it is
    assert mean["psnr"] >= mean["psnr_vae_only"] + MIN_GAIN_OVER_VAE_DB, MEASURED
    # and the graph's final picture, after the shipped colour fix
    assert mean["psnr_after_colour_fix"] >= mean["psnr_bicubic"] + MIN_PSNR_GAIN_DB, MEASURED
    assert all(r["psnr_after_colour_fix"] >= r["psnr_bicubic"] + MIN_PSNR_GAIN_EACH_DB for r in rows.values()), MEASURED
    assert mean["f1_after_colour_fix"] > mean["f1_bicubic"], MEASURED


def test_no_seam_where_the_two_tiles_meet(runs):
    """The 96×64 latent runs as two 64² tiles (overlap 24): columns 0-63 and 32-95, blended over 32-63, i.e.
    256-511 px. The error's step between neighbouring pixel columns at the tiles' edges (255|256, 511|512) is no
    larger than at the 8-px block borders inside a tile (the pixel VAE decodes 8×8 blocks)."""
    truth, _, final, _ = runs[WIDE]
    error = final - truth
    step = np.abs(np.diff(error, axis=1)).mean(axis=(0, 2))             # [W - 1]: between column x and x + 1
    tile_edges = [255, 511]
    inside = [x for x in range(7, step.shape[0], 8) if x not in tile_edges]
    MEASURED["seam"] = {"at_tile_edges": [round(float(step[x]), 4) for x in tile_edges],
                        "inside_max": round(float(max(step[x] for x in inside)), 4)}
    assert max(step[x] for x in tile_edges) <= max(step[x] for x in inside), MEASURED["seam"]


def test_colour_fix_brings_the_mean_colour_to_the_input(runs):
    """AdaIN (the shipped fix): the output's per-channel mean is the upscaled input's; measured with and
    without the fix (the graph's decode before it). What the fix costs in PSNR is AdaIN's own on this input, not the
    model's: it costs the model's picture no more than it costs a perfect one (the truth through the pixel VAE, the
    best any model can decode to), whose noisy, clipped input's statistics it is pulled to alike."""
    errors = {"with": [], "without": []}
    psnrs = {"with": [], "without": [], "perfect": [], "perfect_with": []}
    for truth, lr, final, raw in runs.values():
        up = bicubic_x4(lr)
        ref = up.reshape(-1, 3).mean(0)
        errors["with"].append(np.abs(final.reshape(-1, 3).mean(0) - ref).max())
        errors["without"].append(np.abs(raw.reshape(-1, 3).mean(0) - ref).max())
        perfect = np.clip(decoded(hr_model_latent(truth)), 0.0, 1.0)
        perfect_fixed = colour_fix(torch.from_numpy(perfect).permute(2, 0, 1)[None],
                                   torch.from_numpy(up).permute(2, 0, 1)[None], "adain")[0].permute(1, 2, 0).numpy()
        for key, image in (("with", final), ("without", raw), ("perfect", perfect), ("perfect_with", perfect_fixed)):
            psnrs[key].append(psnr(image, truth))
    MEASURED["mean_colour_error"] = {k: round(float(np.mean(v)), 4) for k, v in errors.items()}
    MEASURED["psnr_colour_fix"] = {k: round(float(np.mean(v)), 3) for k, v in psnrs.items()}
    assert max(errors["with"]) < 0.01, MEASURED["mean_colour_error"]
    assert np.mean(errors["with"]) <= np.mean(errors["without"]), MEASURED["mean_colour_error"]
    cost = np.mean(psnrs["without"]) - np.mean(psnrs["with"])
    assert cost <= np.mean(psnrs["perfect"]) - np.mean(psnrs["perfect_with"]), MEASURED["psnr_colour_fix"]
