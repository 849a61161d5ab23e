"""EasyControl (issue 11) through a real ComfyUI server's API: the shipped workflows on checkpoints made at
set-up (tests/generators/make_checkpoints.py: a full-width 1 + 1 block FLUX.1 that core's UNETLoader detects, rank-4
LoRAs in the released naming, a random full-size FLUX VAE).

Stand-in: DualCLIPLoader + CLIPTextEncode are swapped for tests/host_probe's
DiTControlProbe_FluxConditioningStandIn (Flux-shaped CONDITIONING drawn from the text): real-size CLIP-L
and T5-XXL are too heavy for CI. Everything else runs as shipped, at a small size and few steps.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from dit_control.tests.comfy_host import assert_documented, execution_error, load_api_graph
from dit_control.tests.generators.make_checkpoints import write_easycontrol_inputs

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = ("easycontrol_canny", "easycontrol_subject", "easycontrol_subject_canny")
# every shipped EasyControl template; the ones not in WORKFLOWS run in tests/api/test_api_easycontrol_kinds.py
TEMPLATES = WORKFLOWS + ("easycontrol_ghibli", "easycontrol_inpainting", "easycontrol_hedsketch", "easycontrol_depth",
                         "easycontrol_pose", "easycontrol_seg", "easycontrol_canny_img2img")
SIZE, COND_SIZE, STEPS, TOKENS = 128, 128, 2, 32


def prepare_server(comfy, models_dir):
    """Our condition images in the server's input folder (the LoRAs and broken files are in the test
    models folder, conftest's models_dir)."""
    write_easycontrol_inputs(comfy.base_dir / "input")
    return comfy


@pytest.fixture(scope="module")
def server(comfy, models_dir):
    return prepare_server(comfy, models_dir)


def ids(g, class_type) -> list:
    """Node ids of one class, in id order."""
    return sorted((k for k, n in g.items() if n["class_type"] == class_type), key=int)


def one(g, class_type) -> str:
    (k,) = ids(g, class_type)
    return k


def api_graph(name: str, size=SIZE, cond_size=COND_SIZE, steps=STEPS, tokens=TOKENS, save_latent=True) -> dict:
    """A shipped API workflow with the conditioning stand-in, small and short; plus a SaveLatent."""
    g = load_api_graph(REPO / "workflows" / "api" / f"{name}.json")
    encode = one(g, "CLIPTextEncode")
    del g[one(g, "DualCLIPLoader")]
    g[encode] = {"class_type": "DiTControlProbe_FluxConditioningStandIn",
                 "inputs": {"text": g[encode]["inputs"]["text"], "tokens": tokens}}
    for node in g.values():
        if node["class_type"] == "DiTControl_ApplyEasyControl":
            node["inputs"]["condition_size"] = cond_size
        if node["class_type"] in ("EmptySD3LatentImage", "ModelSamplingFlux"):
            node["inputs"].update(width=size, height=size)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    if save_latent:
        g["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [one(g, "KSampler"), 0],
                                                          "filename_prefix": f"ec_test/{name}"}}
    return g


def apply_nodes(g):
    return ids(g, "DiTControl_ApplyEasyControl")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def with_cache(g, cache: bool):
    for k in apply_nodes(g):
        g[k]["inputs"]["cache"] = cache
    return g


# ---------------------------------------------------------------------------------------------
#                 Condition image preparation (in-process, no server, no ComfyUI import)
# ---------------------------------------------------------------------------------------------

def prep_functions() -> dict:
    """The pure image-preparation functions (kernels/flux_easycontrol/condition_image.py)."""
    from dit_control.kernels.flux_easycontrol import condition_image
    return vars(condition_image)


def test_spatial_condition_is_resized_to_s_by_s():
    f = prep_functions()
    img = torch.rand(2, 90, 160, 3)
    out = f["prepare_condition"](img, "spatial", 64)
    assert out.shape == (2, 64, 64, 3)
    # aspect ignored, Lanczos: PIL's own resize of the same image
    from PIL import Image
    want = f["_from_pil"](f["_to_pil"](img[1]).resize((64, 64), Image.LANCZOS))
    assert torch.equal(out[1], want)


