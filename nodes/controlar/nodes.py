"""ControlAR nodes (issue 13): LlamaGen's autoregressive image GPT steered by a control image, token by token.

ComfyUI has no autoregressive image model type, so ControlAR flows on wires of its own:
- CONTROLAR_MODEL: the GPT (+ DINOv2 control encoder) from ControlAR Loader, under ComfyUI's memory management;
- VQ_MODEL: the VQ-16 image tokenizer (VQ-16 Loader), which turns tokens into pixels;
- CONTROLAR_CONDITIONING: FLAN-T5-XL caption rows, left-padded with zeroed pads (ControlAR Text Encode);
- IMAGE_TOKENS: sampled VQ token grids (ControlAR Sampler, nodes/controlar/sampler.py) for VQ Decode -> IMAGE.
Files come from models/controlar (ControlAR weights, LlamaGen's VQ-16 and T2I base) and models/text_encoders
(FLAN-T5-XL, loaded by the pack's T5 loader). The math is kernels/controlar/; these nodes only move data.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.ops
import comfy.utils
import folder_paths

from ...kernels.checkpoint_io import CheckpointError, assign_load, naming_file, read_state_dict
from ...kernels.controlar import dinov2
from ...kernels.controlar.checkpoint import WHAT_GPT, prepare_gpt, prepare_vq
from ...kernels.controlar.gpt import GPT, KNOWN_HEADS, GPTConfig
from ...kernels.controlar.text import MAX_LENGTH, encode_caption
from ...kernels.controlar.vq import VQModel, to_unit_range
from ...kernels.int8 import fast_route, select_route
from ...kernels.int8 import int8_ops as int8_ops_for
from ..comfy_compat import new_model_patcher
from ..t5_encoder import PixArtT5Type, clean_caption_text
from ..weight_dtype import (
    compute_choice,
    compute_dtype_input,
    operations_for,
    storage_choice,
    weight_dtype_input,
)

CATEGORY = "DiT Control/ControlAR"
CONTROLAR_FOLDER = "controlar"
HEAD_DIM = 64   # every released LlamaGen size but 3B, and every DINOv2 size: the fallback for other sizes

ControlARModelType = io.Custom("CONTROLAR_MODEL")
VQModelType = io.Custom("VQ_MODEL")
ControlARConditioningType = io.Custom("CONTROLAR_CONDITIONING")
ImageTokensType = io.Custom("IMAGE_TOKENS")


def register_controlar_folder() -> None:
    """models/controlar as a model folder (.safetensors, .pt, …); an extra_model_paths.yaml entry
    `controlar: ...` (loaded before custom nodes, with no extensions) keeps its paths and gets them."""
    default = os.path.join(folder_paths.models_dir, CONTROLAR_FOLDER)
    if CONTROLAR_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CONTROLAR_FOLDER] = ([default], set(folder_paths.supported_pt_extensions))
        return
    paths, extensions = folder_paths.folder_names_and_paths[CONTROLAR_FOLDER]
    if not extensions:
        folder_paths.folder_names_and_paths[CONTROLAR_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))
    if default not in paths:
        folder_paths.add_model_folder_path(CONTROLAR_FOLDER, default, is_default=True)


register_controlar_folder()


def controlar_files() -> list:
    return folder_paths.get_filename_list(CONTROLAR_FOLDER)


def auto_compute_dtype(device) -> torch.dtype:
    """compute_dtype 'auto': fp32 on the CPU (bf16 maths there are the explicit 'bf16' choice, offered where they
    are native); bf16 on GPUs that run it well (the reference samples in bf16), else fp32 (LlamaGen's activations
    are not checked for fp16 range)."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


# ---------------------------------------------------------------------------------------------
#                                       Wires
# ---------------------------------------------------------------------------------------------

@dataclass
class ControlARModel:
    """A CONTROLAR_MODEL: the GPT under a ModelPatcher, its config and what it was loaded as."""
    patcher: object
    config: GPTConfig
    name: str
    description: str
    compute_dtype: torch.dtype

    @property
    def has_control(self) -> bool:
        return self.config.control is not None


