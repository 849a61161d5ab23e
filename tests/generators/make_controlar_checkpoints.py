"""Tiny ControlAR / LlamaGen checkpoints in the released layouts and file names (made here, never downloaded),
so the shipped ControlAR workflows run unchanged on them.

Under the released names (what the shipped graphs load) go the micro ControlAR trained here where it is committed
(tests/training/install_controlar.py: canny_MR, hed, the palette VQ-16, the contextual tiny T5 as flan-t5-xl/);
the random tiny files below are always made under controlar/random/ and text_encoders/flan-t5-xl-random/ (the
API tests of the nodes' mechanics run on them: a 16384 vocabulary, a 96-wide FLAN-T5, fp32 files), and under the
released names too when the micro model is not committed. The LlamaGen base has no micro version: it is the
random file under its released name.

- controlar/canny_MR.safetensors: flat ControlAR T2I file, block size 2304 (the MR models' 48×48 grid: 768×512 =
  48×32 tokens fits, as released), DINOv2 control encoder under `adapter.model.` in transformers-4.x names;
- controlar/hed.safetensors: the same layout with block size 1024 (512-px models);
- controlar/t2i_XL_stage2_512.pt: a LlamaGen T2I base (no control parts) as `{"model": …}`;
- controlar/vq_ds16_t2i.pt: a VQ-16 tokenizer (5 levels, 16× down, 16384 × 8 codebook) as `{"model": …}`;
- text_encoders/flan-t5-xl/: a tiny FLAN-T5 encoder as Hugging Face shards + index (the pack's T5 loader).

Sizes (not the released ones; the names and layouts are): GPT width 128 (two 64-wide heads, the loader's
rule for sizes outside LlamaGen's table), 3 layers (control at 0, 1, 2), vocabulary 16384 as VQ-16's codebook,
120 caption rows of 96 (the tiny FLAN-T5's width); DINOv2 64 wide (one 64-wide head), 2 layers, the released
1370-row position table; VQ ch 32 (GroupNorm's 32 groups), z 64.
Every tensor is non-zero (projections that upstream zero-initialises included), except the zeros buffer
`condition_mlp.uncond_embedding`, zero in the release too.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_FLAN_T5 = dict(vocab_size=32128, d_model=96, d_kv=32, num_heads=2, d_ff=192, num_layers=2)
TINY_GPT = dict(dim=128, n_layer=3, n_head=2, ffn_hidden=512, vocab_size=16384, cls_token_num=120,
                caption_dim=TINY_FLAN_T5["d_model"])
TINY_DINOV2 = dict(hidden_size=64, num_layers=2, num_heads=1, mlp_hidden=256, patch_size=14, num_positions=1370)
TINY_VQ = dict(codebook_size=16384, codebook_embed_dim=8, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
               z_channels=64)
MR_BLOCK, BASE_BLOCK = 2304, 1024
GPT_FILES = {"canny_MR.safetensors": (MR_BLOCK, 30), "hed.safetensors": (BASE_BLOCK, 31)}
BASE_FILE, VQ_FILE = "t2i_XL_stage2_512.pt", "vq_ds16_t2i.pt"
FLAN_T5_FOLDER = "flan-t5-xl"
RANDOM_FOLDER, RANDOM_FLAN_T5_FOLDER = "random", "flan-t5-xl-random"   # the random files beside the micro model


def gpt_config(block_size: int, control: bool = True):
    from dit_control.kernels.controlar.dinov2 import Dinov2Config
    from dit_control.kernels.controlar.gpt import GPTConfig
    return GPTConfig(**TINY_GPT, block_size=block_size, control=Dinov2Config(**TINY_DINOV2) if control else None)


def _random_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if name == "condition_mlp.uncond_embedding":
        return torch.zeros(shape)                                   # zeros in the release (training dropout)
    if name.endswith("uncond_embedding"):                            # the CFG null caption: a random init
        return torch.randn(shape, generator=gen) * 0.5
    if len(shape) == 1 and "norm" in name and name.endswith("weight"):   # RMSNorm, LayerNorm, GroupNorm scales
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("lambda1"):                                     # DINOv2 layer scale
        return 0.5 + 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1:                                              # biases, codebook usage statistics
        return 0.02 * torch.randn(shape, generator=gen)
    if name.endswith("position_embeddings") or name.endswith(("cls_token", "mask_token")):
        return 0.5 * torch.randn(shape, generator=gen)
    if name.endswith("embeddings.weight") or name == "quantize.embedding.weight":   # token tables, VQ codebook
        return torch.randn(shape, generator=gen)
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    gain = 2.0 if name == "output.weight" else 1.0                    # logits spread enough that sampling varies
    return torch.randn(shape, generator=gen) * (gain / fan_in ** 0.5)


def random_state_dict(build, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        module = build()
    return {name: _random_tensor(name, tuple(t.shape), gen).contiguous() for name, t in module.state_dict().items()}


def save_controlar_gpt(path: Path, block_size: int, seed: int):
    """The released ControlAR T2I file: flat .safetensors, no prefix, buffers included, no freqs_cis/kv_cache."""
    import safetensors.torch

    from dit_control.kernels.controlar.gpt import GPT
    cfg = gpt_config(block_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(random_state_dict(lambda: GPT(cfg), seed), str(path))


def save_llamagen_base(path: Path, seed: int):
    """LlamaGen's t2i_XL_stage2_512.pt layout: `{"model": state_dict}`, no control parts."""
    from dit_control.kernels.controlar.gpt import GPT
    cfg = gpt_config(BASE_BLOCK, control=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": random_state_dict(lambda: GPT(cfg), seed)}, path)


def save_vq16(path: Path, seed: int):
    """vq_ds16_t2i.pt layout: `{"model": state_dict}` with encoder, decoder, quantizer and `codebook_used`."""
    from dit_control.kernels.controlar.vq import VQConfig, VQModel
    cfg = VQConfig(**TINY_VQ)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": random_state_dict(lambda: VQModel(cfg), seed)}, path)


def save_flan_t5(folder: Path, seed: int):
    """A tiny FLAN-T5 encoder as HF shards (model-0000i-of-00002.safetensors + model.safetensors.index.json)."""
    from dit_control.tests.generators.make_checkpoints import save_tiny_t5, shard_t5
    single = folder.parent / f".{folder.name}-single.safetensors"
    save_tiny_t5(single, seed=seed, **TINY_FLAN_T5)
    shard_t5(single, folder)
    single.unlink()


def make_random_files(folder: Path, t5_folder: Path):
    for name, (block, seed) in GPT_FILES.items():
        save_controlar_gpt(folder / name, block, seed)
    save_vq16(folder / VQ_FILE, seed=33)
    save_flan_t5(t5_folder, seed=34)


def make_controlar_files(models_dir: Path):
    from dit_control.tests.training.install_controlar import install_controlar_micro
    models_dir = Path(models_dir)
    folder = models_dir / "controlar"
    make_random_files(folder / RANDOM_FOLDER, models_dir / "text_encoders" / RANDOM_FLAN_T5_FOLDER)
    save_llamagen_base(folder / BASE_FILE, seed=32)
    if not install_controlar_micro(models_dir):
        make_random_files(folder, models_dir / "text_encoders" / FLAN_T5_FOLDER)


def write_controlar_inputs(input_dir: Path):
    """Photo-like inputs for the ControlAR workflows, drawn here: a 3:2 street scene (canny, 768×512) and a
    square still life (HED, 512×512)."""
    from PIL import Image, ImageDraw
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    street = Image.new("RGB", (960, 640), (150, 180, 210))
    d = ImageDraw.Draw(street)
    d.rectangle([0, 440, 960, 640], fill=(90, 90, 95))
    for x, h, c in ((60, 260, (180, 120, 90)), (300, 340, (200, 190, 170)), (620, 220, (120, 140, 160))):
        d.rectangle([x, 440 - h, x + 220, 440], fill=c)
        for wy in range(440 - h + 30, 420, 60):
            d.rectangle([x + 30, wy, x + 80, wy + 30], fill=(240, 230, 160))
    d.ellipse([800, 40, 900, 140], fill=(250, 240, 200))
    street.save(input_dir / "controlar_canny_input.png")
    still = Image.new("RGB", (600, 600), (220, 210, 190))
    d = ImageDraw.Draw(still)
    d.rectangle([0, 420, 600, 600], fill=(140, 100, 70))
    d.ellipse([120, 220, 300, 420], fill=(200, 50, 40))
    d.polygon([(360, 420), (400, 180), (480, 180), (520, 420)], fill=(60, 110, 160))
    still.save(input_dir / "controlar_hed_input.png")