def test_subject_condition_is_scaled_to_the_long_side_and_centre_padded():
    f = prep_functions()
    img = torch.rand(1, 640, 480, 3)                # portrait: long side 640 -> 128, 480 -> 96
    out = f["prepare_condition"](img, "subject", 128)
    assert out.shape == (1, 128, 128, 3)
    assert torch.all(out[0, :, :16] == 0.5) and torch.all(out[0, :, 112:] == 0.5)   # 16 px mid-grey each side
    assert not torch.all(out[0, :, 16:112] == 0.5)
    odd = f["prepare_condition"](torch.rand(1, 100, 300, 3), "subject", 128)          # 300 -> 128, 100 -> 42 -> 32
    assert torch.all(odd[0, :48] == 0.5) and torch.all(odd[0, 80:] == 0.5) and not torch.all(odd[0, 48:80] == 0.5)


# ---------------------------------------------------------------------------------------------
#                                    Registration, workflows
# ---------------------------------------------------------------------------------------------

OUR_NODES = ("DiTControl_EasyControlLoRALoader", "DiTControl_ApplyEasyControl")


def test_nodes_are_registered_with_descriptions_and_tooltips(server):
    info_all = server.get("/object_info")
    for name in OUR_NODES:
        assert_documented(info_all, name, "DiT Control/EasyControl")
    apply = info_all["DiTControl_ApplyEasyControl"]["input"]["required"]
    assert apply["condition_size"][1]["default"] == 512 and apply["cache"][1]["default"] is True
    loras = info_all["DiTControl_EasyControlLoRALoader"]["input"]["required"]["lora_name"][1]["options"]
    assert "canny.safetensors" in loras and "subject.safetensors" in loras


@pytest.mark.parametrize("name", TEMPLATES)
def test_ui_workflow_is_the_api_workflow_and_a_template(server, name):
    from dit_control.tests.generators.workflow_format import strip_meta, ui_to_api
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = load_api_graph(REPO / "workflows" / "api" / f"{name}.json")
    assert ui_to_api(ui, server.get("/object_info")) == strip_meta(api)
    assert name in server.get("/api/workflow_templates")["dit-control"]
    classes = {n["class_type"] for n in api.values()}
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "KSampler"} <= classes
    assert [n["inputs"]["guidance"] for n in api.values() if n["class_type"] == "FluxGuidance"] == [3.5]
    assert [n["inputs"]["steps"] for n in api.values() if n["class_type"] == "KSampler"] == [25]
    assert [n["inputs"]["type"] for n in api.values() if n["class_type"] == "DualCLIPLoader"] == ["flux"]


# ---------------------------------------------------------------------------------------------
#                                    The shipped workflows
# ---------------------------------------------------------------------------------------------

