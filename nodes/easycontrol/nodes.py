"""EasyControl nodes (issue 11): condition LoRAs for core's FLUX.1 MODEL.

- EasyControl LoRA Loader: a file from models/loras, strictly in the released layout (block counts and rank
  read from the weights; FLUX.1-dev's files: 19 double + 38 single blocks, rank 128).
- Apply EasyControl: MODEL + VAE + LoRA + image → a patched MODEL clone (chain two for multi-condition).
Condition images are prepared as the reference pipeline does (Xiaojiu-z/EasyControl src/pipeline.py):
spatial conditions resized to S×S ignoring the aspect (Lanczos); subjects scaled to the long side S,
both sides rounded down to a multiple of 16, centre-padded to S×S with mid-grey; several images of one
kind VAE-encoded together as one tall image.
"""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

import folder_paths

from ...kernels.checkpoint_io import CheckpointError, naming_file, read_state_dict
from ...kernels.flux_easycontrol.condition import split_tall_latent
from ...kernels.flux_easycontrol.condition_image import prepare_condition
from ...kernels.flux_easycontrol.lora import load_lora
from ...kernels.flux_easycontrol.schedule import BASE_SHIFT, MAX_SHIFT, dynamic_shift_sigmas
from ..input_checks import check_finite
from ..vae_posterior import check_posterior, encode_moments, posterior_inputs
from .model import ConditionSource, current_spec, patch_model

CATEGORY = "DiT Control/EasyControl"
KIND_CHOICES = ("auto", "spatial", "subject")

EasyControlLoRAType = io.Custom("EASYCONTROL_LORA")


class EasyControlLoRAFile:
    """A loaded condition LoRA: the module (bf16 as released; cast to the compute dtype per call), its
    file name and the kind its name suggests."""

    def __init__(self, module, name: str):
        self.module = module
        self.name = name

    @property
    def kind_from_name(self) -> str:
        return "subject" if "subject" in os.path.basename(self.name).lower() else "spatial"


def load_easycontrol_lora(path: str, name: str) -> EasyControlLoRAFile:
    import comfy.ops
    sd = read_state_dict(path)
    try:
        module = load_lora(sd, operations=comfy.ops.manual_cast)
    except CheckpointError as e:
        found = str(e).split("; found ", 1)[-1] if "; found " in str(e) else ""
        hint = ("; a plain FLUX LoRA goes into core's LoraLoaderModelOnly instead"
                if "LoRA" in found and "EasyControl" not in found else "")
        raise CheckpointError(f"{name}: {e}{hint}") from None
    return EasyControlLoRAFile(module.eval().requires_grad_(False), name)


class EasyControlLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_EasyControlLoRALoader",
            display_name="EasyControl LoRA Loader",
            category=CATEGORY,
            description="Loads an EasyControl condition LoRA for FLUX.1-dev (canny, depth, hedsketch, pose, seg, "
                        "inpainting, Ghibli or subject) from models/loras. The file is checked strictly against "
                        "the released layout; block counts and rank are read from the weights. A plain FLUX "
                        "LoRA or another model's file is refused with what it is.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="An EasyControl LoRA from models/loras (Xiaojiu-Z/EasyControl "
                                       "models/*.safetensors). "
                                       "Plain FLUX LoRAs go into core's LoraLoaderModelOnly instead."),
            ],
            outputs=[EasyControlLoRAType.Output(display_name="easycontrol_lora",
                                                tooltip="For Apply EasyControl.")],
        )

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = load_easycontrol_lora(path, lora_name)
        logging.info("dit-control: loaded EasyControl LoRA %s (%s)", lora_name, lora.module.config.describe())
        return io.NodeOutput(lora)


# ---------------------------------------------------------------------------------------------
#                                   Condition image preparation
# ---------------------------------------------------------------------------------------------

