"""EasyControl on core's own FLUX MODEL: the glue between ComfyUI's patch points and kernels/flux_easycontrol.

No copy of core's Flux: the MODEL core's Load Diffusion Model gives is cloned and gets
- a block replace patch for every double / single block (`patches_replace["dit"]`, both hosts), which runs
  the kernel's block function on core's own block module (core's ops: any weight dtype, fp8 included,
  lowvram casting) with the condition tokens riding along;
- a DIFFUSION_MODEL wrapper that begins the condition state of each model call (noise size, batch, dtype,
  the CFG branches of the call as the bank's extra key) and hands it to the block patches through
  `transformer_options`;
- an OUTER_SAMPLE wrapper that clears the KV bank when a sampling run starts and when it ends.
Other patches compose: core LoRA (weight patches on the same modules), FluxGuidance (the guidance the
wrapper reads), ModelSamplingFlux (object patch), reference latents (extra image tokens before ours).

The state (`EasyControlSpec`: conditions + cache switch + bank) sits in the clone's
model_options["transformer_options"]; chaining a second Apply EasyControl makes a new clone with a new
spec holding both conditions. 0.3.75 deep-copies model_options on every clone: the spec shares itself
instead (its conditions never change after the node made it; the bank is per sampling run).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

import comfy.patcher_extension

from ...kernels.checkpoint_io import CheckpointError
from ...kernels.flux_easycontrol import blocks
from ...kernels.flux_easycontrol.condition import KINDS, EasyControl
from ...kernels.vae_posterior import posterior_noise, sample_posterior
from ..finite_guard import check_step_output
from ..input_checks import refuse_over_free_memory

SPEC_KEY = "dit_control_easycontrol"          # model_options["transformer_options"][SPEC_KEY]: the spec
RUN_KEY = "dit_control_easycontrol_run"       # transformer_options of one call: (core Flux, ConditionRun)
WRAPPER_KEY = "dit_control_easycontrol"


@dataclass(eq=False)
class ConditionSource:
    """One Apply EasyControl slot as the node made it: the prepared image [B, S, S, 3] in [0, 1] (kept for
    the joint tall encode when a same-kind condition is chained later), its latent (the posterior mean, model
    space), LoRA, strength, kind; with posterior "sample" also its seed and its rows of the tall encode's raw VAE
    moments [B, 2C, h, w], from which each sampling run draws its latent."""
    pixels: torch.Tensor
    latent: torch.Tensor
    lora: object
    strength: float
    kind: str
    name: str = ""
    posterior: str = "mean"
    seed: int = 0
    moments: Optional[torch.Tensor] = None


@dataclass(eq=False)
class EasyControlSpec:
    sources: list
    cache: bool = True
    latent_format: Any = None           # the MODEL's latent format: a posterior sample is brought into model space
    easycontrol: EasyControl = field(default=None)

    def __post_init__(self):
        from ...kernels.flux_easycontrol.condition import Condition
        self.conditions = [Condition(s.latent, s.lora, s.strength, s.kind) for s in self.sources]
        self.easycontrol = EasyControl(self.conditions, cache=self.cache)

    def __deepcopy__(self, memo):       # 0.3.75's ModelPatcher.clone deep-copies model_options
        return self

    def draw_posterior(self, noise_shape) -> None:
        """Before a sampling run: the latents of the conditions with posterior "sample", drawn as the reference
        pipeline draws them (src/pipeline.py prepare_latents) from one CPU generator seeded with their seed —
        first the noise of the latent being sampled (the same draw as core's noise for that seed), then one draw
        over each kind's tall encode, subjects before spatial conditions. Kinds without a sampled condition are
        drawn too (the reference samples every condition), so the others get the reference's noise."""
        sampled = [s for s in self.sources if s.posterior == "sample"]
        if not sampled:
            return
        seeds = sorted({s.seed for s in sampled})
        if len(seeds) > 1:
            raise ValueError(f"Apply EasyControl: chained conditions with posterior 'sample' draw from one "
                             f"generator, as the reference pipeline does: give them one posterior_seed (found "
                             f"{', '.join(map(str, seeds))})")
        generator = torch.Generator("cpu").manual_seed(seeds[0])
        posterior_noise(noise_shape, generator)                         # the reference's noise latent
        for kind in KINDS:
            group = [i for i, s in enumerate(self.sources) if s.kind == kind]
            if not group:
                continue
            first = self.sources[group[0]]
            rows = [self.sources[i].latent.shape[-2] for i in group]
            dtype = first.moments.dtype if first.moments is not None else torch.float32
            tall = posterior_noise((*first.latent.shape[:-2], sum(rows), first.latent.shape[-1]), generator, dtype)
            for i, noise in zip(group, tall.split(rows, dim=-2)):
                source = self.sources[i]
                if source.posterior == "sample":
                    z = sample_posterior(source.moments, noise)
                    self.conditions[i].latent = self.latent_format.process_in(z.float())


def core_flux(model_patcher):
    """The MODEL's diffusion model if it is core's FLUX.1 (comfy.ldm.flux.model.Flux); else a clear error."""
    import comfy.ldm.flux.model
    dm = model_patcher.get_model_object("diffusion_model")
    if not isinstance(dm, comfy.ldm.flux.model.Flux) or type(dm).__name__ != "Flux":
        what = type(dm).__name__ + (" (a PixArt transformer)" if "pixart" in type(dm).__module__.lower() else "")
        raise CheckpointError(f"Apply EasyControl needs a FLUX.1 MODEL (core's Load Diffusion Model with "
                              f"flux1-dev.safetensors); this MODEL is {what}")
    if getattr(dm.params, "global_modulation", False) or len(getattr(dm, "double_blocks", [])) == 0:
        raise CheckpointError("Apply EasyControl needs FLUX.1 (dev/schnell) blocks; this FLUX variant "
                              "(FLUX.2-style global modulation or no double blocks) is not what the LoRAs were "
                              "trained on")
    for b in dm.double_blocks[:1]:
        blocks.check_flux1_block(b, "double")
    for b in dm.single_blocks[:1]:
        blocks.check_flux1_block(b, "single")
    return dm


def current_spec(model_patcher):
    return model_patcher.model_options.get("transformer_options", {}).get(SPEC_KEY)


# ---------------------------------------------------------------------------------------------
#                                       Block patches
# ---------------------------------------------------------------------------------------------

def _run_of(args):
    opts = args.get("transformer_options") or {}
    return opts.get(RUN_KEY)


def _unsupported(args, flux):
    if isinstance(args["vec"], tuple) or args["vec"].shape[0] != args["img"].shape[0]:
        raise NotImplementedError("EasyControl does not support per-token modulation (reference latents "
                                  "with the 'index_timestep_zero' method) on the same model")


class BlockPatch:
    """Block replace for core's double / single block `index`: our kernel's block function on core's own
    block module when a condition run is active, core's original block otherwise."""

    def __init__(self, kind: str, index: int):
        self.kind, self.index = kind, index

    def __call__(self, args, extra):
        state = _run_of(args)
        if state is None or state[1] is None:
            return extra["original_block"](args)
        flux, run = state
        _unsupported(args, flux)
        common = dict(run=run, index=self.index, attn_mask=args.get("attn_mask"))
        if self.kind == "double":
            img, txt = blocks.double_block(flux.double_blocks[self.index], args["img"], args["txt"], args["vec"],
                                           args["pe"], **common)
            return {"img": img, "txt": txt}
        return {"img": blocks.single_block(flux.single_blocks[self.index], args["img"], args["vec"], args["pe"],
                                           **common)}


# ---------------------------------------------------------------------------------------------
#                                         Wrappers
# ---------------------------------------------------------------------------------------------

def diffusion_model_wrapper(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                            transformer_options={}, **kwargs):  # noqa: B006 -- core's model signature; read, never written
    """Per model call: begin the condition state (fills the bank on a miss) and pass it to the blocks."""
    spec = (transformer_options or {}).get(SPEC_KEY)
    flux = executor.class_obj
    if spec is None or not spec.sources:
        return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
    p = flux.patch_size
    noise_hw = (x.shape[-2] + (-x.shape[-2]) % p, x.shape[-1] + (-x.shape[-1]) % p)
    branch = tuple(transformer_options.get("cond_or_uncond") or ())
    g = guidance if getattr(flux.params, "guidance_embed", False) else None
    with torch.no_grad():
        run = spec.easycontrol.begin(flux, y, g, noise_hw, x.shape[0], x.dtype, extra_key=("cfg", branch),
                                      device=x.device)
    options = dict(transformer_options)
    options[RUN_KEY] = (flux, run)
    out = executor(x, timestep, context, y, guidance, ref_latents, control, options, **kwargs)
    return check_step_output(out, x, context, transformer_options, "EasyControl FLUX")


def outer_sample_wrapper(executor, *args, **kwargs):
    """A sampling run: the bank starts empty and is dropped when the run ends (also on errors/interrupts)."""
    guider = executor.class_obj
    spec = guider.model_options.get("transformer_options", {}).get(SPEC_KEY)
    if spec is None:
        return executor(*args, **kwargs)
    noise = args[0] if args else kwargs["noise"]
    check_run_fits(guider, spec, noise=noise)
    if any(s.posterior == "sample" for s in spec.sources):
        if not torch.is_tensor(noise) or noise.ndim != 4:
            raise ValueError("Apply EasyControl: posterior 'sample' draws after the noise of one image latent "
                             f"[B, C, H, W]; this sampler's noise is {type(noise).__name__}")
        spec.draw_posterior(noise.shape)
    bank = spec.easycontrol.bank
    builds, hits = bank.builds, bank.hits
    try:
        with spec.easycontrol.sampling_run():
            return executor(*args, **kwargs)
    finally:
        logging.info("dit-control: EasyControl sampling run done (cache %s): KV bank built %d, reused %d times; "
                     "dropped", "on" if spec.cache else "off", bank.builds - builds, bank.hits - hits)


# FLUX.1 pipelines encode the prompt to at most 512 T5 tokens (+ none from CLIP-L, which is pooled)
MAX_TEXT_TOKENS = 512


def check_run_fits(guider, spec: EasyControlSpec, noise: torch.Tensor) -> None:
    """Before a sampling run allocates anything: refuse a latent size / condition size whose activations,
    KV bank (cache on) or joint mask (cache off) the device cannot hold, naming both sizes."""
    import comfy.model_management as mm
    if not torch.is_tensor(noise) or noise.ndim != 4:      # not one image latent (v0.33's nested latents)
        return
    model = guider.model_patcher.model
    flux = model.diffusion_model
    p = flux.patch_size
    h, w = noise.shape[-2] + (-noise.shape[-2]) % p, noise.shape[-1] + (-noise.shape[-1]) % p
    branches = 2 if getattr(guider, "cfg", 1.0) != 1.0 else 1
    rows = noise.shape[0] * branches
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    needed = spec.easycontrol.run_bytes(flux.params.hidden_size, len(flux.double_blocks) + len(flux.single_blocks),
                                        (h // p) * (w // p), MAX_TEXT_TOKENS, rows, mm.dtype_size(dtype))
    conditions = ", ".join(f"{s.pixels.shape[2]}×{s.pixels.shape[1]}" for s in spec.sources)
    held = ("the condition K/V bank of every block" if spec.cache
            else "the joint attention mask over every token (cache off)")
    refuse_over_free_memory(
        "Apply EasyControl (sampling)",
        f"a {w * 8}×{h * 8} px image (batch {noise.shape[0]}{', both CFG halves' if branches == 2 else ''}) "
        f"with conditions of {conditions} px", needed, mm.get_torch_device(),
        f"{(h // p) * (w // p):,} image + {sum(c.tokens for c in spec.easycontrol.conditions):,} condition tokens: the "
        f"blocks' activations and {held}",
        "Sample at a smaller size (memory grows with the pixels), use condition_size 512 (EasyControl trains "
        "and infers at 512), fewer chained conditions or a smaller batch; for a large picture, generate at "
        "~1024 px and upscale in a second pass.")


def patch_model(model_patcher, sources: list, cache: bool, latent_format=None):
    """A clone of `model_patcher` running EasyControl with these condition sources."""
    flux = core_flux(model_patcher)
    spec = EasyControlSpec(list(sources), cache=cache, latent_format=latent_format)
    spec.easycontrol.check_fits(flux)
    m = model_patcher.clone()
    m.model_options.setdefault("transformer_options", {})[SPEC_KEY] = spec
    for i in range(len(flux.double_blocks)):
        m.set_model_patch_replace(BlockPatch("double", i), "dit", "double_block", i)
    for i in range(len(flux.single_blocks)):
        m.set_model_patch_replace(BlockPatch("single", i), "dit", "single_block", i)
    W = comfy.patcher_extension.WrappersMP
    m.remove_wrappers_with_key(W.DIFFUSION_MODEL, WRAPPER_KEY)
    m.remove_wrappers_with_key(W.OUTER_SAMPLE, WRAPPER_KEY)
    m.add_wrapper_with_key(W.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    m.add_wrapper_with_key(W.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    return m