@pytest.mark.both_hosts
@pytest.mark.parametrize("name", WORKFLOWS)
def test_shipped_workflow_runs(server, name):
    from PIL import Image
    g = api_graph(name, tokens=256)
    history = server.run_ok(g)
    png = server.images(history)
    assert len(png) == 1
    img = Image.open(io.BytesIO(png[0]))
    assert img.size == (SIZE, SIZE)
    lat = server.saved_latent(history)
    assert lat.shape == (1, 16, SIZE // 8, SIZE // 8) and torch.isfinite(lat).all()


@pytest.mark.both_hosts
def test_cached_equals_uncached(server):
    for name in ("easycontrol_canny", "easycontrol_subject_canny"):
        cached = server.saved_latent(server.run_ok(with_cache(api_graph(name), True)))
        uncached = server.saved_latent(server.run_ok(with_cache(api_graph(name), False)))
        assert rel(cached, uncached) <= 1e-6, name


def test_condition_changes_the_result(server):
    with_cond = server.saved_latent(server.run_ok(api_graph("easycontrol_canny")))
    g = api_graph("easycontrol_canny")
    g[one(g, "ModelSamplingFlux")]["inputs"]["model"] = [one(g, "UNETLoader"), 0]   # without Apply EasyControl
    for cls in ("LoadImage", "DiTControl_EasyControlLoRALoader", "DiTControl_ApplyEasyControl"):
        del g[one(g, cls)]
    plain = server.saved_latent(server.run_ok(g))
    assert rel(with_cond, plain) > 1e-3
    # strength scales the LoRA: another strength, another result
    g = api_graph("easycontrol_canny")
    g[one(g, "DiTControl_ApplyEasyControl")]["inputs"]["strength"] = 0.0
    assert rel(server.saved_latent(server.run_ok(g)), with_cond) > 1e-4


def _bank_reports(server) -> list:
    return [line for line in Path(server.log_path).read_text().splitlines() if "EasyControl sampling run done" in line]


@pytest.mark.both_hosts
def test_bank_is_built_once_per_run_and_dropped(server):
    """The server log line of each sampling run: with the cache, the condition stream runs once and is
    reused at every later step; without it, never banked."""
    for cache, expect in ((True, "(cache on): KV bank built 1, reused 2 times"),
                          (False, "(cache off): KV bank built 0, reused 0 times")):
        before = len(_bank_reports(server))
        g = with_cache(api_graph("easycontrol_canny", steps=3), cache)
        g[one(g, "KSampler")]["inputs"]["seed"] = 7 if cache else 8
        server.run_ok(g)
        reports = _bank_reports(server)[before:]
        assert len(reports) == 1 and expect in reports[0], reports


def watched_run(server, cache: bool, tag: str, cond_size: int) -> dict:
    """easycontrol_canny with the probe's bank watch between ModelSamplingFlux and KSampler and its report
    after the sampler's LATENT: what the KV bank held during the run, and what of it is alive after."""
    g = with_cache(api_graph("easycontrol_canny", cond_size=cond_size, steps=3, save_latent=False), cache)
    ks, msf = one(g, "KSampler"), one(g, "ModelSamplingFlux")
    g["95"] = {"class_type": "DiTControlProbe_EasyControlBankWatch", "inputs": {"model": [msf, 0], "tag": tag}}
    g[ks]["inputs"]["model"] = ["95", 0]
    g["96"] = {"class_type": "DiTControlProbe_EasyControlBankReport", "inputs": {"samples": [ks, 0], "tag": tag}}
    return json.loads(server.run_ok(g)["outputs"]["96"]["text"][0])


@pytest.mark.both_hosts
def test_bank_tensors_are_freed_after_the_run(server):
    """Measured: during the run the bank holds K and V of every block for the condition tokens; once the
    sampling run has ended none of those tensors is alive any more (weak references, after gc), although
    ComfyUI keeps the patched MODEL cached. With the cache off nothing is banked."""
    cond_size = 256                                  # (256/16)² = 256 condition tokens
    tokens, heads, head_dim, blocks_ = (cond_size // 16) ** 2, 24, 128, 2   # test FLUX: 1 double + 1 single
    on = watched_run(server, True, f"bank-on-{server.host}", cond_size)
    kv_elements = 2 * blocks_ * heads * tokens * head_dim
    print(f"cache on: {on}")
    assert on["calls"] == 3 and on["peak_entries"] == 1
    assert on["peak_bytes"] in (2 * kv_elements, 4 * kv_elements), on       # bf16/fp16 or fp32 compute
    assert on["watched_tensors"] == 2 * blocks_
    assert on["alive_tensors"] == 0 and on["alive_bytes"] == 0, on
    off = watched_run(server, False, f"bank-off-{server.host}", cond_size)
    assert off["calls"] == 3 and off["peak_bytes"] == 0 and off["watched_tensors"] == 0, off


@pytest.mark.both_hosts
def test_sampler_custom_advanced_matches_ksampler(server):
    g = api_graph("easycontrol_canny")
    ks = g[one(g, "KSampler")]["inputs"]
    reference = server.saved_latent(server.run_ok(g))
    custom = api_graph("easycontrol_canny")
    k = one(custom, "KSampler")
    custom.update({
        "80": {"class_type": "RandomNoise", "inputs": {"noise_seed": ks["seed"]}},
        "81": {"class_type": "BasicGuider", "inputs": {"model": ks["model"], "conditioning": ks["positive"]}},
        "82": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": ks["sampler_name"]}},
        "83": {"class_type": "BasicScheduler", "inputs": {"model": ks["model"], "scheduler": ks["scheduler"],
                                                          "steps": ks["steps"], "denoise": 1.0}},
        k: {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["80", 0], "guider": ["81", 0],
                                                              "sampler": ["82", 0], "sigmas": ["83", 0],
                                                              "latent_image": ks["latent_image"]}},
    })
    assert rel(server.saved_latent(server.run_ok(custom)), reference) <= 1e-6


def initial_noise(server, g) -> torch.Tensor:
    """The noise core's KSampler starts from for this graph's latent and seed (the probe pack)."""
    probe = {"1": g[one(g, "EmptySD3LatentImage")],
             "2": {"class_type": "DiTControlProbe_SamplerNoise",
                   "inputs": {"samples": ["1", 0], "seed": g[one(g, "KSampler")]["inputs"]["seed"], "draws": 0}},
             "90": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "ec_test/noise"}}}
    return server.saved_latent(server.run_ok(probe))