@dataclass
class VQ:
    """A VQ_MODEL: the VQ-16 tokenizer under a ModelPatcher."""
    patcher: object
    name: str
    description: str
    compute_dtype: torch.dtype = torch.float32

    @property
    def codebook_size(self) -> int:
        return self.patcher.model.cfg.codebook_size

    @property
    def downsample(self) -> int:
        return self.patcher.model.cfg.downsample

    def decode(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """tokens [B, rows·cols] -> image [B, H, W, 3] in [0, 1] on the intermediate device (loads the VQ)."""
        mm.load_models_gpu([self.patcher])
        model = self.patcher.model
        with torch.no_grad():
            out = model.decode_code(tokens.to(self.patcher.load_device), rows, cols, dtype=self.compute_dtype)
        return to_unit_range(out.float()).movedim(1, -1).contiguous().to(mm.intermediate_device())


@dataclass
class ControlARConditioning:
    """A CONTROLAR_CONDITIONING: caption rows [B, T, C] left-padded with zero pads, mask [B, T] (1 = token)."""
    caption: torch.Tensor
    mask: torch.Tensor
    text: str = ""


@dataclass
class ImageTokens:
    """IMAGE_TOKENS: VQ token ids [B, rows·cols] in raster order (one token per 16×16 px)."""
    tokens: torch.Tensor
    rows: int
    cols: int
    vocab_size: int


# ---------------------------------------------------------------------------------------------
#                                       Loaders
# ---------------------------------------------------------------------------------------------

def head_overrides(sd) -> tuple:
    """(GPT overrides, note): head counts are not in the weights; sizes outside LlamaGen's and DINOv2's
    tables (test models) get 64-wide heads, as every released size but GPT-3B has."""
    overrides, notes = {}, []
    emb = sd.get("tok_embeddings.weight")
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.split(".")[1].isdigit()}
    if emb is not None and emb.ndim == 2 and layers:
        dim, n_layer = emb.shape[1], max(layers) + 1
        if (dim, n_layer) not in KNOWN_HEADS and dim % HEAD_DIM == 0:
            overrides["n_head"] = dim // HEAD_DIM
            notes.append(f"not a LlamaGen size: {dim // HEAD_DIM} heads of {HEAD_DIM}")
    cls_token = sd.get("adapter.model.embeddings.cls_token")
    if cls_token is not None:
        hidden = cls_token.shape[-1]
        if hidden not in dinov2.KNOWN_HEADS and hidden % HEAD_DIM == 0:
            overrides["adapter_heads"] = hidden // HEAD_DIM
            notes.append(f"encoder not a DINOv2 size: {hidden // HEAD_DIM} heads of {HEAD_DIM}")
    return overrides, "; ".join(notes)


def load_controlar_gpt(path: str, name: str, weight_dtype: str = "default",
                       compute_dtype: str = "auto") -> ControlARModel:
    """Read, strictly check and load a ControlAR / LlamaGen T2I file into a patcher."""
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    chosen = compute_choice(compute_dtype, load_device)       # refuses before the file is read
    sd = read_state_dict(path)
    overrides, note = head_overrides(sd)
    with naming_file(name):
        sd, cfg = prepare_gpt(sd, **overrides)
    if cfg.model_type != "t2i":
        raise CheckpointError(f"{name}: this is a class-conditional (C2I) {WHAT_GPT} ({cfg.describe()}); "
                              f"these nodes run the text-to-image models (ControlAR T2I files, LlamaGen "
                              f"t2i_XL_stage2_512.pt)")
    compute = chosen.dtype or auto_compute_dtype(load_device)
    dtype, int8_ops, storage_note = storage_choice(weight_dtype)
    if int8_ops is not None:
        # linear layers int8, embeddings and norms in the compute dtype. int8: the exact route (at the decode
        # steps' 2·batch rows it dequantises: a quarter of the memory, not faster); int8_fast: the route that
        # reads int8 weights at so few rows (kernels/int8.py fast_route, few_rows)
        if weight_dtype == "int8_fast":
            route, why = fast_route(load_device, few_rows=True)
            int8_ops = int8_ops_for(route)
            storage_note = f"int8 weights: {route or select_route(load_device)[0]} — {why}"
        elif select_route(load_device)[0] in ("int8_mm", "dequant"):
            storage_note += " (decode steps have too few rows for the int8 GEMM: dequantised, int8_fast is faster)"
        storage, ops = compute, int8_ops
    else:
        storage = dtype or compute
        ops = operations_for(casts=storage != compute)
    gpt = assign_load(lambda: GPT(cfg, operations=ops, dtype=storage), sd, storage, offload_device)
    sd.clear()
    gpt.compute_dtype = compute
    gpt.eval().requires_grad_(False)
    patcher = new_model_patcher(gpt, load_device, offload_device)
    kind = "ControlAR" if cfg.control is not None else "LlamaGen T2I base (no control encoder)"
    description = (f"{kind}: {cfg.describe()}; token budget {cfg.block_size} "
                   f"({16 * cfg.grid}×{16 * cfg.grid}); storage {storage_note or storage}, compute {compute}"
                   + (f" ({chosen.note})" if chosen.note else "") + (f"; {note}" if note else ""))
    return ControlARModel(patcher, cfg, name, description, compute)


