"""DiT4SR nodes (issue 12): real-world super-resolution on SD3.5-medium, sampled by core KSampler.

- DiT4SR Loader: the released diffusers transformer (acceptee/DiT4SR dit4sr_q / dit4sr_f / dit4sr_r1
  `transformer/` folder with its config.json, or a single file) from models/diffusion_models, strict apart from
  the documented dead attn2 tensors -> a MODEL with SD3's flow schedule (shift 3.0) and latent format.
- DiT4SR Conditioning: positive + negative (core's SD3 text encoders) + VAE (SD3's) + LR image + upscale ->
  both conditionings carrying the LR latent and the tile settings, the empty latent of the output size and the
  upscaled input (the colour reference). The reference's preparation: minimum short side, bicubic ×upscale,
  multiple of 8; SD3's latent format `(z − 0.0609)·1.5305` is applied by the MODEL, as core does for its
  concat latents. Bounded end to end: sizes beyond what stays bounded are refused before anything is
  allocated (kernels/dit4sr/sizes.py), and the LR image is VAE-encoded in tiles under the transformer's
  memory budget (kernels/dit4sr/tiled_encode.py; exactly core's encode when it fits one tile).
- DiT4SR Colour Fix: AdaIN (default) or wavelet colour fix of the decoded image against the upscaled input.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils
import folder_paths
import node_helpers

from ...kernels.checkpoint_io import naming_file, read_json_beside, read_state_dict
from ...kernels.dit4sr.checkpoint import prepare_dit4sr, variant_name
from ...kernels.dit4sr.colour_fix import METHODS, colour_fix
from ...kernels.dit4sr.preprocess import PROCESS_SIZE, resize_bicubic, upscale_image
from ...kernels.dit4sr.schedule import SHIFT, flow_match_sigmas
from ...kernels.dit4sr.sizes import SizeLimits, check_output_size
from ...kernels.dit4sr.tiled_encode import ENCODE_OVERLAP_PX, encode_spans, encode_tile_side, tiled_encode
from ...kernels.dit4sr.tiling import TileSettings, tile_and_overlap
from ...kernels.vae_posterior import posterior_noise, sample_posterior
from ..comfy_compat import register_reloader
from ..input_checks import check_finite
from ..vae_posterior import check_posterior, encode_moments, posterior_inputs
from ..weight_dtype import (
    compute_choice,
    compute_dtype_input,
    storage_choice,
    weight_dtype_input,
)
from .model import LR_LATENT_KEY, TILES_KEY, build_model_patcher

CATEGORY = "DiT Control/DiT4SR"

# the reference's prompts (test/test_wllava.py --added_prompt / --negative_prompt): the workflow's defaults
POSITIVE_SUFFIX = ("Cinematic, hyper sharpness, highly detailed, perfect without deformations, camera, hyper "
                   "detailed photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous "
                   "detailing, skin pore detailing.")
NEGATIVE_PROMPT = ("motion blur, noisy, dotted, bokeh, pointed, CG Style, 3D render, unreal engine, blurring, dirty, "
                   "messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, "
                   "lowres, chaotic")
UPSCALES = ("4", "2", "1")
# core's estimate for its KL VAEs (comfy/sd.py memory_used_encode: 1767 bytes per pixel per byte of dtype), in
# float32: used if a VAE object does not offer its own
FALLBACK_ENCODE_BYTES_PER_PIXEL = 1767 * 4
LIMITS = SizeLimits()
_LIMIT_SIDE = math.isqrt(LIMITS.max_output_pixels)


def encode_bytes_per_pixel(vae) -> float:
    """The VAE's own estimate of its encode memory per image pixel (core's `memory_used_encode`)."""
    try:
        return float(vae.memory_used_encode((1, 3, 64, 64), vae.vae_dtype)) / (64 * 64)
    except (AttributeError, TypeError, ValueError, IndexError):
        return float(FALLBACK_ENCODE_BYTES_PER_PIXEL)


def encode_lr_image(vae, up: torch.Tensor, tile_px: int, moments: bool = False) -> torch.Tensor:
    """The upscaled LR image's VAE latent (or with `moments`, the posterior's raw moments [B, 2C, h, w]), tile by
    tile with progress and interrupts (the whole image when it fits one tile: exactly `vae.encode`)."""
    pbar = None

    def on_tile(done, total):
        nonlocal pbar
        mm.throw_exception_if_processing_interrupted()
        if total > 1:
            if pbar is None:
                pbar = comfy.utils.ProgressBar(total)
            pbar.update_absolute(done, total)

    encode = (lambda px: encode_moments(vae, px, "DiT4SR Conditioning")[1]) if moments else vae.encode
    return tiled_encode(up, encode, tile=tile_px, overlap=ENCODE_OVERLAP_PX, on_tile=on_tile)


def sample_lr_latents(moments: torch.Tensor, seed: int) -> tuple:
    """(negative, positive) LR latents drawn from the posterior as the reference pipeline draws them: under CFG
    it encodes the image twice, [negative, positive], and `latent_dist.sample()` draws both halves at once from
    the global generator that `set_seed(seed)` seeded (here a CPU generator seeded with `seed`)."""
    both = torch.cat([moments, moments])
    shape = (both.shape[0], both.shape[1] // 2, *both.shape[2:])
    z = sample_posterior(both, posterior_noise(shape, torch.Generator("cpu").manual_seed(seed), both.dtype))
    return z[:moments.shape[0]], z[moments.shape[0]:]


def load_dit4sr_model(path: str, weight_dtype: str = "default", disable_dynamic: bool = False,
                      compute_dtype: str = "auto"):
    """(MODEL patcher, variant description). Registered on the patcher as its reloader, as core's loaders do."""
    compute = compute_choice(compute_dtype, mm.get_torch_device())   # refuses before the file is read
    sd = read_state_dict(path)
    sd, cfg = prepare_dit4sr(sd, read_json_beside(path))
    dtype, operations, note = storage_choice(weight_dtype)
    stored = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()})
    notes = "; ".join(n for n in (note, compute.note) if n)
    variant = f"{variant_name(cfg)}, stored {'+'.join(stored)}" + (f"; {notes}" if notes else "")
    patcher = build_model_patcher(cfg, sd, weight_dtype=dtype, custom_operations=operations,
                                  disable_dynamic=disable_dynamic, compute_dtype=compute.dtype)
    register_reloader(patcher, _reload, (path, weight_dtype, compute_dtype))
    return patcher, variant