FP8_TOLERANCE = 0.05     # relative L2 of the sampled update (latent − initial noise), fp8 vs default dtype


def test_fp8_base_stays_close_to_the_default_dtype(server):
    """Core's UNETLoader with weight_dtype fp8_e4m3fn (the block patches run on core's modules, which cast
    the fp8 weights per call): one extra run. Its sampled update (final latent − initial noise, what the
    model contributed over the steps) stays within FP8_TOLERANCE of the default-dtype run's (measured
    0.042 on the test FLUX, whose random weights (std 0.0085, 93 % below e4m3's smallest normal 2^-6)
    the cast to e4m3 rounds with 6.3 % relative RMS error)."""
    default = api_graph("easycontrol_canny")
    fp8 = api_graph("easycontrol_canny")
    fp8[one(fp8, "UNETLoader")]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    noise = initial_noise(server, default)
    out = {name: server.saved_latent(server.run_ok(g)) - noise for name, g in (("default", default), ("fp8", fp8))}
    assert torch.isfinite(out["fp8"]).all()
    fp8_error = rel(out["fp8"], out["default"])
    print(f"fp8 vs default: relative L2 of the sampled update {fp8_error:.4f}")
    assert 0 < fp8_error <= FP8_TOLERANCE


def native_to_diffusers(sd: dict) -> dict:
    """The test FLUX in diffusers FluxTransformer2DModel names (the inverse of
    kernels/flux_easycontrol/checkpoint.py's renaming: fused q/k/v and linear1 split, final adaLN halves
    swapped back)."""
    from dit_control.kernels.flux_easycontrol import checkpoint as ck
    sd, out = dict(sd), {}
    hidden = sd["img_in.weight"].shape[0]

    def split(native: str, parts):
        for suffix in ("weight", "bias"):
            name = f"{native}.{suffix}"
            if name not in sd:
                continue
            t = sd.pop(name)
            if len(parts) == 1:
                out[f"{parts[0]}.{suffix}"] = t
                continue
            n = t.shape[0]
            sizes = [n // 3] * 3 if len(parts) == 3 else [hidden] * 3 + [n - 3 * hidden]     # [q; k; v(; mlp)]
            for p, piece in zip(parts, torch.split(t, sizes, dim=0)):
                out[f"{p}.{suffix}"] = piece.clone()

    for name in ck.SWAPPED_HALVES:
        sd[name] = ck._swap_halves(sd[name])
    for native, parts in ck._TOP_LEVEL.items():
        split(native, parts)
    for native_prefix, diffusers_prefix, linears, norms in (
            ("double_blocks", "transformer_blocks", ck._DOUBLE, ck._DOUBLE_NORMS),
            ("single_blocks", "single_transformer_blocks", ck._SINGLE, ck._SINGLE_NORMS)):
        for i in ck._indices(sd, native_prefix):
            src, dst = f"{native_prefix}.{i}.", f"{diffusers_prefix}.{i}."
            for native, parts in linears.items():
                split(src + native, [dst + q for q in parts])
            for native, diff in norms.items():
                out[dst + diff] = sd.pop(src + native)
    assert not sd, sorted(sd)[:5]
    return out


def test_diffusers_layout_flux_through_core_unet_loader(server, models_dir):
    """The test FLUX saved in diffusers names: core's UNETLoader converts it on load, and the shipped graph
    gives the comfy-layout file's latent."""
    from safetensors.torch import load_file, save_file

    from dit_control.kernels.flux_easycontrol.checkpoint import diffusers_to_native
    name = "flux1-dev-diffusers-layout.safetensors"
    path = models_dir / "diffusion_models" / name
    if not path.exists():
        native = load_file(str(models_dir / "diffusion_models" / "flux1-dev.safetensors"))
        diffusers = native_to_diffusers(native)
        assert all(torch.equal(native[k], v) for k, v in diffusers_to_native(diffusers).items())   # round trip
        save_file(diffusers, str(path))
        del native, diffusers
    comfy_layout = server.saved_latent(server.run_ok(api_graph("easycontrol_canny")))
    g = api_graph("easycontrol_canny")
    g[one(g, "UNETLoader")]["inputs"]["unet_name"] = name
    assert rel(server.saved_latent(server.run_ok(g)), comfy_layout) <= 1e-6


def _condition_reports(server) -> list:
    return [line for line in Path(server.log_path).read_text().splitlines() if "EasyControl conditions:" in line]


def test_kind_from_the_file_name_and_prepared_sizes(server):
    before = len(_condition_reports(server))
    g = api_graph("easycontrol_subject_canny", save_latent=False)
    g[one(g, "KSampler")]["inputs"]["seed"] = 3
    server.run_ok(g)
    last = _condition_reports(server)[before:][-1]
    assert f"subject.safetensors as subject, {COND_SIZE}x{COND_SIZE} px" in last, last
    assert f"canny.safetensors as spatial, {COND_SIZE}x{COND_SIZE} px" in last, last


def test_cfg_branches(server):
    """True CFG (cfg 3, a real negative): the bank is keyed per CFG branch; cached == uncached."""
    out = {}
    for cache in (True, False):
        g = with_cache(api_graph("easycontrol_canny"), cache)
        ks = one(g, "KSampler")
        g["70"] = {"class_type": "DiTControlProbe_FluxConditioningStandIn", "inputs": {"text": "blurry",
                                                                                       "tokens": TOKENS}}
        g[ks]["inputs"].update(cfg=3.0, negative=["70", 0])
        out[cache] = server.saved_latent(server.run_ok(g))
    assert rel(out[True], out[False]) <= 1e-6


def test_two_spatial_conditions_encoded_together(server):
    """Two chained spatial conditions (joint tall encode): runs, cached == uncached, and differs from one."""
    single = server.saved_latent(server.run_ok(api_graph("easycontrol_canny")))
    out = {}
    for cache in (True, False):
        g = with_cache(api_graph("easycontrol_canny"), cache)
        first = one(g, "DiTControl_ApplyEasyControl")
        g["60"] = {"class_type": "LoadImage", "inputs": {"image": "easycontrol_canny_input_2.png"}}
        g["61"] = json.loads(json.dumps(g[first]))
        g["61"]["inputs"].update(model=[first, 0], image=["60", 0])
        g[one(g, "ModelSamplingFlux")]["inputs"]["model"] = ["61", 0]
        out[cache] = server.saved_latent(server.run_ok(g))
    assert rel(out[True], out[False]) <= 1e-6
    assert rel(out[True], single) > 1e-4


def test_composes_with_core_lora(server):
    """Core's LoraLoaderModelOnly (a plain FLUX LoRA) before or after Apply EasyControl: the same latent,
    different from without it; cached == uncached with it."""
    def graph(where, cache=True):
        g = with_cache(api_graph("easycontrol_canny"), cache)
        apply, unet, msf = one(g, "DiTControl_ApplyEasyControl"), one(g, "UNETLoader"), one(g, "ModelSamplingFlux")
        g["50"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"lora_name": "broken/flux_style_lora.safetensors", "strength_model": 1.0}}
        if where == "before":
            g["50"]["inputs"]["model"] = [unet, 0]
            g[apply]["inputs"]["model"] = ["50", 0]
        else:
            g["50"]["inputs"]["model"] = [apply, 0]
            g[msf]["inputs"]["model"] = ["50", 0]
        return g
    without = server.saved_latent(server.run_ok(api_graph("easycontrol_canny")))
    before = server.saved_latent(server.run_ok(graph("before")))
    after = server.saved_latent(server.run_ok(graph("after")))
    uncached = server.saved_latent(server.run_ok(graph("after", cache=False)))
    assert rel(before, after) <= 1e-6
    assert rel(after, uncached) <= 1e-6
    assert rel(after, without) > 1e-4


