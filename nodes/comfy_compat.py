"""What differs between the ComfyUI hosts the pack supports (0.3.75 up to v0.33), absorbed in one place.

Core's internals change without deprecation; the nodes call these helpers instead of checking versions
themselves. Each helper says which host does what. The pack is built against v0.33 (what users run);
0.3.75 is the floor (`pyproject.toml`'s `requires-comfyui`).
"""
from __future__ import annotations

import contextvars
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


# The constructor arguments every host's ModelPatcher takes; anything else a host adds (v0.38: `fast_disk`) is
# the host's own and is forwarded where a host hands it to us (`register_reloader`, `patcher_like`).
_BASE_PATCHER_ARGS = ("self", "model", "load_device", "offload_device", "size")
# host arguments of the reload core is running (v0.38's clone hands its `fast_disk` to the reloader)
_RELOAD_HOST_ARGS: contextvars.ContextVar = contextvars.ContextVar("dit_control_reload_host_args", default=None)


def accepted_kwargs(callables, kwargs: dict) -> dict:
    """The keyword arguments every one of `callables` (a class's `__new__` and `__init__`, say) accepts by
    name or through `**kwargs`: a host's optional arguments pass where its signature has them and are left
    out on a host that lacks them (0.3.75 has no `fast_disk`)."""
    out = dict(kwargs)
    for fn in callables:
        params = inspect.signature(fn).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            continue
        names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}
        out = {k: v for k, v in out.items() if k in names}
    return out


def _constructors(cls) -> list:
    """The functions a call of `cls(...)` runs with its arguments: `__init__`, and `__new__` where the class
    overrides it (v0.33's ModelPatcherDynamic reroutes CPU devices there)."""
    fns = [cls.__init__]
    if cls.__new__ is not object.__new__:
        fns.append(cls.__new__)
    return fns


def new_model_patcher(model, load_device, offload_device, disable_dynamic: bool = False, **host_args):
    """A patcher of the class core would build here (see `core_patcher_class`). `host_args`, and those of a
    reload core is running (`register_reloader`), go to the constructor where its signature has them."""
    cls = core_patcher_class(disable_dynamic)
    kwargs = accepted_kwargs(_constructors(cls), {**(_RELOAD_HOST_ARGS.get() or {}), **host_args})
    return cls(model, load_device=load_device, offload_device=offload_device, **kwargs)


def host_init_args(obj, init) -> dict:
    """What `obj` was constructed with, for the host constructor `init` (a bound `__init__`): each named
    parameter `obj` carries as an attribute of the same name (core stores them so: ModelPatcher's
    `weight_inplace_update`, v0.38's `fast_disk`). A copy made with these is built as core's `clone()` and
    ControlNet `copy()` build theirs, whichever arguments the running host's signature has."""
    params = inspect.signature(init).parameters.values()
    return {p.name: getattr(obj, p.name) for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and p.name not in _BASE_PATCHER_ARGS and hasattr(obj, p.name)}


def patcher_like(template, model, load_device, offload_device):
    """A patcher for `model` of `template`'s class with `template`'s host arguments (as core's `clone()`
    passes them on), on other devices: a deep copy's patcher (multi-GPU clones)."""
    cls = type(template)
    return cls(model, load_device=load_device, offload_device=offload_device,
               **accepted_kwargs(_constructors(cls), host_init_args(template, template.__init__)))


def assigns_weights(patcher) -> bool:
    """Whether weights are assigned into the module rather than copied: v0.33's dynamic patcher streams
    the tensors it was given (core loads with `assign=patcher.is_dynamic()`); 0.3.75 has no such patcher."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return bool(is_dynamic()) if callable(is_dynamic) else False


class HostArgsReloader:
    """A reloader as core calls it: `(*args, disable_dynamic=..., **host arguments)`. Core passes its own
    patcher arguments on to a reload (v0.38's clone adds `fast_disk`); our loaders take `disable_dynamic`
    only, so the rest reaches the patcher constructor through `new_model_patcher` (where the host's class
    accepts it) instead of failing the loader's call."""

    def __init__(self, loader):
        self.loader = loader

    def __call__(self, *args, disable_dynamic: bool = False, **host_args):
        token = _RELOAD_HOST_ARGS.set(host_args)
        try:
            return self.loader(*args, disable_dynamic=disable_dynamic)
        finally:
            _RELOAD_HOST_ARGS.reset(token)


def register_reloader(patcher, loader, args: tuple):
    """Tell core how to make this patcher again from its file: v0.33's `clone(disable_dynamic=True)` and
    multi-GPU deep clones call `cached_patcher_init[0](*args, disable_dynamic=...)`, as for core's
    loaders (newer hosts add their own keywords: see `HostArgsReloader`). 0.3.75 never reads it."""
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (HostArgsReloader(loader), args)
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


def storage_dtypes(state_dict: dict, supported_dtypes, weight_dtype=None, stored_dtype=None, compute_dtype=None):
    """(storage dtype, manual-cast compute dtype or None) for these weights on this device, as core's own
    diffusion-model loader picks them. `stored_dtype`: the file's dtype (default: its first tensor's).
    `compute_dtype`: a loader's explicit compute dtype (its `compute_dtype` input); None keeps core's pick."""
    if compute_dtype is not None:
        storage = weight_dtype or compute_dtype
        return storage, (None if storage == compute_dtype else compute_dtype)
    params = sum(v.numel() for v in state_dict.values())
    stored = stored_dtype or next(iter(state_dict.values())).dtype
    dtype = weight_dtype or mm.unet_dtype(model_params=params, supported_dtypes=supported_dtypes, weight_dtype=stored)
    return dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(), supported_dtypes)


def build_patcher(model_config, state_dict: dict, weight_dtype=None, custom_operations=None,
                  disable_dynamic: bool = False, stored_dtype=None, compute_dtype=None):
    """A ModelPatcher around `model_config.get_model()`'s kernel, weights from a checked state dict (consumed).

    Built the way core's `load_diffusion_model_state_dict` builds one on the running host: the model, then the
    patcher of the class core picks (v0.33: dynamic VRAM on NVIDIA), then the weights — assigned when the
    patcher streams them, copied otherwise."""
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    unet_dtype, manual_cast = storage_dtypes(state_dict, model_config.supported_inference_dtypes, weight_dtype,
                                             stored_dtype, compute_dtype)
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
