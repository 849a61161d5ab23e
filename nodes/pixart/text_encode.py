"""PixArt text conditioning: T5 encode (120 tokens + padding mask) and the learned null caption. The T5
loader they take (PIXART_T5) is shared with ControlAR and lives in nodes/t5_encoder.py."""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_management as mm

from ...kernels.checkpoint_io import CheckpointError
from ..t5_encoder import CATEGORY, PixArtT5Type, clean_caption_text
from .model import CAPTION_MASK_KEY, PixArtDiTModel


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
        for _cond, extras in positive:
            mask = extras.get(CAPTION_MASK_KEY)
            if mask is None:
                raise ValueError("PixArt Null Caption needs the positive from 'PixArt T5 Text Encode' "
                                 "(it reuses that prompt's padding mask, as the original does)")
            if null.shape[1] != mask.shape[-1]:
                raise ValueError(f"null caption has {null.shape[1]} tokens but the prompt was encoded to "
                                 f"{mask.shape[-1]}: set max_length to {null.shape[1]}")
            out.append([null.clone(), {k: v for k, v in extras.items() if k in (CAPTION_MASK_KEY, "width", "height")}])
        return io.NodeOutput(out)


NODES = [PixArtT5TextEncode, PixArtNullCaption]
