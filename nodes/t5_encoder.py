"""The T5-v1.1 encoder loader (PIXART_T5), shared by PixArt (nodes/pixart/text_encode.py encodes with it) and
ControlAR (its caption encoder). Named PixArt in the UI because PixArt was its first user; the node_id and the
type string stay so saved workflows keep loading."""
from __future__ import annotations

import gc
import html
import os
import re
import urllib.parse as ul
from dataclasses import dataclass
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd1_clip
import folder_paths

from ..kernels.checkpoint_io import naming_file, release_free_heap
from ..kernels.int8 import release_scratch
from ..kernels.t5 import load_t5_encoder_file, t5_stored_dtype
from .comfy_compat import new_model_patcher
from .weight_dtype import (
    compute_choice,
    compute_dtype_input,
    operations_for,
    storage_choice,
    weight_dtype_input,
)

CATEGORY = "DiT Control/PixArt"
PixArtT5Type = io.Custom("PIXART_T5")

# ComfyUI ships the T5-v1.1 sentencepiece vocabulary (the same 32100-token vocabulary PixArt uses)
T5_TOKENIZER_DIR = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "text_encoders", "t5_tokenizer")


@dataclass
class PixArtT5:
    """What flows on a PIXART_T5 wire: where the encoder comes from, the encoder itself while it is
    loaded (under ComfyUI's memory management), and the tokenizer."""
    path: str
    weight_dtype: str
    release_after_encode: bool
    tokenizer: object
    compute_dtype: torch.dtype
    description: str = ""
    patcher: Optional[comfy.model_patcher.ModelPatcher] = None
    compute_note: str = ""       # why compute_dtype was chosen, when the loader's compute_dtype input chose it

    def load(self) -> comfy.model_patcher.ModelPatcher:
        """The encoder, (re)loaded from its file if it was released."""
        if self.patcher is None:
            self.patcher, self.description = _load_encoder(self.path, self.weight_dtype, self.compute_dtype,
                                                           explicit=bool(self.compute_note))
            if self.compute_note:
                self.description += f" ({self.compute_note})"
        return self.patcher

    def release(self):
        """Drop the encoder's weights (reloaded from the file on the next encode) and hand the memory back:
        model management forgets it, and freed heap goes back to the OS."""
        self.patcher = None
        gc.collect()
        mm.cleanup_models()
        mm.soft_empty_cache()
        release_scratch()
        release_free_heap()


def clean_caption_text(text: str) -> str:
    """The core of PixArt's caption cleaning: URL-unquote, unescape HTML, drop URLs, lower-case,
    collapse white space. (The original also runs ftfy and BeautifulSoup; not reproduced.)"""
    for _ in range(2):  # the original applies its cleaner twice
        text = ul.unquote_plus(str(text))
        text = html.unescape(html.unescape(text)).strip().lower()
        text = re.sub(r"\b((?:https?:|www\.)\S+)", "", text)
        text = re.sub(r"\s+", " ", text).strip()
    return text


def _tokenizer():
    from transformers import T5TokenizerFast  # a ComfyUI dependency, loaded only when encoding
    return T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR)


def _compute_dtype(device):
    if device.type == "cpu":
        return torch.float32  # fp16 math on the CPU is slow and overflows in T5-v1.1
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def _load_encoder(path: str, weight_dtype: str, compute: torch.dtype, explicit: bool = False):
    """(ModelPatcher around our T5 encoder, description). Safetensors stream in one tensor at a time,
    converted (cast or int8-quantised) as they arrive, so the float file is never resident whole.
    `explicit`: the compute dtype was chosen on the node, so a 'default' storage is that dtype too."""
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    # The encoder runs once per prompt: int8_fast's packing (qlinear) would cost more than it saves
    # (measured on T5-XXL), so both int8 choices take the exact route here.
    dtype, int8_ops, note = storage_choice("int8" if weight_dtype == "int8_fast" else weight_dtype)
    if int8_ops is not None:
        storage, ops = compute, int8_ops      # linear layers int8, embeddings and norms in the compute dtype
    else:
        storage = dtype or (compute if explicit else t5_stored_dtype(path))
        ops = operations_for(casts=storage != compute)
    encoder, config = load_t5_encoder_file(path, operations=ops, dtype=storage, device=offload_device)
    patcher = new_model_patcher(encoder, load_device, offload_device)   # the class core's text encoders get
    description = (f"T5 d_model {config.d_model}, {config.num_layers} layers, storage "
                   f"{note or storage}, compute {compute}")
    return patcher, description


class PixArtT5Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_PixArtT5Loader",
            display_name="PixArt T5 Loader",
            category=CATEGORY,
            description="Loads a T5-v1.1 encoder (PixArt uses T5-v1.1-XXL) with dit-control's own T5 "
                        "kernel: a single ComfyUI-style file (t5xxl_fp16.safetensors) or HF shards "
                        "(pick any shard; the index json next to it lists the rest). The size is read "
                        "from the weights.",
            inputs=[
                io.Combo.Input("t5_name", options=folder_paths.get_filename_list("text_encoders"),
                               tooltip="T5 weights from models/text_encoders."),
                weight_dtype_input(" 'default' keeps the file's dtype; the math "
                                   "runs in fp32 on the CPU and bf16 on capable GPUs. The encoder "
                                   "runs once per prompt, so int8_fast loads it as int8."),
                io.Boolean.Input("release_after_encode", default=False,
                                 tooltip="Free the encoder's memory as soon as a prompt is encoded, so the "
                                         "DiT and VAE never share memory with it (PixArt-δ's low-memory "
                                         "order). The next changed prompt reloads it from the file; two "
                                         "encode nodes on one loader each load it. Off: ComfyUI keeps it."),
                compute_dtype_input(" T5-v1.1 is trained in bf16, so bf16 maths suit "
                                    "it (fp16 would overflow)."),
            ],
            outputs=[PixArtT5Type.Output("t5", tooltip="T5 encoder for PixArt T5 Text Encode.")],
        )

    @classmethod
    def execute(cls, t5_name, weight_dtype="default", release_after_encode=False,
                compute_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("text_encoders", t5_name)
        device = mm.text_encoder_device()
        compute = compute_choice(compute_dtype, device)
        t5 = PixArtT5(path, weight_dtype, release_after_encode, _tokenizer(),
                      compute.dtype or _compute_dtype(device), compute_note=compute.note)
        with naming_file(t5_name):
            t5.load()   # now, so that a wrong file fails at this node with the loader's error
        return io.NodeOutput(t5)


NODES = [PixArtT5Loader]
