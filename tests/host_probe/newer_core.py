"""Test-only nodes that put core changes newer than the hosts we have (v0.33, 0.3.75) in front of the pack,
inside the running server: no newer ComfyUI tree can be had here, so each node builds the newer behaviour as
a subclass of the running host's own class and hands the pack's objects to it. Nothing global is changed
for longer than the node's own execution, so the shared test server stays the host it is.

- DiTControlProbe_HintlessControlBase (CONTROL_NET -> CONTROL_NET): the pack's CONTROL_NET rebuilt on a
  ControlBase whose `__init__` does not set `cond_hint` and whose `cleanup()` leaves none behind (the open
  core change that caches prepared hints per size elsewhere). Core's Apply ControlNet copies it, and the
  copies keep the class, so sampling runs the pack's control code on that base.
- DiTControlProbe_FastDiskHost (MODEL, CONTROL_NET -> report): v0.38's extra constructor keyword
  (`fast_disk`) on ModelPatcher and ControlBase, which `clone()` / `copy()` pass on and core's reload of a
  patcher (`cached_patcher_init`) hands to the loader. Reports, as JSON, what the pack's objects do with it:
  a reload with the keyword, a multi-GPU deep clone of the CONTROL_NET, and a CONTROL_NET copy.
- DiTControlProbe_LatentPassthrough (LATENT, nonce -> the same LATENT): a changed nonce makes core run the
  nodes after it again while everything before it (a loaded checkpoint) stays cached: a graph re-run on the
  same loaded model, as a user's second queue of the same workflow after another one.
"""
import json
import traceback

import torch

import comfy.controlnet
import comfy.model_patcher

from .report_node import ReportNode


class HintlessControlBase(comfy.controlnet.ControlBase):
    """ControlBase as the newer core has it: no `cond_hint` attribute after `__init__` or `cleanup()`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__.pop("cond_hint", None)

    def cleanup(self):
        super().cleanup()
        self.__dict__.pop("cond_hint", None)


class HintlessControlBaseNode:
    CATEGORY = "DiT Control tests"
    FUNCTION = "rebuild"
    RETURN_TYPES = ("CONTROL_NET",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net": ("CONTROL_NET",)}}

    def rebuild(self, control_net):
        # MRO: pack class, HintlessControlBase, ControlBase: the pack's super().__init__() reaches the newer base
        newer = type(f"{type(control_net).__name__}OnHintlessCore", (type(control_net), HintlessControlBase), {})
        c = control_net.copy()
        c.__class__ = newer
        c.__dict__.pop("cond_hint", None)
        return (c,)


def fast_disk_patcher_class(base):
    """`base` (the host's patcher class) with v0.38's extra keyword, kept and passed on by clone()."""

    class FastDiskModelPatcher(base):
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False,
                     fast_disk=False):
            super().__init__(model, load_device, offload_device, size, weight_inplace_update)
            self.fast_disk = fast_disk

        def clone(self, *args, **kwargs):
            n = super().clone(*args, **kwargs)
            n.fast_disk = self.fast_disk
            return n

    return FastDiskModelPatcher


class FastDiskControlBase(comfy.controlnet.ControlBase):
    def __init__(self, fast_disk=False):
        super().__init__()
        self.fast_disk = fast_disk


def _attempt(fn):
    """fn()'s value, or the exception it raised as text (the report says which step failed and how)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the report carries it to the test
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}


class FastDiskHostNode(ReportNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "control_net": ("CONTROL_NET",)}}

    def report(self, model, control_net):
        plain = comfy.model_patcher.ModelPatcher
        patcher_cls = fast_disk_patcher_class(plain)
        report = {}

        def reload_with_host_keyword():
            # as v0.38's clone(disable_dynamic=True) calls a reloader, with the host class that takes the keyword
            loader, args = model.cached_patcher_init[0], model.cached_patcher_init[1]
            saved = comfy.model_patcher.ModelPatcher, getattr(comfy.model_patcher, "CoreModelPatcher", None)
            comfy.model_patcher.ModelPatcher = patcher_cls
            if saved[1] is not None:
                comfy.model_patcher.CoreModelPatcher = patcher_cls
            try:
                again = loader(*args, disable_dynamic=True, fast_disk=True)
            finally:
                comfy.model_patcher.ModelPatcher = saved[0]
                if saved[1] is not None:
                    comfy.model_patcher.CoreModelPatcher = saved[1]
            return {"class": type(again).__name__, "fast_disk": getattr(again, "fast_disk", None)}

        if getattr(model, "cached_patcher_init", None) is not None:
            report["reload"] = _attempt(reload_with_host_keyword)

        def multigpu_clone():
            c = control_net.copy()
            c.patcher = patcher_cls(c.net, c.patcher.load_device, c.patcher.offload_device, fast_disk=True)
            clone = c.deepclone_multigpu(torch.device("cpu"))
            again = clone.patcher.clone()
            return {"class": type(clone.patcher).__name__, "fast_disk": getattr(clone.patcher, "fast_disk", None),
                    "own_network": clone.net is not c.net, "clone_fast_disk": getattr(again, "fast_disk", None)}

        report["deepclone_multigpu"] = _attempt(multigpu_clone)

        def control_copy():
            newer = type(f"{type(control_net).__name__}OnFastDiskCore", (type(control_net), FastDiskControlBase), {})
            c = newer(control_net.net, control_net.patcher, control_net.info, control_net.kind, fast_disk=True)
            control_net.copy_to(c)
            copied = c.copy()
            return {"class": type(copied).__name__, "fast_disk": getattr(copied, "fast_disk", None),
                    "strength": copied.strength}

        report["copy"] = _attempt(control_copy)
        return {"ui": {"text": [json.dumps(report)]}}


class LatentPassthrough:
    CATEGORY = "DiT Control tests"
    FUNCTION = "passthrough"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "nonce": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    def passthrough(self, samples, nonce):
        return (samples,)


NODE_CLASS_MAPPINGS = {"DiTControlProbe_HintlessControlBase": HintlessControlBaseNode,
                       "DiTControlProbe_FastDiskHost": FastDiskHostNode,
                       "DiTControlProbe_LatentPassthrough": LatentPassthrough}