def load_vq16(path: str, name: str) -> VQ:
    sd = read_state_dict(path)        # .pt: torch.load(weights_only=True), `{"model": …}` unwrapped
    with naming_file(name):
        sd, cfg = prepare_vq(sd)
    if cfg.downsample != 16:
        raise CheckpointError(f"{name}: a VQ-{cfg.downsample} tokenizer ({cfg.describe()}); ControlAR and "
                              f"LlamaGen T2I use VQ-16 (vq_ds16_t2i.pt)")
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    vq = assign_load(lambda: VQModel(cfg, operations=comfy.ops.disable_weight_init, dtype=torch.float32), sd,
                     torch.float32, offload_device)
    sd.clear()
    vq.eval().requires_grad_(False)
    return VQ(new_model_patcher(vq, load_device, offload_device), name, cfg.describe())


class ControlARLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_ControlARLoader",
            display_name="ControlAR Loader",
            category=CATEGORY,
            description="Loads a ControlAR text-to-image model (hustvl/ControlAR; weights on Hugging Face at "
                        "wondervictor/ControlAR: canny_MR, depth_MR, hed, "
                        "seg_cocostuff, edge_base, depth_base .safetensors — LlamaGen GPT-XL with its DINOv2 "
                        "control encoder) or the LlamaGen T2I base t2i_XL_stage2_512.pt (peizesun/llamagen_t2i, "
                        "uncontrolled) from models/controlar. The size, caption length and token budget are "
                        "read from the weights; the file is checked strictly (the stray freqs_cis / kv_cache "
                        "keys some files carry are dropped).",
            inputs=[
                io.Combo.Input("model_name", options=controlar_files(),
                               tooltip="From models/controlar: a ControlAR .safetensors (Hugging Face: "
                                       "wondervictor/ControlAR) or "
                                       "LlamaGen's t2i_XL_stage2_512.pt. *_MR models generate up to 2304 "
                                       "tokens (e.g. 768×768, 1024×576), the others 1024 (512×512)."),
                weight_dtype_input(" 'default': fp32 on the CPU, bf16 on GPUs "
                                   "that run it. Decoding reads every weight once per token, so "
                                   "narrower storage is faster. ControlAR's decode steps have only "
                                   "2·batch rows: there 'int8' dequantises (a quarter of the memory, "
                                   "not faster), while 'int8_fast' on the CPU takes torch's dynamic int8 "
                                   "linear, which reads the int8 weights directly (faster, less exact)."),
                compute_dtype_input(" 'auto' here: fp32 on the CPU, bf16 on GPUs "
                                    "that run it. Each token reads every weight and the K/V cache once: on "
                                    "a CPU with native bf16, bf16 halves those bytes (1.4-1.7x the fp32 "
                                    "speed measured), and with weight_dtype 'int8_fast' it is the fastest "
                                    "decode there (1.8-2.3x, less exact)."),
            ],
            outputs=[
                ControlARModelType.Output("controlar_model", tooltip="For ControlAR Sampler."),
                io.String.Output("description", tooltip="What the weights were detected as."),
            ],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype="default", compute_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(CONTROLAR_FOLDER, model_name)
        model = load_controlar_gpt(path, model_name, weight_dtype, compute_dtype)
        logging.info("dit-control: loaded %s as %s", model_name, model.description)
        return io.NodeOutput(model, model.description)


