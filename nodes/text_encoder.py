"""PixArt text conditioning: T5-v1.1 loader, T5 encode (120 tokens + padding mask), learned null caption."""
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
import comfy.ops
import comfy.sd1_clip
import folder_paths

from ..kernels.checkpoint_io import CheckpointError
from ..kernels.checkpoint_io import release_free_heap
from ..kernels.int8 import release_scratch
from ..kernels.t5 import load_t5_encoder_file, t5_stored_dtype
from .comfy_compat import new_model_patcher
from .weight_dtype import WEIGHT_DTYPE_TOOLTIP, WEIGHT_DTYPES, storage_choice
from .pixart_model import CAPTION_MASK_KEY, PixArtDiTModel

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

    def load(self) -> comfy.model_patcher.ModelPatcher:
        """The encoder, (re)loaded from its file if it was released."""
        if self.patcher is None:
            self.patcher, self.description = _load_encoder(self.path, self.weight_dtype, self.compute_dtype)
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


def _load_encoder(path: str, weight_dtype: str, compute: torch.dtype):
    """(ModelPatcher around our T5 encoder, description). Safetensors stream in one tensor at a time,
    converted (cast or int8-quantised) as they arrive, so the float file is never resident whole."""
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    # The encoder runs once per prompt: int8_fast's packing (qlinear) would cost more than it saves
    # (measured on T5-XXL), so both int8 choices take the exact route here.
    dtype, int8_ops, note = storage_choice("int8" if weight_dtype == "int8_fast" else weight_dtype)
    if int8_ops is not None:
        storage, ops = compute, int8_ops      # linear layers int8, embeddings and norms in the compute dtype
    else:
        storage = dtype or t5_stored_dtype(path)
        ops = comfy.ops.disable_weight_init if storage == compute else comfy.ops.manual_cast
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
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip=WEIGHT_DTYPE_TOOLTIP + " 'default' keeps the file's dtype; the math "
                                       "runs in fp32 on the CPU and bf16 on capable GPUs. The encoder "
                                       "runs once per prompt, so int8_fast loads it as int8."),
                io.Boolean.Input("release_after_encode", default=False,
                                 tooltip="Free the encoder's memory as soon as a prompt is encoded, so the "
                                         "DiT and VAE never share memory with it (PixArt-δ's low-memory "
                                         "order). The next changed prompt reloads it from the file; two "
                                         "encode nodes on one loader each load it. Off: ComfyUI keeps it."),
            ],
            outputs=[PixArtT5Type.Output("t5", tooltip="T5 encoder for PixArt T5 Text Encode.")],
        )

    @classmethod
    def execute(cls, t5_name, weight_dtype="default", release_after_encode=False) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("text_encoders", t5_name)
        t5 = PixArtT5(path, weight_dtype, release_after_encode, _tokenizer(),
                      _compute_dtype(mm.text_encoder_device()))
        t5.load()   # now, so that a wrong file fails at this node with the loader's error
        return io.NodeOutput(t5)


class PixArtT5TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_PixArtT5TextEncode",
            display_name="PixArt T5 Text Encode",
            category=CATEGORY,
            description="Encodes a prompt as PixArt-α was trained: T5 tokens padded to 120 with EOS, "
                        "last hidden state, and a padding mask so the DiT attends only to real tokens.",
            inputs=[
                PixArtT5Type.Input("t5", tooltip="From PixArt T5 Loader."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt."),
                io.Int.Input("max_length", default=120, min=1, max=512,
                             tooltip="Caption tokens (PixArt-α: 120). Longer prompts are truncated."),
                io.Boolean.Input("clean_caption", default=True,
                                 tooltip="Lower-case and strip URLs/HTML as PixArt's caption cleaner does."),
            ],
            outputs=[io.Conditioning.Output(tooltip="PixArt conditioning: [1, 120, 4096] + padding mask.")],
        )

    @classmethod
    def execute(cls, t5, text, max_length=120, clean_caption=True) -> io.NodeOutput:
        prompt = clean_caption_text(text) if clean_caption else text
        tokens = t5.tokenizer(prompt, max_length=max_length, padding="max_length", truncation=True,
                              add_special_tokens=True, return_tensors="pt")
        patcher = t5.load()
        mm.load_models_gpu([patcher])
        device = patcher.load_device
        with torch.no_grad():
            hidden = patcher.model(tokens.input_ids.to(device), tokens.attention_mask.to(device),
                                   dtype=t5.compute_dtype)
        out_device = mm.intermediate_device()
        cond = hidden.float().to(out_device)
        del patcher, hidden
        if t5.release_after_encode:
            t5.release()
        mask = tokens.attention_mask.to(out_device)
        return io.NodeOutput([[cond, {CAPTION_MASK_KEY: mask}]])



class PixArtNullCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_PixArtNullCaption",
            display_name="PixArt Null Caption (negative)",
            category=CATEGORY,
            description="The checkpoint's learned null caption (y_embedding), the negative the original "
                        "PixArt-α code uses for classifier-free guidance. As in the original, it is masked "
                        "with the positive prompt's mask. Only original .pth files carry it.",
            inputs=[
                io.Model.Input("model", tooltip="A PixArt MODEL from PixArt-α DiT Loader (.pth file)."),
                io.Conditioning.Input("positive", tooltip="The positive prompt; its padding mask is reused."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Negative conditioning for KSampler.")],
        )

    @classmethod
    def execute(cls, model, positive) -> io.NodeOutput:
        base = model.model
        if not isinstance(base, PixArtDiTModel):
            raise ValueError(f"PixArt Null Caption needs a MODEL from 'PixArt-α DiT Loader'; got "
                             f"{type(base).__name__}")
        embedder = base.diffusion_model.y_embedder
        if not hasattr(embedder, "y_embedding"):
            raise CheckpointError("this checkpoint has no learned null caption (y_embedder.y_embedding): "
                                  "diffusers-layout files drop it. Encode an empty prompt as the negative.")
        null = embedder.y_embedding.detach().float().to(mm.intermediate_device())[None]  # [1, L, C]
        out = []
        for cond, extras in positive:
            mask = extras.get(CAPTION_MASK_KEY)
            if mask is None:
                raise ValueError("PixArt Null Caption needs the positive from 'PixArt T5 Text Encode' "
                                 "(it reuses that prompt's padding mask, as the original does)")
            if null.shape[1] != mask.shape[-1]:
                raise ValueError(f"null caption has {null.shape[1]} tokens but the prompt was encoded to "
                                 f"{mask.shape[-1]}: set max_length to {null.shape[1]}")
            out.append([null.clone(), {k: v for k, v in extras.items() if k in (CAPTION_MASK_KEY, "width", "height")}])
        return io.NodeOutput(out)


NODES = [PixArtT5Loader, PixArtT5TextEncode, PixArtNullCaption]
