"""DiT4SR (issue 12) through a real ComfyUI server's API: the shipped workflow on checkpoints made at set-up
(tests/generators/make_dit4sr_checkpoints.py: the micro DiT4SR trained here in the released folder layout with SD3's
text widths and the hand-set full-size SD3 pixel VAE; a tiny random DiT4SR for the kernel-parity test), plus the
in-process pieces (preparation sizes, colour fix). What the micro model restores is measured in
test_api_dit4sr_micro.py.

Stand-in: TripleCLIPLoader + CLIPTextEncode are swapped for tests/host_probe's
DiTControlProbe_SD3ConditioningStandIn (SD3-shaped CONDITIONING: tokens [1, 154, 4096], pooled [1, 2048], drawn
from the text): real CLIP-L/G and T5-XXL are too heavy for CI. Everything else runs as shipped, with 2 steps.

The tiling itself (a latent that fits: bit-identical on/off; 2×2 tiles vs a hand-written Gaussian blend; no seam
on a smooth input) is checked on the kernel in tests/kernels/test_dit4sr_golden.py; here the shipped graph runs a
non-square input whose latent (64×85) is larger than one tile.
"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import pytest
import torch

from dit_control.tests.comfy_host import assert_documented, execution_error, load_api_graph
from dit_control.tests.generators.make_dit4sr_checkpoints import RANDOM_DIT4SR_FOLDER, write_dit4sr_inputs

REPO = Path(__file__).resolve().parents[2]
NAME = "dit4sr_upscale_x4"
STEPS = 2
OURS = ("DiTControl_DiT4SRLoader", "DiTControl_DiT4SRConditioning", "DiTControl_DiT4SRColourFix")


@pytest.fixture(scope="module")
def server(comfy):
    write_dit4sr_inputs(comfy.base_dir / "input")
    return comfy


def ids(g, class_type) -> list:
    return sorted((k for k, n in g.items() if n["class_type"] == class_type), key=int)


def one(g, class_type) -> str:
    (k,) = ids(g, class_type)
    return k


def api_graph(steps=STEPS, save_latent=True, decode=True, **conditioning) -> dict:
    """The shipped API workflow with the SD3 conditioning stand-in, `steps` steps, plus a SaveLatent."""
    g = load_api_graph(REPO / "workflows" / "api" / f"{NAME}.json")
    del g[one(g, "TripleCLIPLoader")]
    for k in ids(g, "CLIPTextEncode"):
        g[k] = {"class_type": "DiTControlProbe_SD3ConditioningStandIn",
                "inputs": {"text": g[k]["inputs"]["text"], "tokens": 154}}
    g[one(g, "KSampler")]["inputs"]["steps"] = steps
    g[one(g, "DiTControl_DiT4SRConditioning")]["inputs"].update(conditioning)
    if not decode:
        for cls in ("DiTControl_VAEDecodeTiledOnePass", "DiTControl_DiT4SRColourFix", "SaveImage"):
            del g[one(g, cls)]
    if save_latent:
        g["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [one(g, "KSampler"), 0],
                                                          "filename_prefix": "dit4sr_test/latent"}}
    return g


def small_graph(random_model: bool = False, **kw) -> dict:
    """A cheap variant for the error tests' 'next prompt runs': a 40×32 input at ×1 with a 64 px short side.
    random_model: the random tiny DiT4SR instead of the embedded micro one (it reads its text, and its weights are
    spread as a trained network's, where the micro model's are hand-set: tests/training/README.md, DiT4SR micro)."""
    g = api_graph(decode=False, upscale="1", min_short_side=64, **kw)
    g[one(g, "LoadImage")]["inputs"]["image"] = "dit4sr_input_small.png"
    if random_model:
        g[one(g, "DiTControl_DiT4SRLoader")]["inputs"]["dit_name"] = \
            f"{RANDOM_DIT4SR_FOLDER}/diffusion_pytorch_model.safetensors"
    return g


# ---------------------------------------------------------------------------------------------
#                 Preparation and colour fix (in-process, no server, no ComfyUI import)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,upscale,expected", [
    ((96, 128), 4, (512, 680)),       # short side 96 < 128: to 128×170 first, then ×4
    ((200, 150), 4, (800, 600)),      # large enough: ×4 only
    ((130, 131), 4, (520, 520)),      # 520×524 → multiple of 8
    ((40, 32), 1, (640, 512)),        # ×1: short side at least 512
    ((301, 257), 2, (600, 512)),      # ×2 → 602×514 → multiple of 8
])
def test_processed_size_follows_the_reference(size, upscale, expected):
    from dit_control.kernels.dit4sr.preprocess import processed_size
    assert processed_size(*size, upscale)[0] == expected


def test_upscaled_image_is_pil_bicubic_of_the_8_bit_image():
    from PIL import Image

    from dit_control.kernels.dit4sr.preprocess import _from_pil, _to_pil, upscale_image
    img = torch.rand(1, 33, 45, 3)
    out = upscale_image(img, 4)
    pil = _to_pil(img[0])
    pil = pil.resize((int(128 / 33 * 45), 128), Image.BICUBIC).resize((int(128 / 33 * 45) * 4, 512), Image.BICUBIC)
    pil = pil.resize((pil.size[0] // 8 * 8, 512), Image.BICUBIC)
    assert out.shape == (1, 512, 696, 3) and torch.equal(out[0], _from_pil(pil))


def test_adain_matches_the_reference_formula():
    from dit_control.kernels.dit4sr.colour_fix import colour_fix
    content, style = torch.rand(2, 3, 20, 24) * 0.5 + 0.2, torch.rand(2, 3, 20, 24) * 0.3 + 0.4
    out = colour_fix(content, style, "adain")
    for b in range(2):
        for c in range(3):
            x, s = content[b, c].double(), style[b, c].double()
            n = x.numel()
            xm, sm = x.mean(), s.mean()
            xs = math.sqrt(((x - xm) ** 2).sum() / (n - 1) + 1e-5)
            ss = math.sqrt(((s - sm) ** 2).sum() / (n - 1) + 1e-5)
            want = ((x - xm) / xs * ss + sm).clamp(0, 1)
            assert (out[b, c].double() - want).abs().max() < 1e-5


def test_wavelet_keeps_content_detail_on_reference_low_frequencies():
    from dit_control.kernels.dit4sr.colour_fix import colour_fix, wavelet_decomposition
    content, style = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    high, low = wavelet_decomposition(content)
    assert torch.allclose(high + low, content, atol=1e-6)          # a decomposition: the parts sum to the image
    out = colour_fix(content * 0.5, style * 0.5 + 0.25, "wavelet")
    want = (wavelet_decomposition(content * 0.5)[0] + wavelet_decomposition(style * 0.5 + 0.25)[1]).clamp(0, 1)
    assert torch.allclose(out, want, atol=1e-6)
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(colour_fix(flat, flat + 0.2, "wavelet"), flat + 0.2, atol=1e-6)   # low = the constant


# ---------------------------------------------------------------------------------------------
#                                   Registration, workflow
# ---------------------------------------------------------------------------------------------

def test_nodes_are_registered_with_descriptions_and_tooltips(server):
    info_all = server.get("/object_info")
    for name in OURS:
        assert_documented(info_all, name, "DiT Control/DiT4SR")
    cond = info_all["DiTControl_DiT4SRConditioning"]["input"]["required"]
    assert cond["upscale"][1]["default"] == "4" and cond["tile_overlap"][1]["default"] == 24
    assert cond["tile_size"][1]["default"] == 64 and cond["min_short_side"][1]["default"] == 512
    assert info_all["DiTControl_DiT4SRColourFix"]["input"]["required"]["method"][1]["default"] == "adain"
    names = info_all["DiTControl_DiT4SRLoader"]["input"]["required"]["dit_name"][1]["options"]
    assert "dit4sr_q/transformer/diffusion_pytorch_model.safetensors" in names


def test_ui_workflow_is_the_api_workflow_with_the_reference_settings(server):
    from dit_control.kernels.dit4sr.preprocess import PROCESS_SIZE
    from dit_control.tests.generators.workflow_format import strip_meta, ui_to_api
    ui = json.loads((REPO / "workflows" / f"{NAME}.json").read_text())
    api = load_api_graph(REPO / "workflows" / "api" / f"{NAME}.json")
    assert ui_to_api(ui, server.get("/object_info")) == strip_meta(api)
    assert NAME in server.get("/api/workflow_templates")["dit-control"]
    ks = api[one(api, "KSampler")]["inputs"]
    assert (ks["cfg"], ks["steps"], ks["sampler_name"], ks["scheduler"]) == (7.0, 20, "euler", "normal")
    texts = [api[k]["inputs"]["text"] for k in ids(api, "CLIPTextEncode")]
    # the reference's added positive prompt and negative prompt (test/test_wllava.py)
    assert texts[0].startswith("Cinematic, hyper sharpness") and texts[0].endswith("skin pore detailing.")
    assert texts[1].startswith("motion blur, noisy") and texts[1].endswith("lowres, chaotic")
    assert api[one(api, "DiTControl_DiT4SRConditioning")]["inputs"]["min_short_side"] == PROCESS_SIZE
    assert {"TripleCLIPLoader", "VAELoader", "LoadImage", "SaveImage", "DiTControl_VAEDecodeTiledOnePass"} <= {
        n["class_type"] for n in api.values()}


# ---------------------------------------------------------------------------------------------
#                                    The shipped workflow
# ---------------------------------------------------------------------------------------------

# per host: (input, conditioning overrides, output size, latent shape, the node's log line). The default host runs
# the shipped settings on a 96×128 input: short side to 128 (→ 128×170), ×4 → 512×680, latent 64×85 > one 64²
# tile, so 2 square tiles. The floor host (the compatibility pass) runs the same graph cheaper: 40×32 ×4 →
# 160×128 (min_short_side 128) with 16-latent tiles (latent 20×16: 2 tiles), so the full-size VAE costs seconds, not a
# minute.
SHIPPED_RUNS = {
    "default": ("dit4sr_input.png", {}, (512, 680), (1, 16, 85, 64),
                "DiT4SR input 96x128 -> 512x680 (x4), latent 64x85"),
    "floor": ("dit4sr_input_small.png", {"tile_size": 16, "tile_overlap": 6, "min_short_side": 128}, (160, 128),
              (1, 16, 16, 20),
              "DiT4SR input 40x32 -> 160x128 (x4), latent 20x16"),
}


@pytest.mark.both_hosts
def test_shipped_workflow_upscales_a_non_square_image_larger_than_a_tile(server):
    """The shipped graph (2 steps): the right output size, a tiled non-square latent, the AdaIN colour fix;
    then the same seed again through SamplerCustomAdvanced gives the same latent bit for bit."""
    import numpy as np
    from PIL import Image

    from dit_control.kernels.dit4sr.preprocess import upscale_image
    from dit_control.kernels.dit4sr.tiling import TileSettings, tile_layout
    from dit_control.tests.comfy_host import FLOOR_HOST
    image, overrides, size, shape, log_line = SHIPPED_RUNS["floor" if server.host == FLOOR_HOST else "default"]
    tiles = TileSettings(tile=overrides.get("tile_size", 64), overlap=overrides.get("tile_overlap", 24))
    assert tile_layout(shape[2], shape[3], tiles).count == 2           # larger than one tile: tiled
    g = api_graph(**overrides)
    g[one(g, "LoadImage")]["inputs"]["image"] = image
    history = server.run_ok(g)
    (png,) = server.images(history)
    out = Image.open(io.BytesIO(png))
    assert out.size == size
    lat = server.saved_latent(history)
    assert lat.shape == shape and torch.isfinite(lat).all() and lat.std() > 0.1
    assert log_line in server.log_tail(300)
    # AdaIN colour fix: the result's per-channel means are the upscaled input's (up to the final clamp)
    src = torch.from_numpy(np.asarray(Image.open(server.base_dir / "input" / image)).astype("float32") / 255)[None]
    ref = upscale_image(src, 4, overrides.get("min_short_side", 512))[0].reshape(-1, 3).mean(0)
    got = torch.from_numpy(np.asarray(out.convert("RGB")).astype("float32") / 255).reshape(-1, 3).mean(0)
    assert (got - ref).abs().max() < 0.05, (got, ref)

    custom = api_graph(decode=False, **overrides)
    custom[one(custom, "LoadImage")]["inputs"]["image"] = image
    k = one(custom, "KSampler")
    ks = custom[k]["inputs"]
    custom.update({
        "80": {"class_type": "RandomNoise", "inputs": {"noise_seed": ks["seed"]}},
        "81": {"class_type": "CFGGuider", "inputs": {"model": ks["model"], "positive": ks["positive"],
                                                     "negative": ks["negative"], "cfg": ks["cfg"]}},
        "82": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": ks["sampler_name"]}},
        "83": {"class_type": "BasicScheduler", "inputs": {"model": ks["model"], "scheduler": ks["scheduler"],
                                                          "steps": ks["steps"], "denoise": 1.0}},
        k: {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["80", 0], "guider": ["81", 0],
                                                              "sampler": ["82", 0], "sigmas": ["83", 0],
                                                              "latent_image": ks["latent_image"]}},
    })
    again = server.saved_latent(server.run_ok(custom))
    assert torch.equal(again, lat)


@pytest.mark.both_hosts
def test_model_patcher_is_cores_and_its_reloader_rebuilds_it(server):
    """The Loader's MODEL is built like core's loaders build theirs (tests/host_probe's PatcherClass): the patcher
    class core picks here, and on v0.33 a reloader that rebuilds the same weights from the file."""
    g = {"1": {"class_type": "DiTControl_DiT4SRLoader",
               "inputs": {"dit_name": "dit4sr_q/transformer/diffusion_pytorch_model.safetensors",
                          "weight_dtype": "default"}},
         "2": {"class_type": "DiTControlProbe_PatcherClass", "inputs": {"model": ["1", 0]}}}
    report = json.loads(server.run_ok(g)["outputs"]["2"]["text"][0])
    assert report["patcher"] == report["core_picks"], report
    assert report["reload_matches"] is (True if report["has_reloader"] else None), report


def sd3_stand_in(text: str, tokens: int = 154):
    """What DiTControlProbe_SD3ConditioningStandIn gives for `text` (tests/host_probe), in-process."""
    import hashlib
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, 4096, generator=gen), torch.randn(1, 2048, generator=gen)


def test_sampling_is_our_kernel_under_core_euler_and_cfg(server, models_dir):
    """The MODEL core samples is exactly our kernel: a hand-written Euler + CFG 7 loop over the kernel (tiled
    the same way: 2 tiles of 8 latent px), from core's seeded noise, the LR latent = core VAEEncode of the
    upscaled image in SD3's latent format `(z − 0.0609)·1.5305`, pooled text as the AdaLN input — equals the
    KSampler result (σ from the host's 'normal' schedule)."""
    from safetensors.torch import load_file

    from dit_control.kernels.dit4sr.checkpoint import load_dit4sr_file
    from dit_control.kernels.dit4sr.tiling import TileSettings, tile_layout
    steps, seed = 3, 5
    # the random tiny DiT4SR: it reads its text, where the embedded micro model's text projections are zero
    g = small_graph(random_model=True, steps=steps, tile_size=8, tile_overlap=2)
    ks = g[one(g, "KSampler")]["inputs"]
    ks["seed"] = seed
    cond = one(g, "DiTControl_DiT4SRConditioning")
    g["91"] = {"class_type": "VAEEncode", "inputs": {"pixels": [cond, 3], "vae": [one(g, "VAELoader"), 0]}}
    g["92"] = {"class_type": "SaveLatent", "inputs": {"samples": ["91", 0], "filename_prefix": "dit4sr_test/lr"}}
    g["93"] = {"class_type": "BasicScheduler", "inputs": {"model": ks["model"], "scheduler": ks["scheduler"],
                                                          "steps": steps, "denoise": 1.0}}
    g["94"] = {"class_type": "DiTControlProbe_SigmasReport", "inputs": {"sigmas": ["93", 0]}}
    history = server.run_ok(g)
    got = server.saved_latent(history)
    entry = history["outputs"]["92"]["latents"][0]
    z = load_file(str(server.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]
    sigmas = json.loads(history["outputs"]["94"]["text"][0])["sigmas"]
    assert got.shape == z.shape == (1, 16, 8, 10)
    tiles = TileSettings(tile=8, overlap=2, memory_budget=2048 << 20)
    assert tile_layout(8, 10, tiles).count == 2

    model, _ = load_dit4sr_file(str(models_dir / "diffusion_models" / RANDOM_DIT4SR_FOLDER), dtype=torch.float32)
    model.eval()
    texts = [g[k]["inputs"]["text"] for k in ids(g, "DiTControlProbe_SD3ConditioningStandIn")]
    (pos_ctx, pos_pool), (neg_ctx, neg_pool) = sd3_stand_in(texts[0]), sd3_stand_in(texts[1])
    lr = (z - 0.0609) * 1.5305
    x = torch.randn(z.shape, generator=torch.manual_seed(seed), dtype=torch.float32)    # core's prepare_noise
    with torch.no_grad():
        for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
            t = torch.tensor([s0 * 1000.0])
            v_pos = model(x, t, pos_ctx, pos_pool, lr, tiles=tiles)
            v_neg = model(x, t, neg_ctx, neg_pool, lr, tiles=tiles)
            d_pos, d_neg = x - s0 * v_pos, x - s0 * v_neg                       # denoised (flow: x − σ·v)
            denoised = d_neg + 7.0 * (d_pos - d_neg)
            x = x + (s1 - s0) * (x - denoised) / s0                            # Euler
    want = x / 1.5305 + 0.0609                                                 # SD3 latent format, out
    err = float((got - want).abs().max() / want.abs().max())
    print(f"KSampler vs hand-written loop over the kernel: max error {err:.2e} of max |latent|")
    assert err <= 1e-4


def test_weight_dtypes_run_and_stay_close(server):
    """fp16 (the release's base dtype) and int8 storage through the loader: finite, close to the default. On the
    random tiny DiT4SR, whose weights are spread as a trained network's: the embedded micro model is hand-set on exact
    cancellations between weights, which int8 rounding breaks (tests/training/README.md, DiT4SR micro, Limits)."""
    base = server.saved_latent(server.run_ok(small_graph(random_model=True)))
    for dtype, tol in (("fp16", 2e-2), ("int8", 5e-2)):
        g = small_graph(random_model=True)
        g[one(g, "DiTControl_DiT4SRLoader")]["inputs"]["weight_dtype"] = dtype
        out = server.saved_latent(server.run_ok(g))
        rel = float((out.double() - base.double()).norm() / base.double().norm())
        print(f"weight_dtype {dtype}: relative difference {rel:.2e}")
        assert torch.isfinite(out).all() and rel <= tol, (dtype, rel)


def test_compute_dtype_bf16_runs_close_or_is_refused_by_name(server):
    """compute_dtype bf16 on the DiT4SR Loader: bf16 maths where the CPU has them natively, close to 'auto' (fp32
    maths), and its variant says so; refused by the CPU feature it lacks elsewhere. On the random tiny DiT4SR, as the
    weight dtypes: the embedded micro model's non-linear blocks cancel each noise token's own features in channel
    pairs, exactly in fp32, not under bf16 rounding (tests/training/README.md, DiT4SR micro, Limits)."""
    from dit_control.kernels.native_dtypes import native_bf16
    base = server.saved_latent(server.run_ok(small_graph(random_model=True)))
    g = small_graph(random_model=True)
    loader = one(g, "DiTControl_DiT4SRLoader")
    g[loader]["inputs"]["compute_dtype"] = "bf16"
    native, why = native_bf16("cpu")
    if not native:
        err = execution_error(server.run(g))
        assert err and "avx512_bf16" in err["exception_message"], err
        return
    out = server.saved_latent(server.run_ok(g))
    rel = float((out.double() - base.double()).norm() / base.double().norm())
    print(f"compute_dtype bf16: relative difference {rel:.2e}")
    assert torch.isfinite(out).all() and 0 < rel <= 5e-2, rel


# ---------------------------------------------------------------------------------------------
#                                          Schedule
# ---------------------------------------------------------------------------------------------

def flow_match_euler_sigmas(steps: int, shift: float = 3.0, train_steps: int = 1000) -> list:
    """diffusers' FlowMatchEulerDiscreteScheduler (0.31, SD3.5-medium's scheduler config: shift 3.0, no dynamic
    shifting), written out in float64: the training table σ_i = shift·s/(1 + (shift−1)·s) for s = i/1000,
    i = 1000…1; set_timesteps spaces `steps` timesteps linearly from 1000·σ_max to 1000·σ_min (the shifted
    table's ends), divides by 1000, shifts again, and appends 0."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)
    sigma_max, sigma_min = shifted(1.0), shifted(1 / train_steps)
    t_max, t_min = sigma_max * train_steps, sigma_min * train_steps
    ts = [t_max + (t_min - t_max) * i / (steps - 1) for i in range(steps)]
    return [shifted(t / train_steps) for t in ts] + [0.0]


def host_sigmas(server, scheduler: str, steps: int, model_sampling_sd3: bool = False) -> list:
    g = api_graph(decode=False, save_latent=False)
    keep = {one(g, "DiTControl_DiT4SRLoader")}
    g = {k: v for k, v in g.items() if k in keep}
    model = [next(iter(keep)), 0]
    if model_sampling_sd3:
        g["70"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": 3.0}}
        model = ["70", 0]
    g["71"] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps,
                                                          "denoise": 1.0}}
    g["72"] = {"class_type": "DiTControlProbe_SigmasReport", "inputs": {"sigmas": ["71", 0]}}
    history = server.run_ok(g)
    return json.loads(history["outputs"]["72"]["text"][0])["sigmas"]


@pytest.mark.both_hosts
@pytest.mark.parametrize("steps", [20, 40])
def test_schedule_of_the_shipped_sampler_is_the_reference_scheduler(server, steps):
    """KSampler 'normal' (the shipped graph's) on our MODEL = FlowMatchEulerDiscrete(shift 3.0) to float32
    rounding; ModelSamplingSD3(3.0) in front changes nothing. 'simple' differs (stated, not shipped)."""
    want = flow_match_euler_sigmas(steps)
    normal = host_sigmas(server, "normal", steps)
    assert len(normal) == steps + 1
    diff = max(abs(a - b) for a, b in zip(normal, want))
    print(f"{steps} steps, 'normal' vs FlowMatchEulerDiscrete(shift 3): largest difference {diff:.3g}")
    assert diff <= 1e-6
    assert host_sigmas(server, "normal", steps, model_sampling_sd3=True) == normal
    simple = host_sigmas(server, "simple", steps)
    simple_diff = max(abs(a - b) for a, b in zip(simple, want))
    print(f"{steps} steps, 'simple' vs FlowMatchEulerDiscrete(shift 3): largest difference {simple_diff:.3g}")
    assert simple_diff > 1e-2        # 'simple' spaces σ by 1 − i/steps: not the reference's spacing


# ---------------------------------------------------------------------------------------------
#                                 Wrong inputs: clear errors
# ---------------------------------------------------------------------------------------------

BAD_FILES = {
    "dit4sr_bad/sd3.5_medium_base_no_control.safetensors": ("SD3.5 base transformer",
                                                            "without DiT4SR's control tensors"),
    "broken/flux1-dev-like.safetensors": ("expected a DiT4SR transformer", "a FLUX transformer"),
    "dit4sr_bad/dit4sr_truncated.safetensors": ("dit4sr_truncated.safetensors", "truncated"),
}


@pytest.mark.both_hosts
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_transformer_file_gives_a_clear_error_and_the_next_prompt_runs(server, name):
    g = small_graph()
    g[one(g, "DiTControl_DiT4SRLoader")]["inputs"]["dit_name"] = name
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "DiTControl_DiT4SRLoader", err
    for needle in BAD_FILES[name]:
        assert needle in err["exception_message"], err["exception_message"]
    print(f"{name}: {err['exception_message']}")
    lat = server.saved_latent(server.run_ok(small_graph()))
    assert lat.shape == (1, 16, 8, 10)       # 40×32 at ×1, short side 64: 80×64 px


def test_wrong_vae_and_missing_lr_conditioning_are_clear_errors(server):
    g = small_graph()
    g[one(g, "VAELoader")]["inputs"]["vae_name"] = "sd-vae-ft-ema.safetensors"
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "DiTControl_DiT4SRConditioning", err
    assert "16 latent channels" in err["exception_message"] and "has 4" in err["exception_message"]
    # conditioning that did not go through DiT4SR Conditioning: the sampler stops with what is missing
    g = small_graph()
    ks = g[one(g, "KSampler")]["inputs"]
    pos, neg = ids(g, "DiTControlProbe_SD3ConditioningStandIn")
    ks["positive"], ks["negative"] = [pos, 0], [neg, 0]
    g["75"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    ks["latent_image"] = ["75", 0]
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "KSampler", err
    assert "DiT4SR needs the LR image" in err["exception_message"], err["exception_message"]
    # the LR conditioning with a latent of another size than DiT4SR Conditioning's
    g = small_graph()
    g["75"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g[one(g, "KSampler")]["inputs"]["latent_image"] = ["75", 0]
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "KSampler", err
    assert "the LR latent is 80×64 px but the latent being sampled is 64×64 px" in err["exception_message"], err
    server.run_ok(small_graph())


# ---------------------------------------------------------------------------------------------
#                     Bounded end to end: sizes checked up front, the LR encode tiled
# ---------------------------------------------------------------------------------------------

# the transformer benchmark's peak RSS at 1024² and 2048² (tests/benchmarks/README.md, DiT4SR step)
TRANSFORMER_PEAK_GIB = 8.45


def server_memory_gib(server, field: str = "VmRSS") -> float:
    """The server process's VmRSS (now) or VmHWM (peak since the last reset_peak), in GiB."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 2 ** 20


def reset_peak(server) -> None:
    """Start the server's VmHWM afresh from its current RSS (clear_refs 5), so a peak is this prompt's own."""
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from /proc")
def test_500px_photo_at_x4_runs_through_the_shipped_graph_in_bounded_memory(server):
    """The issue's case: a 500×500 photo at ×4 (a 2000×2000 result) died in DiT4SR Conditioning after 112 s,
    asking for 7.8 GB at once (the SD3 VAE's attention over the whole upscaled image). Now the LR image is
    encoded in 25 tiles of at most 512 px and the shipped graph samples it (1 step), the server's peak RSS below
    the transformer's own bounded working set. The graph runs up to the sampled latent: the one-pass tiled decode,
    colour fix and save of a 2000² image cost ~15 min of CPU here with the full-size VAE, and are measured by
    tests/benchmarks/bench_dit4sr_graph.py (the whole graph to the saved image, and its full-size tensors)."""
    g = api_graph(steps=1, decode=False)
    g[one(g, "LoadImage")]["inputs"]["image"] = "dit4sr_input_500.png"
    reset_peak(server)
    start = time.monotonic()
    history = server.run_ok(g, timeout=1800)
    seconds, peak = time.monotonic() - start, server_memory_gib(server, "VmHWM")
    print(f"500×500 ×4 through the shipped graph to the sampled latent: {seconds:.0f} s, server peak RSS "
          f"{peak:.2f} GiB")
    lat = server.saved_latent(history)
    assert lat.shape == (1, 16, 250, 250) and torch.isfinite(lat).all()
    log = server.log_tail(300)
    assert "DiT4SR input 500x500 -> 2000x2000 (x4), latent 250x250" in log
    assert "LR image VAE-encoded in 25 tile(s) of at most 512 px" in log
    assert peak < TRANSFORMER_PEAK_GIB, peak


def write_size_inputs(input_dir: Path) -> None:
    """The issue's oversized photo and strips (flat grey: cheap to write and to load)."""
    from PIL import Image
    for name, size in SIZE_INPUTS.items():
        if not (input_dir / name).exists():
            Image.new("RGB", size, (120, 130, 140)).save(input_dir / name)


SIZE_INPUTS = {"dit4sr_4000x4000.png": (4000, 4000), "dit4sr_strip_1x512.png": (1, 512),
               "dit4sr_strip_512x1.png": (512, 1)}
# input, upscale, min_short_side -> what the refusal must say (the old node allocated 131 GB, 68.7 GB, and
# ran 3.5 min at 9.9 GB on a 32768×64 picture)
REFUSED = {
    "4000x4000_x4": ("dit4sr_4000x4000.png", "4", 512,
                     ("16000×16000 px result", "256.0 MP", "over this node's limit of 16.8 MP (4096×4096 px)",
                      "upscale ×1", "at most about 1024×1024 px at ×4")),
    "strip_1x512_x4": ("dit4sr_strip_1x512.png", "4", 512,
                       ("1×512 px, a strip (512:1)", "up to 16:1", "512×262144 px", "32×512 px")),
    "strip_512x1_x1": ("dit4sr_strip_512x1.png", "1", 64,
                       ("512×1 px, a strip (512:1)", "up to 16:1", "32768×64 px", "512×32 px")),
}


@pytest.mark.both_hosts
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_oversized_results_and_strips_are_refused_before_anything_is_allocated(server, case):
    """Refused by DiT4SR Conditioning from the sizes alone: the error arrives within seconds (the image only
    has to be loaded) and the server's peak RSS grows by little more than the loaded image, not by the tens of
    GB the upscale and the encode would have asked for."""
    image, upscale, min_short_side, needles = REFUSED[case]
    write_size_inputs(server.base_dir / "input")
    g = small_graph()
    g[one(g, "LoadImage")]["inputs"]["image"] = image
    g[one(g, "DiTControl_DiT4SRConditioning")]["inputs"].update(upscale=upscale, min_short_side=min_short_side)
    before = server_memory_gib(server)
    reset_peak(server)
    start = time.monotonic()
    err = execution_error(server.run(g))
    seconds, grew = time.monotonic() - start, server_memory_gib(server, "VmHWM") - before
    assert err is not None and err["node_type"] == "DiTControl_DiT4SRConditioning", err
    for needle in needles:
        assert needle in err["exception_message"], (needle, err["exception_message"])
    print(f"{case}: refused in {seconds:.1f} s, peak RSS +{grew:.2f} GiB: {err['exception_message']}")
    assert seconds < 30 and grew < 1.0, (seconds, grew)


def test_tile_overlap_over_half_the_tile_is_logged_with_the_value_used(server):
    """tile_overlap 24 on 8-latent tiles (the model clamps it to 4): said once, in the log, with both values."""
    g = small_graph(tile_size=8, tile_overlap=24)
    server.run_ok(g)
    assert ("DiT4SR tile_overlap 24 is more than half the tile side (8 latent px for this 10x8 latent): using an "
            "overlap of 4") in server.log_tail(200)


# ---------------------------------------------------------------------------------------------
#                      Loader: an unusable config.json, a file that misses tensors
# ---------------------------------------------------------------------------------------------

BAD_CONFIG_FOLDER = "dit4sr_bad_config"
# case -> (config.json text or None for the good one, keep only the first half of the tensors?, needles)
BAD_CONFIGS = {
    "not_json": ("{'num_layers': 4}", False, ("config.json is not valid JSON (Expecting property name enclosed "
                                              "in double quotes at line 1, column 2)", "expected the JSON object")),
    "empty": ("", False, ("config.json is empty", "expected the JSON object")),
    "json_list": ("[4, 2, 32]", False, ("config.json holds a list", "not an object", "expected the JSON object")),
    "half_the_tensors": (None, True, ("the weights do not match the expected layout", "missing: ",
                                      "transformer_blocks.3.ff.control_conv.weight", "as its config.json declares it")),
}


@pytest.fixture(scope="module")
def bad_config_files(server):
    """Copies of the tiny DiT4SR folder with a broken config.json, and one whose weights lost the second half of
    their tensors (sorted by name: whole blocks gone, so the shapes alone read as a smaller model)."""
    import safetensors.torch

    from dit_control.tests.generators.make_dit4sr_checkpoints import DIT4SR_FOLDER
    good = server.models_dir / "diffusion_models" / DIT4SR_FOLDER
    for case, (config_text, half, _) in BAD_CONFIGS.items():
        folder = server.models_dir / "diffusion_models" / BAD_CONFIG_FOLDER / case
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / "diffusion_pytorch_model.safetensors"
        if half:
            sd = safetensors.torch.load_file(str(good / weights.name))
            names = sorted(sd)
            safetensors.torch.save_file({k: sd[k] for k in names[:len(names) // 2]}, str(weights))
        elif not weights.exists():
            weights.symlink_to(good / weights.name)
        (folder / "config.json").write_text((good / "config.json").read_text() if config_text is None else config_text)
    return f"{BAD_CONFIG_FOLDER}/{{}}/diffusion_pytorch_model.safetensors"


@pytest.mark.both_hosts
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unusable_config_json_and_missing_tensors_are_named(server, bad_config_files, case):
    """A config.json that is not JSON, empty or not an object: the file and the problem are named (json's bare
    'Expecting value…' / 'list has no attribute get' were not). Weights missing half their tensors: named as
    missing tensors (the strict check), not blamed on config.json."""
    g = small_graph()
    g[one(g, "DiTControl_DiT4SRLoader")]["inputs"]["dit_name"] = bad_config_files.format(case)
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "DiTControl_DiT4SRLoader", err
    message = err["exception_message"]
    for needle in BAD_CONFIGS[case][2]:
        assert needle in message, (needle, message)
    if BAD_CONFIGS[case][0] is not None:
        assert f"{BAD_CONFIG_FOLDER}/{case}/config.json" in message, message
    assert "does not describe them" not in message.split("\n")[0], message
    print(f"{case}: {message[:300]}")


# ---------------------------------------------------------------------------------------------
#                 Issue 31: the reference's σ list at any step count, its posterior draw
# ---------------------------------------------------------------------------------------------

SCHEDULE_STEPS = (3, 20, 25, 28, 30, 50)


def saved(server, history, node: str) -> torch.Tensor:
    return server.saved_latent(history, node)


@pytest.mark.both_hosts
def test_dit4sr_scheduler_is_the_reference_list_and_core_normal_is_within_two_float32_steps(server):
    """One prompt: DiT4SR Scheduler and core's BasicScheduler 'normal' on the DiT4SR MODEL at each step count.
    The node equals diffusers' FlowMatchEulerDiscreteScheduler (SD3.5-medium's config) bit for bit and the
    hand-written float64 list to ≤ 1e-7; core's 'normal' computes it in float32: within 1.2e-7 (two steps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    g = api_graph(decode=False, save_latent=False)
    loader = one(g, "DiTControl_DiT4SRLoader")
    g = {loader: g[loader]}
    for i, steps in enumerate(SCHEDULE_STEPS):
        g[f"{100 + i}"] = {"class_type": "DiTControl_DiT4SRScheduler", "inputs": {"steps": steps, "shift": 3.0}}
        g[f"{120 + i}"] = {"class_type": "DiTControlProbe_SigmasReport", "inputs": {"sigmas": [f"{100 + i}", 0]}}
        g[f"{140 + i}"] = {"class_type": "BasicScheduler", "inputs": {"model": [loader, 0], "scheduler": "normal",
                                                                       "steps": steps, "denoise": 1.0}}
        g[f"{160 + i}"] = {"class_type": "DiTControlProbe_SigmasReport", "inputs": {"sigmas": [f"{140 + i}", 0]}}
    history = server.run_ok(g)
    for i, steps in enumerate(SCHEDULE_STEPS):
        ours = json.loads(history["outputs"][f"{120 + i}"]["text"][0])
        core = json.loads(history["outputs"][f"{160 + i}"]["text"][0])["sigmas"]
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        scheduler.set_timesteps(steps)
        want = scheduler.sigmas.tolist()
        assert ours["dtype"] == "torch.float32" and ours["sigmas"] == want, (steps, ours["sigmas"], want)
        hand = flow_match_euler_sigmas(steps)
        assert max(abs(a - b) for a, b in zip(ours["sigmas"], hand)) <= 1e-7, steps
        core_diff = max(abs(a - b) for a, b in zip(core, want))
        print(f"{steps} steps: DiT4SR Scheduler = diffusers; core 'normal' off by {core_diff:.2e}")
        assert len(core) == steps + 1 and core_diff <= 1.2e-7, (steps, core_diff)


def test_posterior_sample_is_the_reference_draw_and_mean_is_the_vae_mean(server):
    """One prompt, no sampling: DiT4SR Conditioning with posterior 'sample' gives the negative and positive
    branches the reference's draw — diffusers' DiagonalGaussianDistribution over the image encoded twice,
    [negative, positive], from the generator `torch.manual_seed(seed)` — on the VAE's own moments (read by the
    probe pack, not through the pack), bit for bit; 'mean' gives both branches the moments' mean, as before."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    seed = 31
    g = small_graph()
    cond = one(g, "DiTControl_DiT4SRConditioning")
    g[cond]["inputs"].update(posterior="sample", posterior_seed=seed)
    g["60"] = {"class_type": "DiTControl_DiT4SRConditioning", "inputs": {**g[cond]["inputs"], "posterior": "mean"}}
    vae = [one(g, "VAELoader"), 0]
    del g[one(g, "KSampler")], g["90"]               # no sampling: the draw happens in the conditioning node
    reads = {"191": [cond, 0], "192": [cond, 1], "193": ["60", 0], "194": ["60", 1]}
    for node, wire in reads.items():
        g[str(int(node) - 10)] = {"class_type": "DiTControlProbe_ConditioningLatent",
                                  "inputs": {"conditioning": wire, "key": "dit4sr_lr_latent"}}
        g[node] = {"class_type": "SaveLatent", "inputs": {"samples": [str(int(node) - 10), 0],
                                                          "filename_prefix": "dit4sr_test/posterior"}}
    g["185"] = {"class_type": "DiTControlProbe_VAEMoments", "inputs": {"vae": vae, "image": [cond, 3]}}
    g["195"] = {"class_type": "SaveLatent", "inputs": {"samples": ["185", 0],
                                                       "filename_prefix": "dit4sr_test/moments"}}
    history = server.run_ok(g)
    positive, negative, mean_positive, mean_negative, moments = (saved(server, history, n) for n in
                                                                  ("191", "192", "193", "194", "195"))
    assert moments.shape == (1, 32, 8, 10), moments.shape
    reference = DiagonalGaussianDistribution(torch.cat([moments, moments])).sample(torch.manual_seed(seed))
    assert torch.equal(negative, reference[:1]) and torch.equal(positive, reference[1:])
    assert not torch.equal(negative, positive)
    assert torch.equal(mean_positive, moments[:, :16]) and torch.equal(mean_negative, moments[:, :16])
    print(f"sample − mean: largest |Δ| {float((positive - mean_positive).abs().max()):.3g}")