@pytest.mark.both_hosts
def test_composes_with_reference_latents(server):
    """Core's ReferenceLatent (Kontext-style extra image tokens, appended before ours): runs, changes
    the result, cached == uncached."""
    def graph(cache=True, ref=True):
        g = with_cache(api_graph("easycontrol_canny"), cache)
        if ref:
            guidance = one(g, "FluxGuidance")
            g["40"] = {"class_type": "LoadImage", "inputs": {"image": "easycontrol_subject_input.png"}}
            g["41"] = {"class_type": "ImageScale", "inputs": {"image": ["40", 0], "upscale_method": "bilinear",
                                                              "width": 64, "height": 64, "crop": "disabled"}}
            g["42"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["41", 0], "vae": [one(g, "VAELoader"), 0]}}
            g["43"] = {"class_type": "ReferenceLatent",
                       "inputs": {"conditioning": g[guidance]["inputs"]["conditioning"], "latent": ["42", 0]}}
            g[guidance]["inputs"]["conditioning"] = ["43", 0]
        return g
    plain = server.saved_latent(server.run_ok(graph(ref=False)))
    cached = server.saved_latent(server.run_ok(graph()))
    uncached = server.saved_latent(server.run_ok(graph(cache=False)))
    assert rel(cached, uncached) <= 1e-6
    assert rel(cached, plain) > 1e-4


