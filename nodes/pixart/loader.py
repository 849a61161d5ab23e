"""DiT loader node: a PixArt-α checkpoint from ComfyUI's model folders -> MODEL for core samplers."""
from __future__ import annotations

import logging

from comfy_api.latest import io

import comfy.model_management as mm
import folder_paths

from ...kernels.checkpoint_io import PreparedCheckpoint, naming_file, read_json_beside, read_state_dict
from ...kernels.pixart.checkpoint import from_diffusers_config, prepare_pixart, variant_name
from ..comfy_compat import register_reloader
from ..weight_dtype import (
    compute_choice,
    compute_dtype_input,
    storage_choice,
    weight_dtype_input,
)
from .model import build_model_patcher

CATEGORY = "DiT Control/PixArt"

RESOLUTIONS = {"auto": None, "1024 (MS)": 128, "512": 64, "256": 32}


def pixart_state_dict(path: str, resolution: str = "auto") -> PreparedCheckpoint:
    """Read, detect and strictly check a PixArt file: (original-layout state dict, config, layout)."""
    sd = read_state_dict(path)
    # a diffusers transformer folder: heads and trained size are only written in its config.json
    overrides = from_diffusers_config(read_json_beside(path))
    if RESOLUTIONS[resolution] is not None:      # the node's choice beats what the file says
        overrides["sample_size"] = RESOLUTIONS[resolution]
    return prepare_pixart(sd, **overrides)


class PixArtDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_PixArtDiTLoader",
            display_name="PixArt-α DiT Loader",
            category=CATEGORY,
            description="Loads a PixArt-α / PixArt-δ (LCM) transformer with dit-control's own DiT kernel: "
                        "the original .pth, safetensors, or a diffusers transformer file; 1024-MS, 512, 256 "
                        "and LCM weights. The variant is read from the weights. The MODEL works with core "
                        "KSampler and SamplerCustomAdvanced.",
            inputs=[
                io.Combo.Input("dit_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="Transformer weights from models/diffusion_models: PixArt-XL-2-*.pth, "
                                       "or a diffusers transformer/diffusion_pytorch_model.safetensors "
                                       "(its config.json is read from the same folder)."),
                weight_dtype_input(),
                io.Combo.Input("resolution", options=list(RESOLUTIONS), default="auto",
                               tooltip="Trained resolution. 'auto' reads it from the weights (pos_embed of "
                                       ".pth files, config.json of diffusers files, micro-conditions); set "
                                       "it only for a bare diffusers 256 file without its config.json."),
                compute_dtype_input(),
            ],
            outputs=[
                io.Model.Output(tooltip="PixArt-α MODEL: ε-prediction with PixArt's noise schedule and "
                                        "the SD1.5 latent format."),
                io.String.Output("variant", display_name="variant",
                                 tooltip="What the weights were detected as, and the compute dtype when one was "
                                         "chosen (and why)."),
            ],
        )

    @classmethod
    def execute(cls, dit_name, weight_dtype="default", resolution="auto", compute_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", dit_name)
        with naming_file(dit_name):
            patcher, variant = load_dit(path, weight_dtype, resolution, compute_dtype=compute_dtype)
        logging.info("dit-control: loaded %s as %s", dit_name, variant)
        return io.NodeOutput(patcher, variant)


def load_dit(path: str, weight_dtype: str = "default", resolution: str = "auto", disable_dynamic: bool = False,
             compute_dtype: str = "auto"):
    """(MODEL patcher, variant description) for a PixArt file. Registered on the patcher as its
    reloader, as core's loaders do, so core can rebuild it (v0.33's non-dynamic and multi-GPU clones)."""
    compute = compute_choice(compute_dtype, mm.get_torch_device())   # refuses before the file is read
    sd, cfg, layout = pixart_state_dict(path, resolution)
    dtype, operations, note = storage_choice(weight_dtype)
    notes = "; ".join(n for n in (note, compute.note) if n)
    variant = f"{variant_name(cfg)} ({layout} layout)" + (f"; {notes}" if notes else "")
    patcher = build_model_patcher(cfg, sd, weight_dtype=dtype, custom_operations=operations,
                                  disable_dynamic=disable_dynamic, compute_dtype=compute.dtype)
    register_reloader(patcher, _reload_dit, (path, weight_dtype, resolution, compute_dtype))
    return patcher, variant


def _reload_dit(path, weight_dtype, resolution, compute_dtype="auto", disable_dynamic=False):
    return load_dit(path, weight_dtype, resolution, disable_dynamic=disable_dynamic, compute_dtype=compute_dtype)[0]


NODES = [PixArtDiTLoader]