class VQ16Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_VQ16Loader",
            display_name="VQ-16 Loader",
            category=CATEGORY,
            description="Loads LlamaGen's VQ-16 image tokenizer (vq_ds16_t2i.pt from peizesun/llamagen_t2i, "
                        "the one ControlAR uses) from models/controlar: a {\"model\": …} checkpoint read with "
                        "weights_only=True, checked strictly (encoder and usage statistics included).",
            inputs=[
                io.Combo.Input("vq_name", options=controlar_files(),
                               tooltip="From models/controlar: vq_ds16_t2i.pt (peizesun/llamagen_t2i)."),
            ],
            outputs=[VQModelType.Output("vq_model", tooltip="For VQ Decode and the sampler's previews.")],
        )

    @classmethod
    def execute(cls, vq_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(CONTROLAR_FOLDER, vq_name)
        vq = load_vq16(path, vq_name)
        logging.info("dit-control: loaded %s as %s", vq_name, vq.description)
        return io.NodeOutput(vq)


# ---------------------------------------------------------------------------------------------
#                                       Text
# ---------------------------------------------------------------------------------------------

class ControlARTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_ControlARTextEncode",
            display_name="ControlAR Text Encode",
            category=CATEGORY,
            description="Encodes a prompt as ControlAR was trained: FLAN-T5-XL, 120 tokens, the cleaned caption, "
                        "LEFT-padded with the pad rows set to zero. Load FLAN-T5-XL (google/flan-t5-xl, any "
                        "shard, from models/text_encoders) with the pack's T5 loader.",
            inputs=[
                PixArtT5Type.Input("t5", tooltip="FLAN-T5-XL from the T5 loader ('PixArt T5 Loader': the pack's "
                                                  "T5 loader reads any T5-v1.1-style encoder; its size comes "
                                                  "from the weights)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt."),
                io.Boolean.Input("clean_caption", default=True,
                                 tooltip="Lower-case and strip URLs/HTML as ControlAR's sampler does (twice)."),
            ],
            outputs=[ControlARConditioningType.Output("conditioning",
                                                      tooltip="Caption [1, 120, 2048] + mask for ControlAR Sampler.")],
        )

    @classmethod
    def execute(cls, t5, text, clean_caption=True) -> io.NodeOutput:
        prompt = clean_caption_text(text) if clean_caption else text
        tokens = t5.tokenizer(prompt, max_length=MAX_LENGTH, padding="max_length", truncation=True,
                              add_special_tokens=True, return_tensors="pt")
        patcher = t5.load()
        mm.load_models_gpu([patcher])
        caption, mask = encode_caption(patcher.model, tokens.input_ids, tokens.attention_mask, dtype=t5.compute_dtype)
        out = mm.intermediate_device()
        cond = ControlARConditioning(caption.float().to(out), mask.to(out), prompt)
        del patcher
        if t5.release_after_encode:
            t5.release()
        return io.NodeOutput(cond)


# ---------------------------------------------------------------------------------------------
#                                       Decode
# ---------------------------------------------------------------------------------------------

class VQDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_VQDecode",
            display_name="VQ Decode",
            category=CATEGORY,
            description="Paints image tokens with the VQ-16 decoder (L2-normalised codebook, raster order); "
                        "16×16 pixels per token.",
            inputs=[
                VQModelType.Input("vq_model", tooltip="From VQ-16 Loader."),
                ImageTokensType.Input("image_tokens", tooltip="From ControlAR Sampler."),
            ],
            outputs=[io.Image.Output(tooltip="The image, 16·rows × 16·cols pixels.")],
        )

    @classmethod
    def execute(cls, vq_model: VQ, image_tokens: ImageTokens) -> io.NodeOutput:
        check_vocab(vq_model, image_tokens.vocab_size)
        tokens = image_tokens.tokens
        progress = comfy.utils.ProgressBar(tokens.shape[0])
        out = []
        for item in tokens.split(1):
            mm.throw_exception_if_processing_interrupted()
            out.append(vq_model.decode(item, image_tokens.rows, image_tokens.cols))
            progress.update(1)
        return io.NodeOutput(torch.cat(out))


def check_vocab(vq: VQ, vocab_size: int) -> None:
    if vq.codebook_size != vocab_size:
        raise ValueError(f"the VQ model '{vq.name}' has a codebook of {vq.codebook_size} entries but the tokens "
                         f"come from a GPT with a vocabulary of {vocab_size}: use the VQ-16 tokenizer the GPT "
                         f"was trained with (vq_ds16_t2i.pt)")


NODES = [ControlARLoader, VQ16Loader, ControlARTextEncode, VQDecode]