def _reload(path, weight_dtype, compute_dtype="auto", disable_dynamic=False):
    return load_dit4sr_model(path, weight_dtype, disable_dynamic=disable_dynamic, compute_dtype=compute_dtype)[0]


class DiT4SRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_DiT4SRLoader",
            display_name="DiT4SR Loader",
            category=CATEGORY,
            description="Loads a DiT4SR transformer (SD3.5-medium with an LR stream; acceptee/DiT4SR dit4sr_q, "
                        "dit4sr_f or dit4sr_r1) with dit-control's own kernel. Pick the transformer folder's "
                        "diffusion_pytorch_model.safetensors (its config.json is read and checked) or a single "
                        "file. Strict: only the 130 documented dead attn2 tensors may be missing or ignored; an "
                        "SD3/SD3.5 base, FLUX or a damaged file is refused with what it is. The MODEL samples with "
                        "core KSampler / SamplerCustomAdvanced (SD3's flow schedule, shift 3.0).",
            inputs=[
                io.Combo.Input("dit_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="From models/diffusion_models: e.g. dit4sr_q/transformer/"
                                       "diffusion_pytorch_model.safetensors (the folder as downloaded from "
                                       "acceptee/DiT4SR)."),
                weight_dtype_input(),
                compute_dtype_input(),
            ],
            outputs=[
                io.Model.Output(tooltip="DiT4SR MODEL: flow velocity, SD3 latent format, shift 3.0. Its "
                                        "conditioning must come through DiT4SR Conditioning."),
                io.String.Output("variant", display_name="variant", tooltip="What the weights were detected as."),
            ],
        )

    @classmethod
    def execute(cls, dit_name, weight_dtype="default", compute_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", dit_name)
        with naming_file(dit_name):
            patcher, variant = load_dit4sr_model(path, weight_dtype, compute_dtype=compute_dtype)
        logging.info("dit-control: loaded %s as %s", dit_name, variant)
        return io.NodeOutput(patcher, variant)


class DiT4SRConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_DiT4SRConditioning",
            display_name="DiT4SR Conditioning",
            category=CATEGORY,
            description="Prepares the low-resolution image as the DiT4SR reference does (short side at least "
                        "min_short_side / upscale, bicubic ×upscale, cut to a multiple of 8), encodes it with the "
                        "SD3 VAE and adds it to both conditionings; outputs the empty latent of the output size "
                        "and the upscaled input for the colour fix. Tiling happens inside the model: square tiles "
                        "of tile_size latent pixels with Gaussian-weighted overlaps; the LR image is VAE-encoded in "
                        f"tiles too, so memory stays bounded. Results over {LIMITS.max_output_pixels / 1e6:.1f} MP "
                        f"({_LIMIT_SIDE}×{_LIMIT_SIDE} px) and strips more than {LIMITS.max_aspect:g}:1 are refused "
                        "up front, with what to do instead.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="SD3 text conditioning (TripleCLIPLoader + "
                                                          "CLIPTextEncode): a caption of the image, plus the "
                                                          "reference's quality suffix."),
                io.Conditioning.Input("negative", tooltip="SD3 text conditioning of the negative prompt."),
                io.Vae.Input("vae", tooltip="The SD3 / SD3.5 VAE (16 latent channels)."),
                io.Image.Input("image", tooltip="The low-resolution image to upscale."),
                io.Combo.Input("upscale", options=list(UPSCALES), default="4",
                               tooltip="Upscale factor (the model was trained for ×4; ×1 and ×2 restore at "
                                       "a smaller scale)."),
                io.Int.Input("min_short_side", default=PROCESS_SIZE, min=64, max=4096, step=8,
                             tooltip="The reference's process_size: an input whose short side is below "
                                     "min_short_side / upscale is first enlarged to it, so the output's short "
                                     "side is at least this."),
                io.Int.Input("tile_size", default=64, min=8, max=128, step=2,
                             tooltip="Tile side in latent pixels (64 = 512 px, the training crops). Latents "
                                     "larger than one tile are processed in square tiles."),
                io.Int.Input("tile_overlap", default=24, min=0, max=64, step=2,
                             tooltip="Overlap of neighbouring tiles in latent pixels (reference 24, its gradio "
                                     "demo 16). At most half the tile side: a larger value is lowered to half "
                                     "the tile (the log says so, with the value used)."),
                io.Int.Input("tile_batch_mb", default=2048, min=0, max=1 << 20, step=64,
                             tooltip="Activation memory per model call, in MB: as many tiles go through the "
                                     "model at once as fit (at least one). 0: one tile per call. The LR image's "
                                     "VAE encode uses the same budget: tiles as large as the VAE's own memory "
                                     "estimate allows, at least tile_size × 8 px."),
                *posterior_inputs("The reference's seed (sample only): the reference samples the LR latent "
                                  "twice, for the negative then the positive branch, from the generator its "
                                  "set_seed seeded; here a CPU generator seeded with this. Tiled encodes "
                                  "cross-fade the moments (mean and log-variance) before the draw."),
            ],
            outputs=[
                io.Conditioning.Output("positive_out", display_name="positive",
                                       tooltip="The positive conditioning with the LR latent."),
                io.Conditioning.Output("negative_out", display_name="negative",
                                       tooltip="The negative conditioning with the LR latent."),
                io.Latent.Output("latent", display_name="latent", tooltip="Empty latent of the output size."),
                io.Image.Output("upscaled", display_name="upscaled",
                                tooltip="The upscaled input (the control image): the colour fix's reference."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, vae, image, upscale="4", min_short_side=PROCESS_SIZE, tile_size=64,
                tile_overlap=24, tile_batch_mb=2048, posterior="mean", posterior_seed=0) -> io.NodeOutput:
        check_posterior("DiT4SR Conditioning", posterior)
        factor = int(upscale)
        channels = getattr(vae, "latent_channels", None)
        if channels != 16:
            raise ValueError(f"DiT4SR needs the SD3 / SD3.5 VAE (16 latent channels); this VAE has {channels}")
        # from the sizes alone, before anything full-size exists: a refusal costs nothing
        w, h = check_output_size(image.shape[2], image.shape[1], factor, min_short_side, batch=image.shape[0],
                                 limits=LIMITS)
        budget = tile_batch_mb << 20 if tile_batch_mb > 0 else 1
        tiles = TileSettings(tile=tile_size, overlap=tile_overlap, memory_budget=budget)
        _say_clamped_overlap(h // 8, w // 8, tiles)
        encode_tile = encode_tile_side(encode_bytes_per_pixel(vae), budget, floor_px=tile_size * 8)
        rows, cols = encode_spans(h, w, encode_tile)
        logging.info("dit-control: DiT4SR input %dx%d -> %dx%d (x%d), latent %dx%d", image.shape[2], image.shape[1],
                     w, h, factor, w // 8, h // 8)
        logging.info("dit-control: DiT4SR LR image VAE-encoded in %d tile(s) of at most %d px (overlap %d px)",
                     len(rows) * len(cols), encode_tile, ENCODE_OVERLAP_PX)
        start = time.monotonic()
        up = upscale_image(image, factor, min_short_side)
        mm.throw_exception_if_processing_interrupted()
        if posterior == "sample":
            lr_negative, lr_positive = sample_lr_latents(encode_lr_image(vae, up[..., :3], encode_tile, moments=True),
                                                         posterior_seed)
        else:
            lr_negative = lr_positive = encode_lr_image(vae, up[..., :3], encode_tile)
        logging.info("dit-control: DiT4SR LR image prepared and encoded in %.1f s (posterior %s)",
                     time.monotonic() - start, posterior)
        latent = torch.zeros([image.shape[0], 16, h // 8, w // 8], device=mm.intermediate_device())
        return io.NodeOutput(
            node_helpers.conditioning_set_values(positive, {LR_LATENT_KEY: lr_positive, TILES_KEY: tiles}),
            node_helpers.conditioning_set_values(negative, {LR_LATENT_KEY: lr_negative, TILES_KEY: tiles}),
            {"samples": latent}, up)


def _say_clamped_overlap(lat_h: int, lat_w: int, tiles: TileSettings) -> None:
    """Log, once per prompt (this node runs once), when the model will use a smaller overlap than asked: at most
    half the tile side (kernels/dit4sr/tiling.py; the reference loops forever once the overlap reaches it)."""
    sizes = tile_and_overlap(lat_h, lat_w, tiles)
    if sizes is not None and sizes[1] < tiles.overlap:
        logging.warning("dit-control: DiT4SR tile_overlap %d is more than half the tile side (%d latent px for this "
                        "%dx%d latent): using an overlap of %d", tiles.overlap, sizes[0], lat_w, lat_h, sizes[1])


class DiT4SRColourFix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_DiT4SRColourFix",
            display_name="DiT4SR Colour Fix",
            category=CATEGORY,
            description="Matches the colours of the upscaled result to the input, as the DiT4SR reference does "
                        "after decoding: AdaIN (per-channel mean and standard deviation, the default) or wavelet "
                        "(the result's fine detail on the input's low frequencies).",
            inputs=[
                io.Image.Input("image", tooltip="The decoded result."),
                io.Image.Input("reference", tooltip="The upscaled input (DiT4SR Conditioning's 'upscaled'); "
                                                    "resized bicubically to the image's size if it differs."),
                io.Combo.Input("method", options=list(METHODS), default="adain",
                               tooltip="adain: per-channel statistics (reference default). wavelet: keeps the "
                                       "result's high frequencies and the input's low frequencies."),
            ],
            outputs=[io.Image.Output(tooltip="The colour-corrected image.")],
        )

    @classmethod
    def execute(cls, image, reference, method="adain") -> io.NodeOutput:
        if reference.shape[1:3] != image.shape[1:3]:
            reference = resize_bicubic(reference, image.shape[2], image.shape[1])
        if reference.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"DiT4SR Colour Fix: {reference.shape[0]} reference images for {image.shape[0]} results")
        out = colour_fix(image[..., :3].movedim(-1, 1), reference[..., :3].movedim(-1, 1).to(image.device), method)
        return io.NodeOutput(out.movedim(1, -1).to(image.dtype))


class DiT4SRScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_DiT4SRScheduler",
            display_name="DiT4SR Scheduler",
            category=CATEGORY,
            description="The reference's σ list (SD3.5-medium's FlowMatchEulerDiscrete, shift 3.0, as DiT4SR's "
                        "pipeline sets it) bit for bit in float32, for SamplerCustomAdvanced (with core's euler "
                        "sampler). Core's KSampler euler / normal on the DiT4SR MODEL gives the same list within "
                        "two float32 steps (1.2e-7).",
            inputs=[
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Sampling steps (the reference's script: 40; its gradio demo: 20)."),
                io.Float.Input("shift", default=SHIFT, min=0.01, max=100.0, step=0.01,
                               tooltip="The scheduler's shift (SD3.5-medium: 3.0)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 σ in float32, from 1 down to 0.")],
        )

    @classmethod
    def execute(cls, steps, shift=SHIFT) -> io.NodeOutput:
        check_finite("DiT4SR Scheduler", shift=shift)
        return io.NodeOutput(flow_match_sigmas(steps, shift))


NODES = [DiT4SRLoader, DiT4SRConditioning, DiT4SRColourFix, DiT4SRScheduler]
