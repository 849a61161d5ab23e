"""A "palette VQ-16" in LlamaGen's VQ layout: codebook and decoder set by hand, never trained.

The micro ControlAR's image tokens are the scenes' 10 palette colours (tests/training/scenes.py COLOURS), one per
16×16 patch: encode = the nearest palette colour of each patch's mean (plain torch, for training data), decode =
that colour as a flat 16×16 patch, exactly. The VQ-16 Loader reads the file as any `vq_ds16_t2i.pt`
(`{"model": …}`, encoder, decoder, quantizer and `codebook_used`, the same tensor names as LlamaGen's).

Sizes: codebook 10 × 8 (the GPT's vocabulary), ch 128 at every level (ch_mult 1,1,1,1,1: the last GroupNorm
needs 4 channels per group, see below), z 16, and num_res_blocks 0 (one res block per decoder level, where
VQ-16 has 3): the full-resolution 128-channel convs are nearly all of the decode's cost (768×512 on one thread
beside a training job: 24 s with LlamaGen's 2 res blocks, 14.5 s with 0). 4.2 M parameters, 17 MB as float32.
The encoder tensors are zero: the pack never runs a VQ encoder, and training encodes with `encode_tokens` below.

How the decode is exact (as tests/training/pixel_vae.py, whose tricks these are):
- the codebook rows are unit vectors (the decoder L2-normalises them at use): for palette colour c in [−1, 1]³,
  row = (c/√3, √(1 − |c|²/3), 0, 0, 0, 0); post_quant_conv reads RGB back linearly (√3 on the first three);
- every ResnetBlock has conv2 = 0 (it is its shortcut: the identity), every attention block proj_out = 0, the
  upsample convs after the nearest ×2 are the identity tap: 16× nearest upsampling of the code's colour;
- the one norm on the path, `decoder.norm_out` (GroupNorm 32 groups + swish), sees each colour channel as
  (s·v, −s·v, +B, −B) in one group of 4: the group mean is exactly 0, its variance B²/2 + O(s²v²) (s/B = 1e-3),
  so the norm is a fixed scale; its affine maps s·v back to v plus 20, where swish is the identity to 1e-8, and
  conv_out's bias takes the 20 off.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dit_control.tests.training.scenes import COLOURS

PALETTE_NAMES = tuple(COLOURS)
PALETTE = torch.tensor([COLOURS[n] for n in PALETTE_NAMES], dtype=torch.float32) / 255.0   # [10, 3] in [0, 1]
PATCH = 16
VQ_CONFIG = dict(codebook_size=len(PALETTE_NAMES), codebook_embed_dim=8, ch=128, ch_mult=(1, 1, 1, 1, 1),
                 num_res_blocks=0, z_channels=16)
SIGNAL, CONST, SHIFT, GN_EPS = 1e-3, 1.0, 20.0, 1e-6
READOUT = math.sqrt(3.0)       # |c| ≤ √3 for c in [−1, 1]³: the codebook row holds c/√3


def codebook() -> torch.Tensor:
    """[10, 8] unit rows; RGB in [−1, 1] = √3 · row[:3]."""
    c = PALETTE * 2.0 - 1.0
    rows = torch.zeros(len(c), VQ_CONFIG["codebook_embed_dim"])
    rows[:, :3] = c / READOUT
    rows[:, 3] = (1.0 - (c / READOUT).pow(2).sum(1)).clamp_min(0).sqrt()
    return rows


def palette_vq_state_dict() -> dict:
    """{name: float32 tensor} of LlamaGen's VQModel at VQ_CONFIG, set by hand."""
    from dit_control.kernels.controlar.vq import VQConfig, VQModel
    cfg = VQConfig(**VQ_CONFIG)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VQModel(cfg).state_dict().items()}
    sd = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for name in sd:
        if "norm" in name and name.endswith("weight"):
            sd[name].fill_(1.0)                       # norm scales 1 (only decoder.norm_out reaches the output)
    sd["quantize.embedding.weight"] = codebook()
    used = range(12)                                  # channels 4k .. 4k+3 carry colour k (see the docstring)
    for name in shapes:
        if name.startswith("decoder.") and name.endswith("upsample.conv.weight"):
            for ch in used:
                sd[name][ch, ch, 1, 1] = 1.0
        if name.startswith("decoder.") and name.endswith("nin_shortcut.weight"):
            for ch in used:
                sd[name][ch, ch, 0, 0] = 1.0
    for k in range(3):
        sd["post_quant_conv.weight"][k, k, 0, 0] = READOUT
        p, n, cp, cn = 4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3
        sd["decoder.conv_in.weight"][p, k, 1, 1] = SIGNAL
        sd["decoder.conv_in.weight"][n, k, 1, 1] = -SIGNAL
        sd["decoder.conv_in.bias"][cp], sd["decoder.conv_in.bias"][cn] = CONST, -CONST
    sd["decoder.norm_out.weight"].zero_()
    gain = math.sqrt(CONST ** 2 / 2 + GN_EPS) / SIGNAL   # group of 4: (s·v, −s·v, B, −B)
    for k in range(3):
        sd["decoder.norm_out.weight"][4 * k] = gain
        sd["decoder.norm_out.bias"][4 * k] = SHIFT
        sd["decoder.conv_out.weight"][k, 4 * k, 1, 1] = 1.0
        sd["decoder.conv_out.bias"][k] = -SHIFT
    return sd


def save_palette_vq(path: Path) -> Path:
    """Write the palette VQ as `vq_ds16_t2i.pt` is (`{"model": state_dict}`, float32)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.contiguous() for k, v in palette_vq_state_dict().items()}}, path)
    return path


# ---- the same maps in plain torch, for training ----

def encode_tokens(image: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> tokens [B, (H/16)·(W/16)] in raster order: the palette colour nearest each
    16×16 patch's mean."""
    mean = F.avg_pool2d(image, PATCH).permute(0, 2, 3, 1)                      # [B, h, w, 3]
    d = (mean[..., None, :] - PALETTE.to(image)).pow(2).sum(-1)                # [B, h, w, 10]
    return d.argmin(-1).flatten(1)


def decode_tokens(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """tokens [B, rows·cols] -> image [B, 3, 16·rows, 16·cols] in [0, 1] (what the VQ file decodes, clamped)."""
    colours = PALETTE[tokens].reshape(tokens.shape[0], rows, cols, 3).permute(0, 3, 1, 2)
    return F.interpolate(colours, scale_factor=PATCH, mode="nearest")
