"""PixArt-δ LCM sampling for core SamplerCustom / SamplerCustomAdvanced: an LCM SIGMAS scheduler and
an LCM SAMPLER exact to diffusers' LCMScheduler (kernels/pixart/lcm.py has the math and its parity tests).

Plain KSampler users: core ModelSamplingDiscrete(sampling="lcm") + KSampler(sampler "lcm", scheduler
"simple", cfg 1.0) is already right for our MODEL (PixArt's own betas; the tests compare it with our
kernel loop). These nodes add what core lacks: the PixArt repo's timestep rule, the exact diffusers
boundary condition, and independence from the model-sampling patch.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.samplers

from ...kernels.pixart.lcm import lcm_boundary_scalings, lcm_timesteps
from ..comfy_compat import default_noise_sampler, model_trange, sampler_model_sampling

CATEGORY = "DiT Control/PixArt"
RULES = ["diffusers", "pixart_repo"]


def sigmas_at_timesteps(model_sampling, timesteps) -> torch.Tensor:
    """σ of the model's own schedule at the given training timesteps, plus the final 0."""
    sig = [float(model_sampling.sigma(torch.tensor(float(t)))) for t in timesteps]
    return torch.tensor(sig + [0.0], dtype=torch.float32)


def _is_lcm_patched(model_sampling) -> bool:
    """True when core ModelSamplingDiscrete(lcm) already applies the LCM boundary to `denoised`."""
    # the class lives in comfy_extras/nodes_model_advanced.py (a node module): match it by name
    return any(c.__name__ == "LCM" and c.__module__.endswith("nodes_model_advanced")
               for c in type(model_sampling).__mro__)


@torch.no_grad()
def sample_lcm_exact(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Multistep LCM in k-diffusion form (x = x0 + σ·ε), with diffusers' boundary condition:
    denoised = c_out·x0 + c_skip·x_t, where x_t = x / sqrt(1 + σ²) is the DDPM-scale latent.
    Fresh noise between steps from the host's own seeded noise sampler, so this draws exactly what core's
    `lcm` sampler draws on the same host."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, extra_args.get("seed")) if noise_sampler is None else noise_sampler
    model_sampling = sampler_model_sampling(model)
    patched = _is_lcm_patched(model_sampling)
    s_in = x.new_ones([x.shape[0]])
    for i in model_trange(len(sigmas) - 1, disable=disable):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        t = float(model_sampling.timestep(sigma.reshape(1)).reshape(-1)[0])
        c_skip, c_out = lcm_boundary_scalings(t)
        x_t = x / torch.sqrt(1.0 + sigma.to(x.dtype) ** 2)
        if patched:
            # core applied c_skip to x (k-diffusion scale); move it onto x_t as diffusers does
            denoised = denoised - c_skip * (x - x_t)
        else:
            denoised = c_out * denoised + c_skip * x_t   # plain ε model: `denoised` is x0
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = model_sampling.noise_scaling(sigmas[i + 1], noise_sampler(sigma, sigmas[i + 1]), x)
    return x


class LCMScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_LCMScheduler",
            display_name="LCM Scheduler (PixArt-δ)",
            category=CATEGORY,
            description="SIGMAS for LCM sampling: the skipping-step timesteps over 50 original steps "
                        "(diffusers ≥ 0.24 even spacing, or the PixArt repo's stride rule), as σ of the "
                        "model's own noise schedule. Use with LCM Sampler (PixArt-δ) in SamplerCustom.",
            inputs=[
                io.Model.Input("model", tooltip="The PixArt-LCM MODEL (its noise schedule gives the σ values)."),
                io.Int.Input("steps", default=4, min=1, max=50,
                             tooltip="LCM steps; PixArt-δ is made for 2–4 (1–8 work)."),
                io.Combo.Input("rule", options=RULES, default="diffusers",
                               tooltip="diffusers: even spacing, as the published diffusers pipeline "
                                       "(4 steps: 999, 759, 499, 259). pixart_repo: the original repo's "
                                       "stride rule (4 steps: 999, 759, 519, 279)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="σ values at the LCM timesteps, then 0.")],
        )

    @classmethod
    def execute(cls, model, steps, rule="diffusers") -> io.NodeOutput:
        model_sampling = model.get_model_object("model_sampling")
        return io.NodeOutput(sigmas_at_timesteps(model_sampling, lcm_timesteps(steps, rule=rule)))


class LCMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_LCMSampler",
            display_name="LCM Sampler (PixArt-δ)",
            category=CATEGORY,
            description="The multistep Latent Consistency Model sampler exactly as diffusers' LCMScheduler "
                        "runs PixArt-LCM: x0 from ε, c_skip/c_out boundary (timestep scaling 10), fresh "
                        "seeded noise between steps. Works on a plain PixArt MODEL or one patched by core "
                        "ModelSamplingDiscrete(lcm). Keep cfg at 1.0: PixArt-LCM has guidance distilled in.",
            inputs=[],
            outputs=[io.Sampler.Output(tooltip="For SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_lcm_exact))


NODES = [LCMScheduler, LCMSampler]
