"""PixArt-δ ControlNet-Transformer in ComfyUI's own ControlNet flow.

The loader gives a CONTROL_NET that core "Apply ControlNet" (with its VAE input) attaches to PixArt
conditioning; ComfyUI's sampler then asks it for control per step (`get_control`), honouring
strength and start/end percent, and our PixArt MODEL runs the copied blocks (kernels/pixart/controlnet.py).

The CONTROL_NET class and the loader helpers are shared by every PixArt control network that plugs into
the DiT's `control=` hook: a network is described by a `ControlKind` (its file preparation, its strict
loader, its base compatibility check and how a step's branch is made). RelaCtrl (nodes/pixart/relactrl.py) is the
second kind.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

from comfy_api.latest import io

import comfy.controlnet
import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import folder_paths

from ...kernels.checkpoint_io import naming_file, read_state_dict
from ...kernels.pixart.controlnet import (
    check_base_compatible,
    combine_controls,
    load_pixart_controlnet,
    prepare_pixart_controlnet,
)
from ...kernels.pixart.model import PixArtConfig
from ..comfy_compat import host_init_args, new_model_patcher, patcher_like, register_reloader
from ..input_checks import check_finite
from ..weight_dtype import (
    compute_choice,
    compute_dtype_input,
    operations_for,
    storage_choice,
    weight_dtype_input,
)
from .model import PIXART_CONTROL_KEY, PixArtDiTModel, build_model_patcher, storage_dtypes

CATEGORY = "DiT Control/PixArt"


def _controlnet_branch(control, hint, t, transformer_options):
    """A ControlNet-Transformer step: the copied blocks at the node's strength."""
    return control.net.branch(hint, strength=control.strength)