def encode_tall(vae, latent_format, pixels: list, with_moments: bool = False) -> tuple:
    """Same-kind conditions [B, S, S, 3] each, stacked vertically and VAE-encoded as ONE tall image (the
    reference does so: slight mixing across the seams); -> (one model-space latent per condition (the posterior
    mean), one raw VAE moments tensor per condition or None each when not `with_moments`)."""
    batch = {p.shape[0] for p in pixels}
    if len(batch) != 1:
        raise ValueError(f"EasyControl: chained conditions of one kind need the same number of images, "
                         f"got {sorted(batch)}")
    tall = torch.cat(pixels, dim=1)
    if with_moments:
        z, moments = encode_moments(vae, tall[..., :3], "Apply EasyControl")
        moments = split_tall_latent(moments, len(pixels))
    else:
        z, moments = vae.encode(tall[..., :3]), [None] * len(pixels)
    z = latent_format.process_in(z.float())
    return split_tall_latent(z, len(pixels)), moments


class ApplyEasyControl(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_ApplyEasyControl",
            display_name="Apply EasyControl",
            category=CATEGORY,
            description="Adds an EasyControl condition (canny/depth/pose/... map or a subject photo) to a FLUX.1 "
                        "MODEL from core's Load Diffusion Model. Chain two for multi-condition. Works on a clone "
                        "through core's block patches, so core LoRA, FluxGuidance and ModelSamplingFlux still "
                        "apply; sample with core KSampler or SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1-dev MODEL (core Load Diffusion Model, any weight dtype), "
                                                "or the output of another Apply EasyControl."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors) the condition image is encoded with."),
                EasyControlLoRAType.Input("easycontrol_lora", tooltip="From EasyControl LoRA Loader."),
                io.Image.Input("image", tooltip="The condition image: a control map for spatial LoRAs (canny, depth, "
                                                "...) or a subject photo for the subject LoRA. A batch gives one "
                                                "condition per latent batch element."),
                io.Int.Input("condition_size", default=512, min=64, max=2048, step=16,
                             tooltip="Side S in pixels the condition is prepared at (EasyControl trains and "
                                     "infers at 512). Larger costs more tokens: (S/16)² per condition."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scale of this condition's LoRA (upstream lora_weights; 1 = as trained). "
                                       "At 0 the condition tokens are still attended to."),
                io.Combo.Input("kind", options=list(KIND_CHOICES), default="auto",
                               tooltip="spatial: control maps, resized to S×S; subject: photo scaled and "
                                       "centre-padded. auto: subject if the LoRA's file name says so."),
                io.Boolean.Input("cache", default=True,
                                 tooltip="Compute the condition stream once per sampling run and reuse its K/V "
                                         "at every step (exact, much faster). Off: recompute it every step."),
                *posterior_inputs("The reference pipeline's seed (sample only): the condition is drawn when a "
                                  "sampling run starts, after the noise of the latent being sampled, from one CPU "
                                  "generator, as the reference draws noise then subjects then spatial conditions. "
                                  "Set it to the sampler's seed to reproduce the reference; chained Apply "
                                  "EasyControl nodes that sample share one generator, so one seed."),
            ],
            outputs=[io.Model.Output(tooltip="The FLUX MODEL with this condition (and the ones before it).")],
        )

    @classmethod
    def execute(cls, model, vae, easycontrol_lora, image, condition_size=512, strength=1.0, kind="auto",
                cache=True, posterior="mean", posterior_seed=0) -> io.NodeOutput:
        return io.NodeOutput(apply_easycontrol(model, vae, easycontrol_lora, image, condition_size, strength,
                                               kind, cache, posterior, posterior_seed))