def test_batch_and_non_square(server):
    """A batch of 2 at 192×128 (spatial ids stretched onto a non-square grid): 2 PNGs of that size,
    cached == uncached."""
    from PIL import Image
    out = {}
    for cache in (True, False):
        g = with_cache(api_graph("easycontrol_subject_canny"), cache)
        g[one(g, "EmptySD3LatentImage")]["inputs"].update(width=192, height=128, batch_size=2)
        g[one(g, "ModelSamplingFlux")]["inputs"].update(width=192, height=128)
        history = server.run_ok(g)
        out[cache] = server.saved_latent(history)
        if cache:
            sizes = [Image.open(io.BytesIO(b)).size for b in server.images(history)]
            assert sizes == [(192, 128)] * 2, sizes
    assert out[True].shape == (2, 16, 16, 24)
    assert rel(out[True], out[False]) <= 1e-6


CHANGES = {
    "prompt": lambda g: g[one(g, "DiTControlProbe_FluxConditioningStandIn")]["inputs"].update(
        text=g[one(g, "DiTControlProbe_FluxConditioningStandIn")]["inputs"]["text"] + " At night."),
    "guidance": lambda g: g[one(g, "FluxGuidance")]["inputs"].update(guidance=2.0),
    "condition image": lambda g: g[one(g, "LoadImage")]["inputs"].update(image="easycontrol_canny_input_2.png"),
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_change_on_the_same_server_matches_cache_off(server, what):
    """A first run fills (and drops) the bank; a changed input on the same server, cache on, gives
    exactly what the changed graph gives with the cache off: no stale bank survives a run."""
    first = server.saved_latent(server.run_ok(api_graph("easycontrol_canny")))
    changed = api_graph("easycontrol_canny")
    CHANGES[what](changed)
    cached = server.saved_latent(server.run_ok(changed))
    uncached = server.saved_latent(server.run_ok(with_cache(json.loads(json.dumps(changed)), False)))
    assert rel(cached, uncached) <= 1e-6
    assert rel(cached, first) > 1e-5, f"the changed {what} did not change the result"


def test_changed_prompt_equals_a_fresh_server(server, models_dir, tmp_path):
    """After runs with another prompt on the same server, the changed prompt gives bit for bit what a
    fresh server gives for it."""
    from dit_control.tests.comfy_host import ComfyServer
    server.run_ok(api_graph("easycontrol_canny"))
    changed = api_graph("easycontrol_canny")
    CHANGES["prompt"](changed)
    same = server.saved_latent(server.run_ok(changed))
    with ComfyServer(models_dir, base_dir=tmp_path / "fresh", host=server.host, probe=True) as fresh:
        prepare_server(fresh, models_dir)
        new = fresh.saved_latent(fresh.run_ok(changed))
    # the same computation: both servers are started alike (same thread count, graph, shapes, dtypes)
    assert torch.equal(same, new)


# ---------------------------------------------------------------------------------------------
#                                 Wrong inputs: clear errors
# ---------------------------------------------------------------------------------------------

BAD_LORAS = {
    "broken/flux_style_lora.safetensors": "kohya-style FLUX LoRA",
    "broken/pixart-like.safetensors": "PixArt",
    "broken/sd15-like.safetensors": "expected an EasyControl condition LoRA",
    "broken/truncated.safetensors": "truncated.safetensors",
}


@pytest.mark.both_hosts
@pytest.mark.parametrize("lora", sorted(BAD_LORAS))
def test_bad_lora_file_gives_a_clear_error_and_the_next_prompt_runs(server, lora):
    g = api_graph("easycontrol_canny", save_latent=False)
    g[one(g, "DiTControl_EasyControlLoRALoader")]["inputs"]["lora_name"] = lora
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "DiTControl_EasyControlLoRALoader", err
    assert BAD_LORAS[lora] in err["exception_message"], err["exception_message"]
    print(f"{lora}: {err['exception_message']}")
    server.run_ok(api_graph("easycontrol_canny", save_latent=False))


@pytest.mark.both_hosts
def test_released_layout_loads_and_a_depth_mismatch_is_explained(server):
    g = api_graph("easycontrol_canny", save_latent=False)
    g[one(g, "DiTControl_EasyControlLoRALoader")]["inputs"]["lora_name"] = "broken/released_layout_rank1.safetensors"
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "DiTControl_ApplyEasyControl", err
    assert "19 double + 38 single blocks" in err["exception_message"], err["exception_message"]
    assert "1 double + 1 single blocks" in err["exception_message"], err["exception_message"]
    print(err["exception_message"])


@pytest.mark.both_hosts
def test_wrong_vae_gives_a_clear_error(server):
    g = api_graph("easycontrol_canny", save_latent=False)
    g[one(g, "VAELoader")]["inputs"]["vae_name"] = "sd-vae-ft-ema.safetensors"
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "DiTControl_ApplyEasyControl", err
    assert "needs its own VAE" in err["exception_message"], err["exception_message"]
    server.run_ok(api_graph("easycontrol_canny", save_latent=False))


@pytest.mark.both_hosts
def test_pixart_model_gives_a_clear_error(server):
    g = api_graph("easycontrol_canny", save_latent=False)
    g[one(g, "UNETLoader")] = {"class_type": "DiTControl_PixArtDiTLoader",
              "inputs": {"dit_name": "PixArt-XL-2-512x512.pth", "weight_dtype": "default", "resolution": "auto"}}
    err = execution_error(server.run(g))
    assert err is not None and err["node_type"] == "DiTControl_ApplyEasyControl", err
    assert "needs a FLUX.1 MODEL" in err["exception_message"], err["exception_message"]
    print(err["exception_message"])
    server.run_ok(api_graph("easycontrol_canny", save_latent=False))


def test_nan_strength_and_an_oversize_latent_are_refused_by_name(server):
    g = api_graph("easycontrol_canny", save_latent=False)
    g[apply_nodes(g)[0]]["inputs"]["strength"] = float("nan")
    err = execution_error(server.run(g))
    assert err and "Apply EasyControl: strength is nan" in err["exception_message"], err
    # 16384² (EmptySD3LatentImage's largest): ~1M image tokens, refused when sampling starts, before the bank
    err = execution_error(server.run(api_graph("easycontrol_canny", size=16384, steps=1, save_latent=False)))
    message = err and err["exception_message"]
    assert message and "Apply EasyControl (sampling): a 16384×16384 px image (batch 1)" in message \
        and "1,048,576 image + 64 condition tokens" in message and "refused before allocating" in message, err


def test_posterior_sample_is_the_reference_draw_under_the_reference_schedule(server):
    """Issue 31, one 3-step run at a non-square size (128×96): SamplerCustomAdvanced with EasyControl Scheduler's
    σ (its list checked against the hand-written one in test_easycontrol_schedule.py) and Apply EasyControl with
    posterior 'sample'. The condition latent the blocks saw equals the reference's draw written out by hand — one
    CPU generator seeded with the seed: the noise latent first, then diffusers' DiagonalGaussianDistribution
    .sample over the condition's VAE moments (read by the probe pack from core's VAE, not through the pack), then
    (z − 0.1159)·0.3611 — bit for bit. A second Apply EasyControl in 'mean' on the same image gives the moments'
    mean in the latent format: core's VAE encode, as before."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    seed, steps, width, height = 31, 3, 128, 96
    g = api_graph("easycontrol_canny", save_latent=False)
    for node in g.values():
        if node["class_type"] in ("EmptySD3LatentImage", "ModelSamplingFlux"):
            node["inputs"].update(width=width, height=height)
    apply = apply_nodes(g)[0]
    g[apply]["inputs"].update(posterior="sample", posterior_seed=seed)
    k = one(g, "KSampler")
    ks = g[k]["inputs"]
    g.update({
        "80": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "81": {"class_type": "BasicGuider", "inputs": {"model": ks["model"], "conditioning": ks["positive"]}},
        "82": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "83": {"class_type": "DiTControl_EasyControlScheduler",
               "inputs": {"steps": steps, "width": width, "height": height, "max_shift": 1.15, "base_shift": 0.5}},
        k: {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["80", 0], "guider": ["81", 0],
                                                              "sampler": ["82", 0], "sigmas": ["83", 0],
                                                              "latent_image": ks["latent_image"]}},
        "84": {"class_type": "DiTControlProbe_EasyControlConditions", "inputs": {"model": [apply, 0],
                                                                               "samples": [k, 0]}},
        "85": {"class_type": "DiTControlProbe_VAEMoments", "inputs": {"vae": g[apply]["inputs"]["vae"],
                                                                    "image": ["84", 1]}},
        "86": {"class_type": "DiTControl_ApplyEasyControl", "inputs": {**g[apply]["inputs"], "posterior": "mean"}},
        "87": {"class_type": "DiTControlProbe_EasyControlConditions", "inputs": {"model": ["86", 0]}},
        "91": {"class_type": "SaveLatent", "inputs": {"samples": ["84", 0], "filename_prefix": "ec_test/drawn"}},
        "92": {"class_type": "SaveLatent", "inputs": {"samples": ["85", 0], "filename_prefix": "ec_test/moments"}},
        "93": {"class_type": "SaveLatent", "inputs": {"samples": ["87", 0], "filename_prefix": "ec_test/mean"}},
        "94": {"class_type": "SaveLatent", "inputs": {"samples": [k, 0], "filename_prefix": "ec_test/sampled"}},
    })
    history = server.run_ok(g)
    drawn, moments, mean = (server.saved_latent(history, n) for n in ("91", "92", "93"))
    assert server.saved_latent(history, "94").shape == (1, 16, height // 8, width // 8)
    assert moments.shape == (1, 32, COND_SIZE // 8, COND_SIZE // 8), moments.shape
    generator = torch.manual_seed(seed)
    torch.randn((1, 16, height // 8, width // 8), generator=generator)          # the reference's noise latent
    want = (DiagonalGaussianDistribution(moments).sample(generator) - 0.1159) * 0.3611
    assert torch.equal(drawn, want), float((drawn - want).abs().max())
    assert torch.equal(mean, (moments[:, :16] - 0.1159) * 0.3611)
    print(f"sample − mean in the condition latent: largest |Δ| {float((drawn - mean).abs().max()):.3g}")