def _controlnet_default_base(info):
    """A base config for the compatibility check when the file bundles no base."""
    return PixArtConfig(hidden_size=info.hidden_size, mlp_ratio=info.mlp_ratio,
                        num_heads=max(1, info.hidden_size // 72))


@dataclass(frozen=True)
class ControlKind:
    """What differs between the PixArt control networks sharing `PixArtControlNetControl` and the loader helpers.

    prepare(sd) -> PreparedControlFile (control sd, bundled base sd or None, info); load(control sd, base
    config, operations=, dtype=, info=) -> network; check(info, base config) raises when the network does not
    fit the base; branch(control, hint, t, transformer_options) -> the ControlFn of one step
    (`control.strength` etc.); default_base(info) -> a PixArtConfig to load against when the file bundles no
    base."""
    name: str
    prepare: Callable
    load: Callable
    check: Callable
    branch: Callable
    default_base: Callable
    loader_hint: str          # how to load it with a separate base, for the "no bundled base" error


CONTROLNET_TRANSFORMER = ControlKind(
    name="PixArt ControlNet-Transformer", prepare=prepare_pixart_controlnet, load=load_pixart_controlnet,
    check=check_base_compatible, branch=_controlnet_branch, default_base=_controlnet_default_base,
    loader_hint="'PixArt ControlNet-Transformer Loader' with a base from 'PixArt-α DiT Loader'")


# said on the control loaders' compute_dtype input
CONTROL_COMPUTE_NOTE = (" The control blocks run on the MODEL's activations: give this loader and the MODEL's "
                        "loader the same compute_dtype.")


def check_compute_dtypes(name: str, net, model) -> None:
    """Before the first step: a network whose layers do not cast must get the activation dtype it is stored in."""
    need = getattr(net, "input_dtype", None)
    have = model.manual_cast_dtype or model.get_dtype()
    if need is not None and need != have:
        raise ValueError(f"{name}: the MODEL computes in {str(have).replace('torch.', '')} but this control "
                         f"network was loaded to compute in {str(need).replace('torch.', '')}: set the control "
                         f"loader's compute_dtype to the MODEL loader's (PixArt-α DiT Loader compute_dtype)")


class PixArtControlNetControl(comfy.controlnet.ControlBase):
    """A CONTROL_NET for PixArt: the control image becomes a latent through the VAE (as PixArt-δ did),
    and each sampling step hands our MODEL a control branch instead of UNet residual lists. `kind` says
    which network it is (its compatibility check and how a step's branch is made).

    The control latent is cached in our own `control_latent`, never in core's `cond_hint`: whether
    `ControlBase.__init__` sets that (and what clears it) is core's business (an open core change caches
    hints per size elsewhere). `host_args`: the running host's own ControlBase arguments, passed on by
    `copy()` as core's ControlNet passes its own (see comfy_compat.host_init_args)."""

    def __init__(self, net, patcher, info, kind: ControlKind = CONTROLNET_TRANSFORMER, **host_args):
        super().__init__(**host_args)
        self.net, self.patcher, self.info, self.kind = net, patcher, info, kind
        self.control_latent = None                        # the VAE-encoded control image at the latent's size
        self.latent_format = comfy.latent_formats.SD15()   # the control latent is scaled like the image latent
        self.upscale_algorithm = "bilinear"                # control image is resized + centre-cropped to the latent
        self.model_sampling_current = None

    def pre_run(self, model, percent_to_timestep_function):
        if not isinstance(model, PixArtDiTModel):
            raise ValueError(f"{self.kind.name} applied to a {type(model).__name__} model: it "
                             "works only with a MODEL from 'PixArt-α DiT Loader' (or from the checkpoint "
                             "loader of a full control file)")
        self.kind.check(self.info, model.diffusion_model.config)
        check_compute_dtypes(self.kind.name, self.net, model)
        # core's Apply ControlNet lets a NaN strength or percent through its range check; here it would
        # turn every step's control (or its step range) into NaN
        start, end = getattr(self, "timestep_percent_range", (0.0, 1.0))
        check_finite(f"Apply ControlNet ({self.kind.name})", strength=self.strength, start_percent=start,
                     end_percent=end)
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.model_sampling

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        previous = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
            if prev is not None and PIXART_CONTROL_KEY not in prev:
                raise ValueError("a PixArt ControlNet cannot be chained with a UNet ControlNet "
                                 f"({type(self.previous_controlnet).__name__})")
            previous = prev[PIXART_CONTROL_KEY] if prev else None
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return {PIXART_CONTROL_KEY: previous} if previous is not None else None
        if self.vae is None:
            raise ValueError(f"{self.kind.name} needs the VAE input of 'Apply ControlNet': the control image "
                             "is encoded to a latent, as PixArt-δ does")
        target_hw = (x_noisy.shape[-2] * 8, x_noisy.shape[-1] * 8)
        if self.control_latent is None or tuple(self.control_latent.shape[-2:]) != tuple(x_noisy.shape[-2:]):
            # documented resize: fit the control image to the latent's size (scale + centre crop)
            image = comfy.utils.common_upscale(self.cond_hint_original, target_hw[1], target_hw[0],
                                               self.upscale_algorithm, "center")
            loaded = mm.loaded_models(only_currently_used=True)
            latent = self.vae.encode(image.movedim(1, -1)[..., :3])
            mm.load_models_gpu(loaded)
            self.control_latent = self.latent_format.process_in(latent).to(x_noisy.device)
        hint = self.control_latent
        if hint.shape[0] != x_noisy.shape[0]:
            hint = comfy.controlnet.broadcast_image_to(hint, x_noisy.shape[0], batched_number)
        branch = self.kind.branch(self, hint, t, transformer_options)
        return {PIXART_CONTROL_KEY: combine_controls(previous, branch)}

    def _new(self, net, patcher):
        c = type(self)(net, patcher, self.info, self.kind,
                       **host_init_args(self, super(PixArtControlNetControl, self).__init__))
        self.copy_to(c)
        c.latent_format = self.latent_format
        c.upscale_algorithm = self.upscale_algorithm
        return c

    def copy(self):
        return self._new(self.net, self.patcher)

    def get_models(self):
        return super().get_models() + [self.patcher]

    def deepclone_multigpu(self, load_device, autoregister=False):
        """v0.33's multi-GPU sampling: a copy whose network lives on another device (as core's ControlNet)."""
        net = copy.deepcopy(self.net)
        c = self._new(net, patcher_like(self.patcher, net, load_device, mm.unet_offload_device()))
        if autoregister:
            self.multigpu_clones[load_device] = c
        return c

    def cleanup(self):
        self.model_sampling_current = None
        self.control_latent = None
        super().cleanup()


class LoadedControlNetwork(NamedTuple):
    """A control file's network, ready for a CONTROL_NET, and what else the file held."""
    net: Any                           # the kernel's PixArtControlNet / RelaCtrl, in eval mode
    patcher: Any                       # its ModelPatcher (the class core's ControlNets get)
    base_state_dict: Optional[dict]    # the bundled base, checked; None for a control-only file
    info: Any                          # ControlNetInfo / RelaCtrlInfo


class LoadedControlNet(NamedTuple):
    """What a control loader node hands on: the CONTROL_NET, and the bundled base for a checkpoint loader."""
    control: PixArtControlNetControl
    base_state_dict: Optional[dict]    # the bundled base, checked; None for a control-only file
    info: Any                          # ControlNetInfo / RelaCtrlInfo


def load_control_network(path: str, weight_choice: str = "default", kind: ControlKind = CONTROLNET_TRANSFORMER,
                         compute_dtype: str = "auto") -> LoadedControlNetwork:
    """The network of a file of this kind, its patcher, the bundled base state dict (or None) and the info."""
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    compute = compute_choice(compute_dtype, load_device)     # refuses before the file is read
    prepared = kind.prepare(read_state_dict(path))
    info = prepared.info
    base_cfg = info.base_config or kind.default_base(info)
    choice = storage_choice(weight_choice)
    dtype, cast = storage_dtypes(prepared.control_state_dict, choice.dtype, compute.dtype)
    # an explicit compute dtype builds casting layers: the blocks run on the base's activations, so they then
    # follow whatever the MODEL computes in (bf16 weights in an fp32 MODEL are cast per layer, as core does)
    casts = cast is not None or compute.dtype is not None
    ops = operations_for(casts, choice.int8_ops)
    net = kind.load(prepared.control_state_dict, base_cfg, operations=ops, dtype=dtype, info=info).eval()
    # the activation dtype the blocks need from the MODEL (None: any, they cast): checked in pre_run
    net.input_dtype = None if casts or choice.int8_ops is not None else dtype
    patcher = new_model_patcher(net, load_device, offload_device)   # the class core's ControlNets get
    logging.info("dit-control: %s", info.describe())
    return LoadedControlNetwork(net, patcher, prepared.base_state_dict, info)


def load_controlnet(path: str, weight_choice: str = "default",
                    kind: ControlKind = CONTROLNET_TRANSFORMER, compute_dtype: str = "auto") -> LoadedControlNet:
    """The CONTROL_NET of a control network file, the bundled base state dict (or None) and the info."""
    net, patcher, base_sd, info = load_control_network(path, weight_choice, kind, compute_dtype)
    return LoadedControlNet(PixArtControlNetControl(net, patcher, info, kind), base_sd, info)


class PixArtControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_PixArtControlNetLoader",
            display_name="PixArt ControlNet-Transformer Loader",
            category=CATEGORY,
            description="Loads a PixArt-δ ControlNet-Transformer (13 copied DiT blocks) for core 'Apply "
                        "ControlNet' — connect its VAE input: the control image is encoded to a latent. "
                        "Accepts the released full PixArt-XL-2-1024-ControlNet.pth (only the control "
                        "blocks are kept), a controlnet-only file, or the diffusers adapter.",
            inputs=[
                io.Combo.Input("controlnet_name", options=folder_paths.get_filename_list("controlnet"),
                               tooltip="ControlNet weights from models/controlnet."),
                weight_dtype_input(),
                compute_dtype_input(CONTROL_COMPUTE_NOTE),
            ],
            outputs=[io.ControlNet.Output(tooltip="For core Apply ControlNet with a PixArt MODEL.")],
        )

    @classmethod
    def execute(cls, controlnet_name, weight_dtype="default", compute_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("controlnet", controlnet_name)
        with naming_file(controlnet_name):
            # a bundled base is not kept: load it with the checkpoint loader if wanted
            control = load_controlnet(path, weight_dtype, compute_dtype=compute_dtype).control
        return io.NodeOutput(control)


class PixArtControlNetCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_PixArtControlNetCheckpointLoader",
            display_name="PixArt ControlNet Checkpoint Loader (base + control)",
            category=CATEGORY,
            description="Loads a full PixArt-δ ControlNet file (base_model.* + controlnet.*, as "
                        "PixArt-XL-2-1024-ControlNet.pth is released) once, and gives both its base "
                        "PixArt MODEL and its CONTROL_NET — one copy of each weight in memory.",
            inputs=[
                io.Combo.Input("controlnet_name", options=folder_paths.get_filename_list("controlnet"),
                               tooltip="A full ControlNet file from models/controlnet."),
                weight_dtype_input(),
                compute_dtype_input(CONTROL_COMPUTE_NOTE),
            ],
            outputs=[io.Model.Output(tooltip="The bundled PixArt base MODEL."),
                     io.ControlNet.Output(tooltip="For core Apply ControlNet with that MODEL.")],
        )

    @classmethod
    def execute(cls, controlnet_name, weight_dtype="default", compute_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("controlnet", controlnet_name)
        with naming_file(controlnet_name):
            control, base_sd, info = load_controlnet(path, weight_dtype, compute_dtype=compute_dtype)
            model = bundled_base_patcher(path, base_sd, info, weight_dtype, compute_dtype=compute_dtype)
        return io.NodeOutput(model, control)


def bundled_base_patcher(path, base_sd, info, weight_dtype, disable_dynamic=False,
                         kind: ControlKind = CONTROLNET_TRANSFORMER, compute_dtype: str = "auto"):
    """The MODEL of a full control file's bundled base (its reloader reads the file again). The base
    state dict is consumed: the MODEL holds the only copy of its weights."""
    if base_sd is None:
        raise ValueError(f"{os.path.basename(path)} carries no base model ({info.layout} layout): use "
                         f"{kind.loader_hint}")
    choice = storage_choice(weight_dtype)
    compute = compute_choice(compute_dtype, mm.get_torch_device())
    model = build_model_patcher(info.base_config, base_sd, weight_dtype=choice.dtype,
                                custom_operations=choice.int8_ops, disable_dynamic=disable_dynamic,
                                compute_dtype=compute.dtype)
    return register_reloader(model, _reload_bundled_base, (path, weight_dtype, kind, compute_dtype))


def _reload_bundled_base(path, weight_dtype, kind=CONTROLNET_TRANSFORMER, compute_dtype="auto",
                         disable_dynamic=False):
    prepared = kind.prepare(read_state_dict(path))
    return bundled_base_patcher(path, prepared.base_state_dict, prepared.info, weight_dtype,
                                disable_dynamic=disable_dynamic, kind=kind, compute_dtype=compute_dtype)


NODES = [PixArtControlNetLoader, PixArtControlNetCheckpointLoader]
