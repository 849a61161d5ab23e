"""EasyControl (issue 11): the shipped graphs' schedule is the reference's.

The reference (Xiaojiu-z/EasyControl src/pipeline.py on diffusers 0.32's FluxPipeline) samples with
FlowMatchEulerDiscreteScheduler and dynamic shift; written out here by hand (specs/easycontrol.md):
  base σ = linspace(1, 1/N, N); L = noise tokens = (H/16)·(W/16);
  μ = 0.5 + (L − 256)·(1.15 − 0.5)/(4096 − 256);  σ' = e^μ / (e^μ + 1/σ − 1);  a final 0 appended;
  Euler: x ← x + (σ_{i+1} − σ_i)·v, with v the transformer's output at timestep σ.

The shipped graphs use core's ModelSamplingFlux (max 1.15, base 0.5, the latent's size) and KSampler
euler / simple. Their σ list is read from the running server (core's BasicScheduler on the graph's own
model chain, reported by the test probe pack), so it is core's own code, not a copy of it. The Euler
step is checked in-process on core's k-diffusion sampler with a made-up velocity field.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dit_control.tests.comfy_host import comfy_dir, execution_error, load_api_graph

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = ("easycontrol_canny", "easycontrol_subject", "easycontrol_subject_canny")
# the largest |σ_core − σ_reference| allowed: core keeps σ in float32 (its table is float32, t = k/10000)
FLOAT32_SIGMA_TOL = 2e-7


def reference_sigmas(steps: int, width: int, height: int) -> list:
    """The reference's σ list for a W×H image, in float64 (diffusers then casts it to float32)."""
    tokens = (height // 16) * (width // 16)
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    base = [1.0 - i * (1.0 - 1.0 / steps) / (steps - 1) for i in range(steps)]      # linspace(1, 1/N, N)
    return [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in base] + [0.0]


def node_of(g, class_type) -> str:
    (k,) = [k for k, n in g.items() if n["class_type"] == class_type]
    return k


def shipped_schedule(name: str) -> dict:
    """The shipped graph's schedule inputs: steps, sampler, scheduler, denoise, ModelSamplingFlux's
    settings and the empty latent's size."""
    g = load_api_graph(REPO / "workflows" / "api" / f"{name}.json")
    ks = g[node_of(g, "KSampler")]["inputs"]
    msf = g[node_of(g, "ModelSamplingFlux")]["inputs"]
    latent = g[node_of(g, "EmptySD3LatentImage")]["inputs"]
    # the sampler samples the ModelSamplingFlux output
    assert ks["model"] == [node_of(g, "ModelSamplingFlux"), 0]
    return {"graph": g, "steps": ks["steps"], "sampler": ks["sampler_name"], "scheduler": ks["scheduler"],
            "denoise": ks["denoise"], "msf": msf, "size": (latent["width"], latent["height"])}


def server_sigmas(server, unet: dict, msf: dict | None, scheduler: str, steps: int, denoise: float) -> list:
    """Core's BasicScheduler (what KSampler computes) on UNETLoader [→ ModelSamplingFlux], from the server."""
    g = {"1": {"class_type": "UNETLoader", "inputs": dict(unet)}}
    model = ["1", 0]
    if msf is not None:
        g["2"] = {"class_type": "ModelSamplingFlux", "inputs": {**msf, "model": ["1", 0]}}
        model = ["2", 0]
    g["3"] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps,
                                                         "denoise": denoise}}
    g["4"] = {"class_type": "DiTControlProbe_SigmasReport", "inputs": {"sigmas": ["3", 0]}}
    history = server.run(g)
    assert execution_error(history) is None, execution_error(history)
    return json.loads(history["outputs"]["4"]["text"][0])["sigmas"]


