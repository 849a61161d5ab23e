"""Our PixArt kernel as a ComfyUI MODEL: config class, BaseModel subclass and the diffusion-model adapter.

ComfyUI's own split: the math lives in kernels/pixart/model.py; this module only says how ComfyUI's
samplers call it (noise schedule, latent format, conditioning plumbing), the way
comfy/supported_models.py + comfy/model_base.py do for core models. Core KSampler,
SamplerCustomAdvanced, LoRA-free patches, fp8 storage and low-VRAM offload then work unchanged.
"""
from __future__ import annotations

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.supported_models_base

from ...kernels.pixart.model import (
    CONTROL_VALUES_PER_TOKEN,
    FORWARD_VALUES_PER_TOKEN,
    PixArt,
    PixArtConfig,
    forward_bytes,
)
from ..comfy_compat import build_patcher
from ..comfy_compat import storage_dtypes as compat_storage_dtypes
from ..finite_guard import check_step_output
from ..input_checks import refuse_over_free_memory

# cond-dict key of the caption padding mask ([B, L], 1 = valid), set by our text encode node
CAPTION_MASK_KEY = "pixart_caption_mask"
# key of the control dict our CONTROL_NET returns per step (core UNet ControlNets use input/output lists)
PIXART_CONTROL_KEY = "pixart_control"
# pixels per latent pixel of the SD VAE our MODEL's latent format is
VAE_FACTOR = 8


class ComfyPixArt(PixArt):
    """The kernel with the call signature ComfyUI's BaseModel uses for `diffusion_model`."""

    def __init__(self, pixart_config: PixArtConfig, dtype=None, device=None, operations=None, **_unused):
        super().__init__(pixart_config, operations=operations or torch.nn, dtype=dtype, device=device)
        self.dtype = dtype  # BaseModel.get_dtype reads it

    def forward(self, x, timesteps, context, c_size=None, c_ar=None, caption_mask=None, control=None,
                transformer_options={}, **kwargs):  # noqa: B006 -- core's model signature; read, never written
        control_fn = control_branch_from(control)
        check_latent_fits(self.config, x, control_fn is not None)
        out = super().forward(x, timesteps, context, caption_mask, img_hw=c_size, aspect_ratio=c_ar,
                              control=control_fn)
        eps = out[:, :self.config.in_channels]  # ε; the learned-variance half is unused by samplers
        return check_step_output(eps, x, context, transformer_options, "PixArt DiT")


def check_latent_fits(cfg: PixArtConfig, x: torch.Tensor, control: bool) -> None:
    """Before a step allocates anything: the latent must split into whole patches, and one forward's
    activations (kernels/pixart/model.forward_bytes) must fit in the memory free on its device."""
    p = cfg.patch_size
    batch, _, height, width = x.shape
    if height % p or width % p:
        raise ValueError(f"PixArt DiT: a {width * VAE_FACTOR}×{height * VAE_FACTOR} px image (latent {width}×"
                         f"{height}) does not split into the model's {p}×{p} latent patches: width and height "
                         f"must be multiples of {p * VAE_FACTOR} px")
    tokens = (height // p) * (width // p)
    refuse_over_free_memory(
        "PixArt DiT", f"a {width * VAE_FACTOR}×{height * VAE_FACTOR} px image ({tokens:,} tokens, batch {batch})",
        forward_bytes(cfg, batch, height, width, x.element_size(), control), x.device,
        f"each token carries ~{FORWARD_VALUES_PER_TOKEN + (CONTROL_VALUES_PER_TOKEN if control else 0)} live "
        f"vectors of {cfg.hidden_size} values per batch row{' with the control branch' if control else ''}, "
        f"plus the position table",
        f"PixArt-α is trained at up to 1024 px ({(1024 // VAE_FACTOR // p) ** 2} tokens). Choose a smaller size or "
        f"batch (memory grows with the pixels), or generate at ≤ 2048 px and upscale in a second pass.")


def control_branch_from(control):
    """The ControlNet-Transformer hook: a control dict from core Apply ControlNet carries our branch."""
    if not control:
        return None
    if PIXART_CONTROL_KEY not in control:
        raise ValueError("this ControlNet is not a PixArt ControlNet-Transformer (it returned UNet residuals "
                         f"{sorted(control)}): load PixArt ControlNets with 'PixArt ControlNet-Transformer Loader'")
    return control[PIXART_CONTROL_KEY]


class PixArtDiTModel(comfy.model_base.BaseModel):
    """BaseModel with PixArt's conditioning: caption (+ mask) and the 1024-MS micro-conditions."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.EPS, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=ComfyPixArt)

    def memory_required(self, input_shape, cond_shapes={}):  # noqa: B006 -- core's signature; read, never written
        """The kernel's own estimate of a forward (core's batching of the CFG halves and its weight offloading
        go by this), in the dtype the forward computes in."""
        dtype = self.manual_cast_dtype or self.get_dtype()
        return forward_bytes(self.diffusion_model.config, input_shape[0], input_shape[-2], input_shape[-1],
                             comfy.model_management.dtype_size(dtype))

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get(CAPTION_MASK_KEY, None)
        if mask is not None:
            out["caption_mask"] = comfy.conds.CONDRegular(mask)
        width, height = kwargs.get("width", None), kwargs.get("height", None)
        if width is not None and height is not None:
            # the same conditioning keys core's CLIPTextEncodePixArtAlpha sets
            out["c_size"] = comfy.conds.CONDRegular(torch.FloatTensor([[height, width]]))
            out["c_ar"] = comfy.conds.CONDRegular(torch.FloatTensor([[kwargs.get("aspect_ratio", height / width)]]))
        return out


class PixArtDiTConfig(comfy.supported_models.PixArtAlpha):
    """PixArt-α's noise schedule (betas linear 1e-4..0.02, ComfyUI's 'sqrt_linear') and SD1.5 latents.

    Unlike core's PixArtAlpha, the non-MS 512/256 models keep these settings too (core detects them
    as Sigma and picks the SDXL latent format)."""
    unet_config = {"image_model": "dit_control_pixart"}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.SD15

    def get_model(self, state_dict=None, prefix="", device=None):
        return PixArtDiTModel(self, device=device).eval()


def storage_dtypes(state_dict: dict, weight_dtype=None, compute_dtype=None):
    """(storage dtype, manual-cast compute dtype or None) of PixArt weights (the DiT and ControlNet loaders)."""
    return compat_storage_dtypes(state_dict, PixArtDiTConfig.supported_inference_dtypes, weight_dtype,
                                 compute_dtype=compute_dtype)


def build_model_patcher(kernel_config: PixArtConfig, state_dict: dict, weight_dtype=None,
                        custom_operations=None, disable_dynamic: bool = False,
                        compute_dtype=None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around our kernel, weights from an original-layout `state_dict` (consumed);
    `compute_dtype` None: ComfyUI's pick for the device."""
    return build_patcher(PixArtDiTConfig({"pixart_config": kernel_config}), state_dict, weight_dtype,
                         custom_operations, disable_dynamic, compute_dtype=compute_dtype)

