"""Our DiT4SR kernel as a ComfyUI MODEL: config class, BaseModel subclass and the diffusion-model adapter.

The math lives in kernels/dit4sr/; this module says how ComfyUI's samplers call it, the way
comfy/supported_models.py + comfy/model_base.py do for core's SD3: flow matching (ModelType.FLOW) with SD3's
shift 3.0 and latent format, pooled text as `y`, the text tokens as `c_crossattn`. Core KSampler,
SamplerCustomAdvanced and ModelSamplingSD3 then work unchanged.

The LR latent reaches the model through the conditioning (DiT4SR Conditioning sets it on positive and negative):
the raw VAE latent under LR_LATENT_KEY, brought into model space by the model's own latent format
(`(z − 0.0609)·1.5305`) in `extra_conds`, as core does for its concat latents; the tile settings under
TILES_KEY. The kernel tiles inside the call (kernels/dit4sr/tiling.py).
"""
from __future__ import annotations

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models

from ...kernels.dit4sr.model import DiT4SR, DiT4SRConfig
from ...kernels.dit4sr.tiling import TileSettings
from ..comfy_compat import build_patcher
from ..finite_guard import check_step_output

# conditioning keys set by DiT4SR Conditioning
LR_LATENT_KEY = "dit4sr_lr_latent"      # raw VAE latent of the upscaled LR image [B, 16, H/8, W/8]
TILES_KEY = "dit4sr_tiles"              # a kernels.dit4sr.tiling.TileSettings


class ComfyDiT4SR(DiT4SR):
    """The kernel with the call signature ComfyUI's BaseModel uses for `diffusion_model`."""

    def __init__(self, dit4sr_config: DiT4SRConfig, dtype=None, device=None, operations=None, **_unused):
        super().__init__(dit4sr_config, operations=operations or torch.nn, dtype=dtype, device=device)
        self.dtype = dtype  # BaseModel.get_dtype reads it

    def forward(self, x, timesteps, context=None, y=None, lr_latent=None, dit4sr_tiles=None, control=None,
                transformer_options={}, **kwargs):  # noqa: B006 -- core's model signature; read, never written
        if lr_latent is None:
            raise ValueError("DiT4SR needs the LR image: connect the positive and negative conditioning through "
                             "'DiT4SR Conditioning' (it adds the LR latent both CFG branches need)")
        if y is None or context is None:
            raise ValueError("DiT4SR needs SD3 text conditioning (tokens and pooled output): encode the prompts "
                             "with core's TripleCLIPLoader (or DualCLIPLoader type sd3) + CLIPTextEncode")
        self._check_text(context, y)
        tiles = dit4sr_tiles if isinstance(dit4sr_tiles, TileSettings) else TileSettings()
        out = super().forward(x, timesteps, context, y, lr_latent.to(x), tiles=tiles)
        return check_step_output(out, x, context, transformer_options, "DiT4SR")

    def forward_single(self, *args, **kwargs):
        """One model call (the whole latent, or a batch of tiles): a large output runs many per step, so a
        cancelled prompt stops between tile batches instead of at the end of the step."""
        mm.throw_exception_if_processing_interrupted()
        return super().forward_single(*args, **kwargs)

    def _check_text(self, context, pooled):
        cfg = self.config
        if context.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(f"DiT4SR expects SD3 text conditioning: tokens of width {cfg.joint_attention_dim} "
                             f"(CLIP-L + CLIP-G + T5-XXL) and a pooled vector of {cfg.pooled_projection_dim} "
                             f"(CLIP-L + CLIP-G); found tokens {tuple(context.shape)} and pooled "
                             f"{tuple(pooled.shape)}: use TripleCLIPLoader (or DualCLIPLoader type sd3)")


class DiT4SRModel(comfy.model_base.BaseModel):
    """BaseModel with SD3's conditioning (pooled `y`, tokens) plus the LR latent and the tile settings."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=ComfyDiT4SR)

    def encode_adm(self, **kwargs):
        return kwargs.get("pooled_output", None)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)   # as core SD3: no padding to a common length
        lr = kwargs.get(LR_LATENT_KEY, None)
        if lr is not None:
            noise = kwargs.get("noise", None)
            if noise is not None and lr.shape[-2:] != noise.shape[-2:]:
                raise ValueError(f"DiT4SR: the LR latent is {lr.shape[-1] * 8}×{lr.shape[-2] * 8} px but the "
                                 f"latent being sampled is {noise.shape[-1] * 8}×{noise.shape[-2] * 8} px: sample "
                                 f"the LATENT that DiT4SR Conditioning outputs")
            out["lr_latent"] = comfy.conds.CONDNoiseShape(self.process_latent_in(lr))
        tiles = kwargs.get(TILES_KEY, None)
        if tiles is not None:
            out["dit4sr_tiles"] = comfy.conds.CONDConstant(tiles)
        return out


class DiT4SRConfigComfy(comfy.supported_models.SD3):
    """SD3's flow schedule (shift 3.0, multiplier 1000) and latent format (16 channels, shift 0.0609, scale 1.5305)."""
    unet_config = {"image_model": "dit_control_dit4sr"}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.SD3
    sampling_settings = {"shift": 3.0}
    memory_usage_factor = 3.2          # SD3's 1.6, twice the image tokens (noise + LR)

    def get_model(self, state_dict=None, prefix="", device=None):
        return DiT4SRModel(self, device=device).eval()


def build_model_patcher(kernel_config: DiT4SRConfig, state_dict: dict, weight_dtype=None, custom_operations=None,
                        disable_dynamic: bool = False, compute_dtype=None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around our kernel from a checked state dict (consumed); the release's mixed file (F16
    base, F32 control) counts as its base dtype."""
    return build_patcher(DiT4SRConfigComfy({"dit4sr_config": kernel_config}), state_dict, weight_dtype,
                         custom_operations, disable_dynamic,
                         stored_dtype=state_dict["pos_embed.proj.weight"].dtype, compute_dtype=compute_dtype)