def max_diff(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_shipped_graph_gives_the_reference_sigmas(comfy, name):
    s = shipped_schedule(name)
    assert (s["sampler"], s["scheduler"], s["steps"], s["denoise"]) == ("euler", "simple", 25, 1.0)
    assert (s["msf"]["max_shift"], s["msf"]["base_shift"]) == (1.15, 0.5)
    # ModelSamplingFlux is set to the size the graph samples at
    assert (s["msf"]["width"], s["msf"]["height"]) == s["size"] == (1024, 1024)
    msf = {k: v for k, v in s["msf"].items() if k != "model"}
    unet = {k: v for k, v in s["graph"][node_of(s["graph"], "UNETLoader")]["inputs"].items()}
    got = server_sigmas(comfy, unet, msf, s["scheduler"], s["steps"], s["denoise"])
    want = reference_sigmas(s["steps"], *s["size"])
    diff = max_diff(got, want)
    print(f"{name}: 25 σ + 0, largest |core − reference| = {diff:.2e}")
    assert got[0] == 1.0 and got[-1] == 0.0
    assert diff <= FLOAT32_SIGMA_TOL


@pytest.mark.parametrize("size", [(1024, 1024), (768, 1024), (720, 992)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_model_sampling_flux_at_the_image_size_is_the_reference_dynamic_shift(comfy, size):
    """Other sizes (the reference's 768×1024 and 720×992): ModelSamplingFlux set to the image size gives
    the reference's dynamic shift; without it the model's own shift (1.15) is right for 1024² only."""
    unet = {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}
    msf = {"max_shift": 1.15, "base_shift": 0.5, "width": size[0], "height": size[1]}
    got = server_sigmas(comfy, unet, msf, "simple", 25, 1.0)
    assert max_diff(got, reference_sigmas(25, *size)) <= FLOAT32_SIGMA_TOL
    own = server_sigmas(comfy, unet, None, "simple", 25, 1.0)
    own_diff = max_diff(own, reference_sigmas(25, *size))
    if size == (1024, 1024):
        assert own_diff <= FLOAT32_SIGMA_TOL
    else:
        assert own_diff > 1e-3, own_diff


@pytest.fixture(scope="module")
def k_sampling():
    """core v0.33's k-diffusion samplers and model sampling in this process (ComfyUI at the END of
    sys.path so that it cannot shadow this repo's packages)."""
    root = str(comfy_dir("0.33"))
    sys.path.append(root)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.k_diffusion.sampling
    import comfy.model_sampling
    yield comfy.k_diffusion.sampling, comfy.model_sampling
    sys.path.remove(root)


def test_euler_is_the_reference_flow_matching_step(k_sampling):
    """Core's euler on a flow model (CONST: denoised = x − σ·v, as KSampler wraps FLUX) makes the
    reference's step x ← x + (σ_{i+1} − σ_i)·v, and the timestep the model sees is σ itself."""
    sampling, model_sampling = k_sampling

    class FluxSampling(model_sampling.ModelSamplingFlux, model_sampling.CONST):
        pass

    ms = FluxSampling()
    sigmas = torch.tensor(reference_sigmas(25, 1024, 1024), dtype=torch.float64)
    assert torch.equal(ms.timestep(sigmas), sigmas)

    def velocity(x, sigma):
        return torch.sin(3 * x) * sigma + 0.5 * x - 0.25

    def denoiser(x, sigma):
        return ms.calculate_denoised(sigma, velocity(x, sigma[0]), x)

    x0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sampling.sample_euler(denoiser, x0.clone(), sigmas, disable=True)
    ref = x0.clone()
    for i in range(len(sigmas) - 1):
        ref = ref + (sigmas[i + 1] - sigmas[i]) * velocity(ref, sigmas[i])
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-12
    # full denoise starts from pure noise: σ_0 = 1 in core's noise scaling
    noise = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    assert torch.equal(ms.noise_scaling(sigmas[:1], noise, torch.zeros_like(noise)), noise)


SCHEDULE_STEPS = (3, 20, 25, 28, 30, 50)
SCHEDULE_SIZES = ((1024, 1024), (768, 1024), (720, 992))
DIVIDES_1000 = (20, 25, 50)


def diffusers_sigmas(steps: int, width: int, height: int) -> list:
    """FLUX.1-dev's scheduler as the reference pipeline calls it (diffusers' own code, float32)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    tokens = (height // 16) * (width // 16)
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.tolist()


@pytest.mark.both_hosts
def test_easycontrol_scheduler_is_the_reference_list_at_any_steps_and_size(comfy):
    """One prompt: EasyControl Scheduler at 3, 20, 25, 28, 30, 50 steps for three sizes equals diffusers' list
    bit for bit and the hand-written one to ≤ 1e-7; core's ModelSamplingFlux + simple on the same sizes meets the
    hand-written list only when the step count divides 1000 (the README's claim)."""
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",
                                                       "weight_dtype": "default"}}}
    cases = [(steps, size) for size in SCHEDULE_SIZES for steps in SCHEDULE_STEPS]
    for i, (steps, (w, h)) in enumerate(cases):
        g[f"{100 + i}"] = {"class_type": "DiTControl_EasyControlScheduler",
                           "inputs": {"steps": steps, "width": w, "height": h, "max_shift": 1.15, "base_shift": 0.5}}
        g[f"{200 + i}"] = {"class_type": "DiTControlProbe_SigmasReport", "inputs": {"sigmas": [f"{100 + i}", 0]}}
        g[f"{300 + i}"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15,
                                                                          "base_shift": 0.5, "width": w, "height": h}}
        g[f"{400 + i}"] = {"class_type": "BasicScheduler", "inputs": {"model": [f"{300 + i}", 0], "scheduler": "simple",
                                                                       "steps": steps, "denoise": 1.0}}
        g[f"{500 + i}"] = {"class_type": "DiTControlProbe_SigmasReport", "inputs": {"sigmas": [f"{400 + i}", 0]}}
    history = comfy.run(g)
    assert execution_error(history) is None, execution_error(history)
    for i, (steps, (w, h)) in enumerate(cases):
        ours = json.loads(history["outputs"][f"{200 + i}"]["text"][0])
        core = json.loads(history["outputs"][f"{500 + i}"]["text"][0])["sigmas"]
        hand = reference_sigmas(steps, w, h)
        assert ours["dtype"] == "torch.float32" and ours["sigmas"] == diffusers_sigmas(steps, w, h), (steps, w, h)
        assert max_diff(ours["sigmas"], hand) <= 1e-7, (steps, w, h)
        core_diff = max_diff(core, hand)
        print(f"{w}x{h}, {steps} steps: EasyControl Scheduler = diffusers; ModelSamplingFlux + simple "
              f"off by {core_diff:.2e}")
        assert (core_diff <= FLOAT32_SIGMA_TOL) if steps in DIVIDES_1000 else (core_diff > 1e-5), (steps, core_diff)