def apply_easycontrol(model, vae, lora: EasyControlLoRAFile, image, condition_size=512, strength=1.0,
                      kind="auto", cache=True, posterior="mean", posterior_seed=0):
    from .model import core_flux
    core_flux(model)                     # clear error for a PixArt/SD MODEL before any VAE work
    check_finite("Apply EasyControl", strength=strength)
    check_posterior("Apply EasyControl", posterior)
    if condition_size % 16:
        raise ValueError(f"condition_size must be a multiple of 16, got {condition_size}")
    kind = lora.kind_from_name if kind == "auto" else kind
    previous = current_spec(model)
    sources = list(previous.sources) if previous is not None else []
    pixels = prepare_condition(image, kind, condition_size)
    same = [s for s in sources if s.kind == kind]
    if same and any(s.pixels.shape[1:] != pixels.shape[1:] for s in same):
        raise ValueError("EasyControl: chained conditions of one kind need the same condition_size")
    latent_format = model.get_model_object("latent_format")
    # a posterior sample needs the moments of every condition encoded with it (one tall image, one draw)
    sampled = posterior == "sample" or any(s.posterior == "sample" for s in same)
    latents, moments = encode_tall(vae, latent_format, [s.pixels for s in same] + [pixels], with_moments=sampled)
    channels = getattr(latent_format, "latent_channels", 16)
    if latents[-1].ndim != 4 or latents[-1].shape[1] != channels:
        raise ValueError(f"Apply EasyControl: this VAE gives latents of shape {tuple(latents[-1].shape)}; FLUX.1 "
                         f"needs its own VAE (ae.safetensors, {channels} latent channels)")
    rebuilt = {id(s): ConditionSource(s.pixels, z, s.lora, s.strength, s.kind, s.name, s.posterior, s.seed, m)
               for s, z, m in zip(same, latents, moments)}
    sources = [rebuilt.get(id(s), s) for s in sources]
    sources.append(ConditionSource(pixels, latents[-1], lora.module, float(strength), kind, lora.name, posterior,
                                   int(posterior_seed), moments[-1]))
    with naming_file(lora.name):
        patched = patch_model(model, sources, cache=cache, latent_format=latent_format)
    logging.info("dit-control: EasyControl conditions: %s (cache %s)", "; ".join(
        f"{s.name} as {s.kind}, {s.pixels.shape[2]}x{s.pixels.shape[1]} px, strength {s.strength:g}"
        + (f", posterior sample (seed {s.seed})" if s.posterior == "sample" else "")
        for s in sources), "on" if cache else "off")
    return patched


class EasyControlScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_EasyControlScheduler",
            display_name="EasyControl Scheduler",
            category=CATEGORY,
            description="The reference's σ list (FLUX.1's FlowMatchEulerDiscrete with dynamic shift, as "
                        "EasyControl's pipeline sets it) for any step count and image size, bit for bit in float32, "
                        "for SamplerCustomAdvanced (with core's euler sampler). Core's ModelSamplingFlux + KSampler "
                        "simple gives the same list only when the step count divides 1000.",
            inputs=[
                io.Int.Input("steps", default=25, min=1, max=10000,
                             tooltip="Sampling steps (the reference's num_inference_steps; it uses 25)."),
                io.Int.Input("width", default=1024, min=16, max=16384, step=16,
                             tooltip="Width in pixels of the image being sampled (the empty latent's)."),
                io.Int.Input("height", default=1024, min=16, max=16384, step=16,
                             tooltip="Height in pixels of the image being sampled (the empty latent's)."),
                io.Float.Input("max_shift", default=MAX_SHIFT, min=0.0, max=100.0, step=0.01,
                               tooltip="μ at 4096 noise tokens (1024² px); FLUX.1-dev's scheduler: 1.15."),
                io.Float.Input("base_shift", default=BASE_SHIFT, min=0.0, max=100.0, step=0.01,
                               tooltip="μ at 256 noise tokens (256² px); FLUX.1-dev's scheduler: 0.5."),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 σ in float32, from 1 down to 0.")],
        )

    @classmethod
    def execute(cls, steps, width, height, max_shift=MAX_SHIFT, base_shift=BASE_SHIFT) -> io.NodeOutput:
        check_finite("EasyControl Scheduler", max_shift=max_shift, base_shift=base_shift)
        return io.NodeOutput(dynamic_shift_sigmas(steps, width, height, max_shift, base_shift))


NODES = [EasyControlLoRALoader, ApplyEasyControl, EasyControlScheduler]
