"""RelaCtrl (relevance-guided control, PixArt-α 1024-MS) through core "Apply ControlNet".

The same CONTROL_NET class and loader helpers as the ControlNet-Transformer (nodes/pixart/controlnet.py), with the
RelaCtrl kind: the kernel's strict file preparation and loading (kernels/pixart/relactrl.py), its base check,
and a branch per step whose TDSM permutations come from a CPU generator seeded by the loader's `seed` and the
sampling step. The step is the index of the current σ in the sampler's σ list
(`transformer_options["sample_sigmas"]`; a σ between two list entries, as a multi-stage sampler evaluates,
counts as the earlier step), so a graph re-run gives the same image, and the cond and uncond halves of a
step — one batch or two — see the same permutations (the reference's CFG batch shares one set).
"""
from __future__ import annotations

import dataclasses
import functools

from comfy_api.latest import io

import folder_paths

from ...kernels.checkpoint_io import naming_file
from ...kernels.pixart.model import PixArtConfig
from ...kernels.pixart.relactrl import check_relactrl_base_compatible, load_relactrl, prepare_relactrl
from ..weight_dtype import compute_dtype_input, weight_dtype_input
from .controlnet import CATEGORY, CONTROL_COMPUTE_NOTE, ControlKind, bundled_base_patcher, load_controlnet

SEED_MAX = 2 ** 64 - 1
STYLE_TAGS = ("gufeng_", "oil_", "paint_", "3d_")


def sampling_step(t, transformer_options) -> int | None:
    """The index of σ = t[0] in the sampler's σ list: the last entry at or above it (None without a list)."""
    sigmas = transformer_options.get("sample_sigmas", None) if transformer_options else None
    if sigmas is None or len(sigmas) == 0:
        return None
    sigma = float(t.flatten()[0])
    at_or_above = (sigmas.detach().float().cpu() >= sigma * (1 - 1e-5)).nonzero().flatten()
    return int(at_or_above[-1]) if len(at_or_above) else 0


def _relactrl_branch(control, hint, t, transformer_options, seed: int = 0):
    """One step's RelaCtrl branch: strength from Apply ControlNet, permutations seeded by (seed, step)."""
    return control.net.branch(hint, strength=control.strength, seed=seed,
                              step=sampling_step(t, transformer_options))


def _relactrl_default_base(info):
    """PixArt-XL-2-1024-MS's shape at the file's width, for the load-time check of a control-only file
    (the real base is checked again when sampling starts)."""
    return PixArtConfig(hidden_size=info.hidden_size, num_heads=max(1, info.hidden_size // 72),
                        sample_size=128, pe_interpolation=2.0, micro_condition=True)


RELACTRL = ControlKind(
    name="RelaCtrl", prepare=prepare_relactrl, load=load_relactrl, check=check_relactrl_base_compatible,
    branch=_relactrl_branch, default_base=_relactrl_default_base,
    loader_hint="'RelaCtrl Loader' with a base (PixArt-XL-2-1024-MS) from 'PixArt-α DiT Loader'")


def relactrl_kind(seed: int) -> ControlKind:
    return dataclasses.replace(RELACTRL, branch=functools.partial(_relactrl_branch, seed=int(seed)))


def _inputs(file_tooltip: str) -> list:
    return [
        io.Combo.Input("relactrl_name", options=folder_paths.get_filename_list("controlnet"),
                       tooltip=file_tooltip),
        weight_dtype_input(),
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                     tooltip="Seed of RelaCtrl's channel and token shuffles (drawn anew at every sampling "
                             "step from this seed and the step index; the reference draws them unseeded). "
                             "The same seed gives the same image; another seed a slightly different one."),
        compute_dtype_input(CONTROL_COMPUTE_NOTE),
    ]


_STYLE_NOTE = ("For the Style weights (relactrl_pixart_canny_1024_style.pth) start the prompt with a style tag: "
               + ", ".join(STYLE_TAGS) + " (the tags of the release's demo prompts).")


class RelaCtrlLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_RelaCtrlLoader",
            display_name="RelaCtrl Loader (PixArt-α 1024)",
            category=CATEGORY,
            description="Loads RelaCtrl's 11 light control blocks (qihoo360/RelaCtrl, Canny or Canny Style) "
                        "for core 'Apply ControlNet' with a PixArt-XL-2-1024-MS MODEL — connect its VAE "
                        "input: the control image (a Canny map) is encoded to a latent. Accepts the full "
                        "file (base_model.* is skipped here) or a control-only file. " + _STYLE_NOTE,
            inputs=_inputs("RelaCtrl weights from models/controlnet (e.g. relactrl_pixart_canny_1024.pth)."),
            outputs=[io.ControlNet.Output(tooltip="For core Apply ControlNet with a PixArt-α 1024-MS MODEL.")],
        )

    @classmethod
    def execute(cls, relactrl_name, weight_dtype="default", seed=0, compute_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("controlnet", relactrl_name)
        with naming_file(relactrl_name):
            # a bundled base is not kept: load it with the checkpoint loader if wanted
            control = load_controlnet(path, weight_dtype, relactrl_kind(seed), compute_dtype).control
        return io.NodeOutput(control)


class RelaCtrlCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_RelaCtrlCheckpointLoader",
            display_name="RelaCtrl Checkpoint Loader (base + control)",
            category=CATEGORY,
            description="Reads a full RelaCtrl file (base_model.* + controlnet.*) once and gives its bundled "
                        "PixArt-α 1024-MS base as the MODEL and its control blocks as the CONTROL_NET — one "
                        "copy of each weight in memory. " + _STYLE_NOTE,
            inputs=_inputs("A full RelaCtrl file from models/controlnet (relactrl_pixart_canny_1024.pth)."),
            outputs=[io.Model.Output(tooltip="The bundled PixArt-α 1024-MS base MODEL."),
                     io.ControlNet.Output(tooltip="For core Apply ControlNet with that MODEL.")],
        )

    @classmethod
    def execute(cls, relactrl_name, weight_dtype="default", seed=0, compute_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("controlnet", relactrl_name)
        kind = relactrl_kind(seed)
        with naming_file(relactrl_name):
            control, base_sd, info = load_controlnet(path, weight_dtype, kind, compute_dtype)
            model = bundled_base_patcher(path, base_sd, info, weight_dtype, kind=kind, compute_dtype=compute_dtype)
        return io.NodeOutput(model, control)


NODES = [RelaCtrlLoader, RelaCtrlCheckpointLoader]
