"""ControlAR Sampler: caption + control image -> VQ image tokens, one token at a time over a static KV cache.

Progress per token (comfy ProgressBar), an interrupt check after every token, and optionally a preview of
the token rows finished so far every N rows (each preview is a VQ decode of those rows, so 0 = off).
The sampling itself is kernels/controlar/sampling.generate: CFG on logits, temperature, top-k, top-p, one
multinomial draw per token from a generator seeded here, nothing else drawing from it.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ...kernels.controlar.dinov2 import resize_mode
from ...kernels.controlar.pipeline import token_grid as kernel_token_grid
from ...kernels.controlar.sampling import SamplingSettings, generate
from ..finite_guard import NonFiniteStepError
from ..input_checks import check_finite, log_adjusted_once
from .nodes import (
    CATEGORY,
    VQ,
    ControlARConditioning,
    ControlARConditioningType,
    ControlARModel,
    ControlARModelType,
    ImageTokens,
    ImageTokensType,
    VQModelType,
    check_vocab,
)

CONTROL_TYPES = ("canny", "hed", "lineart", "depth", "seg")
MAX_SIDE = 4096
NODE = "ControlAR Sampler"


def preview_size() -> int:
    try:
        from comfy.cli_args import args
        return int(args.preview_size)
    except Exception:
        return 512


def token_grid(model: ControlARModel, width: int, height: int) -> tuple:
    """(rows, cols) of image tokens: the kernel's one size check, naming the node and the model file."""
    try:
        return kernel_token_grid(model.config, height, width, name=f"'{model.name}'")
    except ValueError as exc:
        raise ValueError(f"ControlAR Sampler: {exc}") from None


