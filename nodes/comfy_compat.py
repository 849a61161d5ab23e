"""What differs between the ComfyUI hosts the pack supports (0.3.75 up to v0.33), absorbed in one place.

Core's internals change without deprecation; the nodes call these helpers instead of checking versions
themselves. Each helper says which host does what. The pack is built against v0.33 (what users run);
0.3.75 is the floor (`pyproject.toml`'s `requires-comfyui`).
"""
from __future__ import annotations

import inspect

import comfy.k_diffusion.sampling as kd
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..kernels.checkpoint_io import load_consuming


def core_patcher_class(disable_dynamic: bool = False):
    """The ModelPatcher class core's own loaders build on this host and device.

    v0.33: `comfy.model_patcher.CoreModelPatcher`, which main.py rebinds to `ModelPatcherDynamic`
    (dynamic VRAM through comfy-aimdo) on NVIDIA; that class's constructor hands CPU load devices the
    plain `ModelPatcher`. Read at call time: the rebinding happens after our import. 0.3.75: only
    `ModelPatcher` exists."""
    if disable_dynamic:
        return comfy.model_patcher.ModelPatcher
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def new_model_patcher(model, load_device, offload_device, disable_dynamic: bool = False):
    """A patcher of the class core would build here (see `core_patcher_class`)."""
    return core_patcher_class(disable_dynamic)(model, load_device=load_device, offload_device=offload_device)


def assigns_weights(patcher) -> bool:
    """Whether weights are assigned into the module rather than copied: v0.33's dynamic patcher streams
    the tensors it was given (core loads with `assign=patcher.is_dynamic()`); 0.3.75 has no such patcher."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return bool(is_dynamic()) if callable(is_dynamic) else False


def register_reloader(patcher, loader, args: tuple):
    """Tell core how to make this patcher again from its file: v0.33's `clone(disable_dynamic=True)` and
    multi-GPU deep clones call `cached_patcher_init[0](*args, disable_dynamic=...)`, as for core's
    loaders. 0.3.75 never reads it."""
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (loader, args)
    return patcher


def set_inference_dtype(model_config, dtype, manual_cast_dtype, device):
    """`supported_models_base.BASE.set_inference_dtype`: v0.33 also takes the load device."""
    if "device" in inspect.signature(model_config.set_inference_dtype).parameters:
        model_config.set_inference_dtype(dtype, manual_cast_dtype, device=device)
    else:
        model_config.set_inference_dtype(dtype, manual_cast_dtype)


# k-diffusion's progress range: v0.33 moved it to `comfy.utils.model_trange` (it shows the dynamic-VRAM
# warm-up); 0.3.75 has `k_diffusion.sampling.trange` (tqdm's).
model_trange = getattr(comfy.utils, "model_trange", None) or kd.trange


def storage_dtypes(state_dict: dict, supported_dtypes, weight_dtype=None, stored_dtype=None):
    """(storage dtype, manual-cast compute dtype or None) for these weights on this device, as core's own
    diffusion-model loader picks them. `stored_dtype`: the file's dtype (default: its first tensor's)."""
    params = sum(v.numel() for v in state_dict.values())
    stored = stored_dtype or next(iter(state_dict.values())).dtype
    dtype = weight_dtype or mm.unet_dtype(model_params=params, supported_dtypes=supported_dtypes, weight_dtype=stored)
    return dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(), supported_dtypes)


def build_patcher(model_config, state_dict: dict, weight_dtype=None, custom_operations=None,
                  disable_dynamic: bool = False, stored_dtype=None):
    """A ModelPatcher around `model_config.get_model()`'s kernel, weights from a checked state dict (consumed).

    Built the way core's `load_diffusion_model_state_dict` builds one on the running host: the model, then the
    patcher of the class core picks (v0.33: dynamic VRAM on NVIDIA), then the weights — assigned when the
    patcher streams them, copied otherwise."""
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    unet_dtype, manual_cast = storage_dtypes(state_dict, model_config.supported_inference_dtypes, weight_dtype,
                                             stored_dtype)
    set_inference_dtype(model_config, unet_dtype, manual_cast, device=load_device)
    model_config.custom_operations = custom_operations
    model = model_config.get_model(device=offload_device)
    patcher = new_model_patcher(model, load_device, offload_device, disable_dynamic=disable_dynamic)
    # layer by layer, consuming the caller's dict: after loading only the model holds the weights
    missing, unexpected = load_consuming(model.diffusion_model, state_dict, unet_dtype, assign=assigns_weights(patcher))
    # the kernel loader already checked the layout strictly; this guards the ComfyUI ops wiring
    assert not missing and not unexpected, (missing, unexpected)
    return patcher


def sampler_model_sampling(model):
    """The model_sampling object a k-diffusion sampler function should use, object patches included
    (core ModelSamplingDiscrete patches it). `model` is what KSAMPLER hands a sampler function; v0.33's
    core samplers read it through the guider's patcher, 0.3.75's `inner_model.inner_model`."""
    guider = model.inner_model
    patcher = getattr(guider, "model_patcher", None)
    if patcher is not None:
        return patcher.get_model_object("model_sampling")
    return guider.inner_model.model_sampling


def default_noise_sampler(x, seed):
    """The step noise core's samplers draw on this host (v0.33 seeds CPU generators with seed + 1;
    0.3.75 with seed): we call core's own function so our samplers draw exactly what core's do."""
    return kd.default_noise_sampler(x, seed=seed)