def control_batch(image: torch.Tensor, width: int, height: int, batch: int) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> [batch, 3, H, W] in [−1, 1], as ControlAR feeds the map
    (2·(x/255 − 0.5); no ImageNet normalisation; grey maps repeated to 3 channels)."""
    if image.ndim != 4:
        raise ValueError(f"control_image: expected an IMAGE [B,H,W,C]; got shape {tuple(image.shape)}")
    if tuple(image.shape[1:3]) != (height, width):
        raise ValueError(f"ControlAR Sampler: the control image is {image.shape[2]}×{image.shape[1]} but the "
                         f"generation size is {width}×{height}; the model reads one control token per image "
                         f"token, so bring the image to {width}×{height} first (Fit Control Image)")
    if image.shape[0] not in (1, batch):
        raise ValueError(f"ControlAR Sampler: {image.shape[0]} control images for batch size {batch} (give 1 "
                         f"or {batch})")
    rgb = image[..., :1].expand(-1, -1, -1, 3) if image.shape[-1] == 1 else image[..., :3]
    rgb = rgb.movedim(-1, 1).float() * 2.0 - 1.0
    return rgb.expand(batch, -1, -1, -1) if rgb.shape[0] == 1 else rgb


def caption_batch(cond: ControlARConditioning, model: ControlARModel, batch: int) -> tuple:
    cap, mask = cond.caption, cond.mask
    cfg = model.config
    if cap.shape[-1] != cfg.caption_dim:
        raise ValueError(f"ControlAR Sampler: the caption is {cap.shape[-1]} wide but '{model.name}' takes "
                         f"{cfg.caption_dim}-wide FLAN-T5 rows (FLAN-T5-XL: 2048; T5-XXL gives 4096): encode "
                         f"with FLAN-T5-XL")
    if cap.shape[1] != cfg.cls_token_num:
        raise ValueError(f"ControlAR Sampler: the caption has {cap.shape[1]} rows, the model was trained with "
                         f"{cfg.cls_token_num}")
    if cap.shape[0] not in (1, batch):
        raise ValueError(f"ControlAR Sampler: {cap.shape[0]} captions for batch size {batch}")
    if cap.shape[0] == 1:
        cap, mask = cap.expand(batch, -1, -1), mask.expand(batch, -1)
    return cap, mask


def log_sampling_adjustments(cfg: float, temperature: float, top_k: int, vocab_size: int) -> None:
    """The values kernels/controlar/sampling.py reads differently from what was typed, said once each."""
    if cfg < 1:
        log_adjusted_once(NODE, "cfg", cfg, "no CFG", "as the reference, CFG runs only for cfg > 1")
    if temperature < 1e-5:
        log_adjusted_once(NODE, "temperature", temperature, 1e-5, "the logits are divided by it; nearly greedy")
    if top_k > vocab_size:
        log_adjusted_once(NODE, "top_k", top_k, vocab_size, f"the vocabulary has {vocab_size} tokens: all kept")


class TokenProgress:
    """The per-token callback: interrupt check, progress, previews of the finished rows."""

    def __init__(self, n: int, cols: int, preview_rows: int, vq: Optional[VQ]):
        self.n, self.cols = n, cols
        self.every = preview_rows * cols if (preview_rows > 0 and vq is not None) else 0
        self.vq = vq
        self.bar = comfy.utils.ProgressBar(n)
        self.previews = 0
        self.done = 0

    def __call__(self, j: int, n: int, tokens: torch.Tensor):
        self.done = done = j + 1
        mm.throw_exception_if_processing_interrupted()
        preview = None
        if self.every and done % self.every == 0 and done < n:
            preview = self.preview(tokens[:1], done // self.cols)
        self.bar.update_absolute(done, n, preview)

    def preview(self, tokens: torch.Tensor, rows: int):
        from PIL import Image
        image = self.vq.decode(tokens[:, :rows * self.cols], rows, self.cols)[0]
        self.previews += 1
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return ("JPEG", Image.fromarray(pixels), preview_size())


class ControlARSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_ControlARSampler",
            display_name="ControlAR Sampler",
            category=CATEGORY,
            description="Generates VQ image tokens one by one (raster order, KV cache), steered by the control "
                        "map: DINOv2 turns it into one control token per image token, added inside the GPT. "
                        "CFG runs on the logits against the model's own null caption. Decode the tokens with "
                        "VQ Decode. Without a control image (or with strength 0) it is plain LlamaGen T2I.",
            inputs=[
                ControlARModelType.Input("controlar_model", tooltip="From ControlAR Loader."),
                ControlARConditioningType.Input("conditioning", tooltip="From ControlAR Text Encode."),
                io.Combo.Input("control_type", options=list(CONTROL_TYPES), default="canny",
                               tooltip="What the control map is. It picks the resize to DINOv2's 14-px grid as "
                                       "ControlAR does: nearest for canny and seg, bicubic for the others "
                                       "(edge_base models: pick hed or lineart)."),
                io.Int.Input("width", default=512, min=16, max=MAX_SIDE, step=16,
                             tooltip="Image width (multiple of 16). width/16 · height/16 must stay within the "
                                     "model's token budget: 1024 (512×512) or 2304 for *_MR models."),
                io.Int.Input("height", default=512, min=16, max=MAX_SIDE, step=16,
                             tooltip="Image height (multiple of 16); see width."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance on the logits (ControlAR: 4; LlamaGen T2I: "
                                       "7.5). 1 or less turns CFG off (half the work)."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=5.0, step=0.01,
                               tooltip="Divides the logits after CFG (0 behaves as 1e-5: nearly greedy)."),
                io.Int.Input("top_k", default=2000, min=0, max=1 << 20,
                             tooltip="Keep the k most likely tokens (0 = all). ControlAR: 2000."),
                io.Float.Input("top_p", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Nucleus sampling: keep the smallest set of tokens whose probability "
                                       "reaches p (1 = off)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Control strength: scales the control tokens (ControlAR: 1; its "
                                       "*_base models are shown at 0.6). 0 = no control."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seeds the generator of the one multinomial draw per token."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per run."),
                io.Int.Input("preview_every_rows", default=0, min=0, max=256,
                             tooltip="Show the rows generated so far every N token rows (16·N px), decoded "
                                     "with the VQ model. Each preview is a VQ decode, so 0 = off."),
                io.Image.Input("control_image", optional=True, lazy=True,
                               tooltip="The control map at width×height (Canny Edge / HED Soft Edge / a depth "
                                       "or seg map), white-on-black edges as ControlAR's maps are."),
                VQModelType.Input("vq_model", optional=True,
                                  tooltip="From VQ-16 Loader: only for the previews."),
            ],
            outputs=[ImageTokensType.Output("image_tokens", tooltip="For VQ Decode.")],
        )

    @classmethod
    def check_lazy_status(cls, controlar_model: ControlARModel, width=512, height=512, **inputs) -> list:
        """The size is checked against the model's token budget before the control map is made: a map at a
        size the model cannot sample (Fit Control Image, HED at that size) is never computed."""
        token_grid(controlar_model, width, height)
        # a connected control_image not computed yet arrives as None; an unconnected one does not arrive
        return ["control_image"] if "control_image" in inputs and inputs["control_image"] is None else []

    @classmethod
    def execute(cls, controlar_model: ControlARModel, conditioning: ControlARConditioning, control_type="canny",
                width=512, height=512, cfg=4.0, temperature=1.0, top_k=2000, top_p=1.0, strength=1.0, seed=0,
                batch_size=1, preview_every_rows=0, control_image=None, vq_model=None) -> io.NodeOutput:
        model = controlar_model
        check_finite(NODE, cfg=cfg, temperature=temperature, top_p=top_p, strength=strength)
        rows, cols = token_grid(model, width, height)
        log_sampling_adjustments(cfg, temperature, top_k, model.config.vocab_size)
        if control_image is not None and not model.has_control:
            raise ValueError(f"ControlAR Sampler: '{model.name}' is a LlamaGen base without a control encoder; "
                             f"disconnect control_image or load a ControlAR file")
        if vq_model is not None and preview_every_rows > 0:
            check_vocab(vq_model, model.config.vocab_size)
        caption, mask = caption_batch(conditioning, model, batch_size)
        control = control_batch(control_image, width, height, batch_size) if control_image is not None else None
        settings = SamplingSettings(cfg_scale=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                                    control_strength=strength)
        patchers = [model.patcher] + ([vq_model.patcher] if vq_model is not None and preview_every_rows > 0 else [])
        mm.load_models_gpu(patchers)
        gpt = model.patcher.model
        device = model.patcher.load_device
        n = rows * cols
        progress = TokenProgress(n, cols, preview_every_rows, vq_model)
        generator = torch.Generator(device=device).manual_seed(seed)
        logging.info("dit-control: ControlAR Sampler: %d image tokens (%d×%d) × batch %d on %s", n, cols, rows,
                     batch_size, device)
        try:
            with torch.no_grad():
                features = None
                if control is not None:
                    features = gpt.control_tokens(gpt.adapter_features(control.to(device), resize_mode(control_type)))
                mm.throw_exception_if_processing_interrupted()
                tokens = generate(gpt, gpt.embed_prefix(caption.to(device)), n, settings, generator,
                                  mask.to(device), features, callback=progress)
        except mm.InterruptProcessingException:
            logging.info("dit-control: ControlAR Sampler interrupted after image token %d of %d", progress.done, n)
            raise
        except RuntimeError as e:
            if "probability tensor contains" not in str(e):
                raise
            raise NonFiniteStepError(
                f"ControlAR Sampler: the GPT's logits turned NaN/Inf at image token {progress.done + 1} of {n}, so "
                f"no token can be drawn. Likely cause: damaged or overflowing weights in '{model.name}' (values so "
                f"large the maths overflows), or a narrow weight_dtype overflowing; try weight_dtype fp32 and "
                f"check the file's source") from None
        if progress.every:
            logging.info("dit-control: ControlAR Sampler: %d row previews", progress.previews)
        return io.NodeOutput(ImageTokens(tokens.cpu(), rows, cols, model.config.vocab_size))


NODES = [ControlARSampler]
