"""Train the micro demo PixArt-δ on procedural scenes: pure torch on our kernels, CPU, resumable.

    python tests/training/train.py --stage base       --out DIR   # PixArt-MS DiT, ε-prediction, caption dropout
    python tests/training/train.py --stage lcm        --out DIR   # LCM distillation of the base (needs base)
    python tests/training/train.py --stage controlnet --out DIR   # ControlNet-Transformer on Canny maps (needs base)
    python tests/training/train.py --stage base --out DIR --probe # timing probe: a few steps, nothing saved

Everything is seeded (`--seed`); a stage checkpoints every `--ckpt-every` steps into DIR/<stage>/ckpt.pt and
a rerun of the same command resumes from it (model, EMA, optimiser, data order and RNG states). Each stage
writes DIR/<stage>/loss.csv, loss.png and, when done, the released-layout files (fp16) under DIR/models/ in
ComfyUI's folder layout, under the file names the shipped workflows and our loaders expect:

- base:       diffusion_models/PixArt-XL-2-1024-MS.pth and PixArt-XL-2-512x512.pth (original `.pth`:
              `state_dict`, stale `pos_embed`, learned null caption `y_embedder.y_embedding`);
- lcm:        diffusion_models/PixArt-LCM-XL-2-1024-MS/transformer/diffusion_pytorch_model.safetensors + config.json;
- controlnet: controlnet/PixArt-XL-2-1024-ControlNet.pth (full layout: `base_model.*` + `controlnet.*`);
- text_encoders/t5xxl_fp16.safetensors: the frozen tiny T5 (random embeddings, hand-set positional attention:
make_checkpoints.save_context_t5) the captions are encoded with (the same
  seed and config as tests/generators/make_checkpoints.py's, so it equals the embedded default file).

Model and data (see tests/training/scenes.py, pixel_vae.py):
- latents are the pixel VAE's: the 256 px scene average-pooled 8× to 32×32, mapped to [-1, 1], channel 3
  zero — exactly what core VAEEncode of the pixel VAE times 0.18215 gives;
- the DiT is PixArt-MS (micro-condition embedders present, so the 1024-MS loaders take it) but their output
  layers are zero and frozen: one image size is trained, and a size condition never seen in training must
  not steer the model at other sizes; this also makes the 512 (non-MS) file the same network exactly;
- PixArt's positional table is the same for every file variant (positions span [0, 32) tokens-stretched), so
  the 1024-MS, 512 and LCM files of one network agree at any size.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]

from dit_control.kernels.pixart.lcm import ddpm_alphas_cumprod, lcm_boundary_scalings, lcm_grid  # noqa: E402
from dit_control.kernels.pixart.model import PixArt, PixArtConfig, pos_embed_2d  # noqa: E402

# ---------------------------------------------------------------------------------------------
#                                          Settings
# ---------------------------------------------------------------------------------------------

# hidden % 3 == 0 (size embedders), 72-wide heads as XL/2 (the loaders infer 2 heads from 144);
# patch 4: 8×8 tokens for a 32×32 latent — the cost that fits a CPU session (tests/training/README.md, "How it is
# trained")
MICRO_PIXART = dict(hidden_size=144, depth=6, num_heads=2, patch_size=4, sample_size=128, pe_interpolation=2.0,
                    micro_condition=True)
CONTROL_BLOCKS = MICRO_PIXART["depth"] // 2   # PixArt-δ copies 13 of 28 blocks; half the depth here (1…3)
T5_SEED = 4                   # tests/generators/make_checkpoints.py::make_all's seed of t5xxl_fp16.safetensors
TOKENS = 48                   # caption tokens (longest caption: 37); masked, so equal to the node's 120
LATENT = 32                   # 256 px
CFG_DISTILLED = 4.5           # PixArt-δ LCM: cond + w·(cond − uncond), w = 4.5 (= CFG 5.5)
# The micro LCM's teacher guidance: w = 3.5, the base graph's CFG 4.5. Distilled from the micro base at PixArt-δ's
# 4.5 its 4-step pictures kept a colour speckle inside the shapes (caption agreement 0.80 on the held-out
# captions, 0.83 on 96 validation scenes); at 3.5, 500 steps: 0.93 / 0.90. Longer distillation reads lower at
# either w (3.5: 0.89 / 0.86 / 0.73 at 1000 / 1500 / 2000 steps), its loss flat: the consistency target drifts.
LCM_GUIDANCE = 3.5
HUBER_C = 1e-3
LCM_SAMPLED_TIMESTEPS = (999, 759, 499, 259)   # the LCM Scheduler's 4 steps (diffusers rule)
LCM_SKIP = 20                 # DDIM skipping solver over the 50-step grid 19, 39, …, 999
# The base's loss, from what the earlier runs showed (README, "The micro demo model"):
# - half of each batch: t uniform, ε loss weighted min(1 + 1/SNR, cap) (the "SNR+1" x0 weighting,
#   truncated), normalised to mean 1. With uniform weights the content of a scene, which the caption decides
#   at t ≈ 600-999 (SNR < 0.02), is worth < 1% of the ε loss: the first run ignored its captions. The cap
#   is 50 for the first 4000 steps (content first), then 5: at 50 the low-noise steps that clean a picture
#   up weigh 0.04 of the rest, and the samples stayed blotchy;
# - the other half: t ∈ [HIGH_NOISE_FROM, 1000), scored in x0 (ε error × (1-ᾱ)/ᾱ), scaled by X0_LOSS_SCALE
#   so that it weighs about as much as the first half at the start. At t > 800 (√ᾱ < 0.04), where a
#   sample's background colour is decided, the caption's effect on ε is so small that ε-weighted runs
#   learned it only slowly.
LOSS_WEIGHT_CAPS = ((0, 50.0), (4000, 5.0))      # (from step, cap)
HIGH_NOISE_FROM = 800
# ControlNet training prompts (see ControlNetStage): shares of the caption without its places (the control
# map gives the layout: what the tests prompt with) and of the empty prompt; the rest keep the full caption
CONTROLNET_PROMPTS = {"without_places": 0.5, "empty": 0.25}
# the base's share of captions without their places (shapes anywhere): with places only, the base drew a bare
# background for "a red circle on a blue background", the prompt a user writes first and the ControlNet's
# (whose control at half strength then had no shape to steer: edge F1 0.01 at 0.5, 0.42 at 1)
BASE_PROMPTS_WITHOUT_PLACES = 0.2
X0_LOSS_SCALE = 0.004
DECAY_TO = 0.1                  # a stage's final lr as a share of its lr (StageDefaults.decay_from)


@dataclass
class StageDefaults:
    steps: int
    batch: int
    lr: float
    ckpt_every: int
    ema: float
    decay_from: int = 0       # from this step the lr falls linearly to DECAY_TO of itself at the last step


STAGES = {
    # what the committed model was trained with (README, "The micro demo model"; idle machine, 2 cores:
    # base 0.17 s/step; lcm and controlnet side by side on one core each). A rerun with a larger --steps
    # continues from the checkpoint. The committed base had three runs of this stage: these defaults with
    # `--jitter 1 --without-places 0` (24 000 steps, shapes shifted in their cells), then `--steps 31000 --lr 1e-4
    # --decay-from 0 --without-places 0` on centred shapes (scenes.JITTER, why there), then a fine-tune into a new
    # folder, `--init-from <first>/models --steps 6000 --lr 2e-4 --decay-from 1000`, with captions without places
    # (BASE_PROMPTS_WITHOUT_PLACES); the ControlNet continued the one trained on the second run's base the same way,
    # three times (6000 steps; 10 000 with --decay-from 4000; 4200 steps of `--steps 8000 --decay-from 3000`,
    # stopped there and exported). The LCM: these defaults on the fine-tuned base.
    "base": StageDefaults(steps=24000, batch=32, lr=3e-4, ckpt_every=200, ema=0.999, decay_from=14000),
    "lcm": StageDefaults(steps=500, batch=32, lr=1e-4, ckpt_every=100, ema=0.95),
    "controlnet": StageDefaults(steps=6500, batch=32, lr=2e-4, ckpt_every=200, ema=0.999),
}


def model_config(hidden: int = 0, depth: int = 0, patch: int = 0) -> PixArtConfig:
    """MICRO_PIXART, optionally resized; heads follow the loaders' inference rule (72-wide, else 64-wide),
    since a .pth file does not record them."""
    from dit_control.tests.generators.make_checkpoints import TINY_T5
    over = {k: v for k, v in (("hidden_size", hidden), ("depth", depth), ("patch_size", patch)) if v}
    cfg = {**MICRO_PIXART, **over}
    h = cfg["hidden_size"]
    if h % 3:
        raise SystemExit(f"--hidden must be a multiple of 3 (PixArt-MS size embedders), got {h}")
    cfg["num_heads"] = h // 72 if h % 72 == 0 else max(1, h // 64)
    return PixArtConfig(caption_channels=TINY_T5["d_model"], **cfg)


# ---------------------------------------------------------------------------------------------
#                                     Data and captions
# ---------------------------------------------------------------------------------------------

def tokenizer():
    """The T5-v1.1 tokenizer ComfyUI ships (the one our PixArt T5 Text Encode node uses)."""
    from transformers import T5TokenizerFast

    from dit_control.tests.comfy_host import COMFY_DIR
    return T5TokenizerFast.from_pretrained(str(COMFY_DIR / "comfy" / "text_encoders" / "t5_tokenizer"))


def tokenize(tok, captions, length: int = TOKENS):
    """(ids [B, L] long, mask [B, L] long) as the node tokenizes (captions are already clean lower case)."""
    out = tok(list(captions), max_length=length, padding="max_length", truncation=True,
              add_special_tokens=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def ensure_t5(out: Path) -> Path:
    from dit_control.tests.generators.make_checkpoints import save_context_t5
    path = out / "models" / "text_encoders" / "t5xxl_fp16.safetensors"
    if not path.exists():
        save_context_t5(path, seed=T5_SEED)
    return path


def load_t5(path: Path):
    from dit_control.kernels.t5 import load_t5_encoder_file
    encoder, _ = load_t5_encoder_file(str(path), dtype=torch.float32)
    return encoder.eval().requires_grad_(False)


def build_dataset(out: Path, count: int, with_edges: bool, seed0: int = 0) -> dict:
    """Scenes seed0 … seed0+count-1 as model-space latents (fp16, 3 channels), token ids and masks, and
    (with_edges) the pixel-VAE latents of their Canny maps; cached in DIR/data/."""
    from dit_control.tests.training import scenes
    from dit_control.tests.training.scenes import edge_map, render, training_scene
    jitter = "" if scenes.JITTER == 0 else f"_jitter{scenes.JITTER:g}"
    cache = out / "data" / f"scenes_{seed0}_{count}{'_edges' if with_edges else ''}{jitter}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    tok = tokenizer()
    latents, edges, captions = [], [], []
    t0 = time.time()
    def pooled(hwc: np.ndarray) -> np.ndarray:
        """encode_model_latent in numpy ([3, 32, 32] float16): per-scene torch calls are slow on a busy
        machine (each small op waits for its thread pool)."""
        h, w, c = hwc.shape
        return (hwc * 2 - 1).reshape(h // 8, 8, w // 8, 8, c).mean(axis=(1, 3)).transpose(2, 0, 1).astype(np.float16)

    for i in range(count):
        scene = training_scene(seed0 + i)
        img = render(scene)
        latents.append(pooled(img))
        if with_edges:
            edges.append(pooled(np.repeat(edge_map(img)[..., None], 3, axis=2)))
        captions.append(scene.caption)
        if (i + 1) % 1000 == 0 or i + 1 == count:
            progress("data", i + 1, count, t0)
    ids, mask = tokenize(tok, captions)
    data = {"latents": torch.from_numpy(np.stack(latents)), "ids": ids.int(), "mask": mask.bool()}
    if with_edges:
        data["edges"] = torch.from_numpy(np.stack(edges))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def full_latent(three: torch.Tensor) -> torch.Tensor:
    """[B, 3, h, w] -> [B, 4, h, w] with the pixel VAE's zero 4th channel."""
    return torch.cat([three.float(), torch.zeros_like(three[:, :1], dtype=torch.float32)], dim=1)


# ---------------------------------------------------------------------------------------------
#                                     Progress, curves, PNG
# ---------------------------------------------------------------------------------------------

def progress(label: str, done: int, total: int, t0: float, extra: str = ""):
    frac = done / max(total, 1)
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    elapsed = time.time() - t0
    eta = elapsed / max(frac, 1e-9) - elapsed if done else float("nan")
    sys.stderr.write(f"\r{label} [{bar}] {done}/{total} {elapsed:6.0f}s eta {eta:6.0f}s {extra}   ")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def write_loss_curves(folder: Path, rows: list):
    """A run's rows (step, loss, lr, s/step, elapsed) as folder/loss.csv and its loss plot as folder/loss.png."""
    with open(folder / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "sec_per_step", "elapsed_s"])
        w.writerows(rows)
    plot_curve(folder / "loss.png", [r[0] for r in rows], [r[1] for r in rows])


def write_png(path: Path, rgb: np.ndarray):
    """A minimal PNG writer (8-bit RGB, no filter): no plotting dependency."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def plot_curve(path: Path, steps, losses, width: int = 480, height: int = 240):
    """Loss (log scale, raw in grey and a running mean in blue) against step, as a PNG."""
    img = np.full((height, width, 3), 255, np.uint8)
    if len(losses) < 2:
        write_png(path, img)
        return
    losses = np.log10(np.maximum(np.asarray(losses, np.float64), 1e-8))
    k = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    lo, hi = losses.min(), losses.max()
    pad = 10
    img[pad:height - pad, pad] = img[height - pad, pad:width - pad] = 0           # axes

    def xy(i, v, n):
        x = pad + int((width - 2 * pad - 1) * i / max(n - 1, 1))
        y = height - pad - 1 - int((height - 2 * pad - 1) * (v - lo) / max(hi - lo, 1e-9))
        return x, y
    for series, colour in ((losses, (190, 190, 190)), (smooth, (30, 80, 220))):
        prev = None
        for i, v in enumerate(series):
            p = xy(i + (len(losses) - len(series)), v, len(losses))
            if prev is not None:
                n = max(abs(p[0] - prev[0]), abs(p[1] - prev[1]), 1)
                for s in range(n + 1):
                    img[prev[1] + (p[1] - prev[1]) * s // n, prev[0] + (p[0] - prev[0]) * s // n] = colour
            prev = p
    write_png(path, img)


# ---------------------------------------------------------------------------------------------
#                                          Models
# ---------------------------------------------------------------------------------------------

def new_base(cfg: PixArtConfig, gen: torch.Generator) -> PixArt:
    """DiT/PixArt initialisation: Xavier linears, zero adaLN / final projections (blocks start as identity),
    N(0, 0.02) timestep MLP, null caption N(0, 1/C); micro-condition output layers zero (and frozen)."""
    model = PixArt(cfg)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_out, fan_in = p.shape[0], p[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            with torch.no_grad():
                p.uniform_(-bound, bound, generator=gen)
        else:
            torch.nn.init.zeros_(p)
        if name.startswith("t_embedder") and p.ndim >= 2:
            with torch.no_grad():
                p.normal_(0, 0.02, generator=gen)
        if name.endswith("scale_shift_table"):
            with torch.no_grad():
                p.normal_(0, 1 / math.sqrt(cfg.hidden_size), generator=gen)
    zero = ["t_block.1", "final_layer.linear", "csize_embedder.mlp.2", "ar_embedder.mlp.2"]
    zero += [f"blocks.{i}.{n}" for i in range(cfg.depth) for n in ("attn.proj", "cross_attn.proj", "mlp.fc2")]
    mods = dict(model.named_modules())
    for n in zero:
        if n in mods:
            torch.nn.init.zeros_(mods[n].weight)
            torch.nn.init.zeros_(mods[n].bias)
    with torch.no_grad():
        model.y_embedder.y_embedding.normal_(0, cfg.caption_channels ** -0.5, generator=gen)
    return model


PASSTHROUGH_CHANNELS = 8      # residual channels that carry the constant of passthrough_init
PASSTHROUGH_RADIUS = 240.0    # its norm: the final LayerNorm's std varies by < 0.3% with the input


def passthrough_init(model: PixArt, gen: torch.Generator, latent: int = LATENT):
    """Start the DiT as ε̂ = x_t, the optimum at high noise, with the final LayerNorm made (nearly) linear.

    Why: at PixArt's high noise levels (t > 800, √ᾱ < 0.04) a caption changes the optimal ε̂ by < 1%, while
    a freshly initialised DiT misses x_t itself by far more — its only path from input to output runs
    through the final LayerNorm, which divides each token by its own norm. The first run stayed 10× worse
    than ε̂ = x_t at t = 900 after 2400 steps and never used its captions. So, at initialisation:
    - the last block's (gated, zero-weight) MLP adds a constant c of norm R on PASSTHROUGH_CHANNELS
      channels (zero mean), so the final norm's std is ≈ R/√D whatever the token holds: a fixed scale;
    - the patch embedding writes x into the other channels through orthonormal columns U (scale g),
      orthogonal to the training grid's positional vectors and to the all-ones direction;
    - the final linear reads U back (σ₀/g · Uᵀ, zero on the constant's channels, so no modulation scale
      can leak c into the output) into the ε outputs in unpatchify order; the σ outputs start at zero;
    - the timestep embedder's output layer and the final modulation start at zero (a shift after the
      norm reaches the output with gain σ₀), so at step 0 the model is exactly ε̂ ≈ x_t for every t.
    Blocks stay adaLN-Zero (identity), so all they learn are corrections to a correct high-noise answer."""
    cfg = model.config
    d, p, cin = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    k = PASSTHROUGH_CHANNELS
    rest = torch.arange(k, d)                                   # channels the signal uses
    grid = latent // p
    pos = pos_embed_2d(d, grid, grid, cfg.base_size, cfg.pe_interpolation).double()   # [N, D]
    fixed = torch.cat([torch.ones(1, d - k, dtype=torch.float64), pos[:, rest]])     # [1 + N, D-k]
    basis = torch.linalg.svd(fixed, full_matrices=True)
    rank = int((basis.S > basis.S[0] * 1e-9).sum())
    complement = basis.Vh[rank:].T                              # [D-k, D-k-rank], orthonormal
    n_in = cin * p * p
    if complement.shape[1] < n_in:
        raise SystemExit(f"passthrough_init needs {n_in} free channels, the grid leaves {complement.shape[1]}")
    mix = torch.linalg.qr(torch.randn(complement.shape[1], n_in, generator=gen, dtype=torch.float64)).Q
    u = complement @ mix                                        # [D-k, n_in] orthonormal columns ⟂ pos, 1
    g = math.sqrt(6.0 / (n_in + d)) * math.sqrt(d / 3)          # ≈ a Xavier column's norm
    w = torch.zeros(d, n_in, dtype=torch.float64)
    w[rest] = g * u
    c = torch.zeros(d, dtype=torch.float64)
    c[:k] = PASSTHROUGH_RADIUS / math.sqrt(k) * torch.tensor([(-1.0) ** i for i in range(k)], dtype=torch.float64)
    # the final norm's std at init: (c + pos + W x) over channels, x ~ unit variance
    sigma0 = math.sqrt((PASSTHROUGH_RADIUS ** 2 + float((pos ** 2).sum(1).mean()) + g * g * n_in) / d)
    out = torch.zeros(p * p * cfg.out_channels, d, dtype=torch.float64)
    # conv input index (c, i, j) -> unpatchify output index ((i * p + j) * out_channels + c)
    for ch in range(cin):
        for i in range(p):
            for j in range(p):
                out[(i * p + j) * cfg.out_channels + ch, rest] = sigma0 / g * u[:, (ch * p + i) * p + j]
    last = model.blocks[-1]
    with torch.no_grad():
        model.x_embedder.proj.weight.copy_(w.reshape(d, cin, p, p).float())
        model.x_embedder.proj.bias.zero_()
        last.mlp.fc2.weight.zero_()
        last.mlp.fc2.bias.copy_(c.float())
        last.scale_shift_table[5].fill_(1.0)                    # its MLP gate: c enters the stream at 1
        model.final_layer.linear.weight.copy_(out.float())
        model.final_layer.linear.bias.zero_()
        model.final_layer.scale_shift_table.zero_()
        model.t_embedder.mlp[2].weight.zero_()
        model.t_embedder.mlp[2].bias.zero_()


def frozen_micro_conditions(model: PixArt):
    """The size/aspect embedders stay exactly zero in output (see the module doc)."""
    for e in ("csize_embedder", "ar_embedder"):
        if hasattr(model, e):
            getattr(model, e).requires_grad_(False)


class Trainable(torch.nn.Module):
    """The DiT plus its null caption as a trained parameter (the released file stores it as the
    `y_embedder.y_embedding` buffer, which is what the PixArt Null Caption node reads)."""

    def __init__(self, base: PixArt):
        super().__init__()
        self.base = base
        self.null = torch.nn.Parameter(base.y_embedder.y_embedding.detach().clone())

    def sync_null(self):
        with torch.no_grad():
            self.base.y_embedder.y_embedding.copy_(self.null)


def caption_batch(t5, ids, mask, drop: torch.Tensor, null: torch.Tensor):
    """T5 features [B, L, C] with the dropped rows replaced by the null caption (mask kept, as PixArt)."""
    with torch.no_grad():
        y = t5(ids.long(), mask.long(), dtype=torch.float32)
    if drop is not None and bool(drop.any()):
        y = torch.where(drop[:, None, None], null[None, : y.shape[1]].to(y.dtype), y)
    return y


def loss_weight_cap(step: int) -> float:
    return [cap for start, cap in LOSS_WEIGHT_CAPS if step >= start][-1]


def content_weights(alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """[1000] per-timestep ε-loss weights, min(1 + 1/SNR, cap), normalised to mean 1 over the timesteps."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    w = torch.clamp(1 + 1 / snr, max=cap)
    return (w / w.mean()).float()


def weighted_mse(pred, target, weights):
    """Mean over the batch of weights[b] · MSE(pred[b], target[b])."""
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return (weights * per_sample).mean()


def eps_of(model: PixArt, x, t, y, mask, control=None):
    return model(x, t, y, mask, control=control)[:, :4]


# ---------------------------------------------------------------------------------------------
#                                     Checkpoints and files
# ---------------------------------------------------------------------------------------------

def fp16(sd: dict) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def pth_state_dict(model: PixArt) -> dict:
    """Original .pth names (1024-MS file): the model's tensors plus the stale pos_embed of its trained size."""
    cfg = model.config
    sd = dict(model.state_dict())
    grid = cfg.sample_size // cfg.patch_size
    sd["pos_embed"] = pos_embed_2d(cfg.hidden_size, grid, grid, grid, cfg.sample_size / 64)[None]
    return fp16(sd)


def save_base_files(model: PixArt, models: Path) -> list:
    """The 1024-MS file and the 512 file of the same network (tests/training/install.py derives the second
    from the first the same way when it installs the committed model)."""
    from dit_control.tests.training.install import non_ms_state_dict
    dm = models / "diffusion_models"
    dm.mkdir(parents=True, exist_ok=True)
    paths = [dm / "PixArt-XL-2-1024-MS.pth", dm / "PixArt-XL-2-512x512.pth"]
    ms = pth_state_dict(model)
    torch.save({"state_dict": ms}, paths[0])
    torch.save({"state_dict": non_ms_state_dict(ms)}, paths[1])
    return paths


def save_lcm_files(model: PixArt, models: Path) -> list:
    """The diffusers transformer layout (+ config.json), as tests/generators/make_checkpoints.py writes it."""
    import safetensors.torch

    from dit_control.kernels.pixart.checkpoint import original_to_diffusers, to_diffusers_config
    cfg = model.config
    folder = models / "diffusion_models" / "PixArt-LCM-XL-2-1024-MS" / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    sd = fp16(original_to_diffusers(dict(model.state_dict())))
    safetensors.torch.save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(cfg), indent=1))
    return [folder / "diffusion_pytorch_model.safetensors", folder / "config.json"]


def save_controlnet_files(base: PixArt, controlnet, models: Path) -> list:
    folder = models / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "PixArt-XL-2-1024-ControlNet.pth"
    sd = {f"base_model.{k}": v for k, v in pth_state_dict(base).items()}
    sd.update(fp16(controlnet.state_dict()))
    torch.save({"state_dict": sd}, path)
    return [path]


def load_lcm_transformer(models: Path) -> PixArt:
    """A distilled LCM back from its diffusers-layout file (+ config.json), through our strict loader (float32)."""
    from dit_control.kernels.checkpoint_io import read_json_beside, read_state_dict
    from dit_control.kernels.pixart.checkpoint import from_diffusers_config, load_pixart
    path = models / "diffusion_models" / "PixArt-LCM-XL-2-1024-MS" / "transformer" / \
        "diffusion_pytorch_model.safetensors"
    return load_pixart({k: v.float() for k, v in read_state_dict(str(path)).items()},
                       **from_diffusers_config(read_json_beside(str(path))), dtype=torch.float32).eval()


def load_base_pth(models: Path) -> PixArt:
    """The trained base back from its released file, through our strict loader (float32)."""
    from dit_control.kernels.pixart.checkpoint import load_pixart
    ckpt = torch.load(models / "diffusion_models" / "PixArt-XL-2-1024-MS.pth", map_location="cpu",
                      weights_only=True)
    return load_pixart({k: v.float() for k, v in ckpt["state_dict"].items()}, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
#                                          Training
# ---------------------------------------------------------------------------------------------

def huber(a, b, c=HUBER_C):
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


class Stage:
    """One stage's loop: batches, step function, checkpoint/resume, curves, files."""

    def __init__(self, args, defaults: StageDefaults):
        self.args = args
        self.out = Path(args.out)
        self.dir = self.out / args.stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.steps = args.steps or defaults.steps
        self.batch = args.batch or defaults.batch
        self.lr = args.lr or defaults.lr
        self.ckpt_every = args.ckpt_every or defaults.ckpt_every
        self.ema_decay = defaults.ema
        self.decay_from = args.decay_from if args.decay_from >= 0 else defaults.decay_from
        self.cfg = model_config(args.hidden, args.depth, args.patch)
        self.t5 = load_t5(ensure_t5(self.out))
        self.ac = ddpm_alphas_cumprod(dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(args.seed)           # noise, timesteps, dropout
        self.order = np.random.default_rng(args.seed)                # data order
        self.data = build_dataset(self.out, args.scenes, with_edges=True)    # one cache for every stage
        self.rows = []

    def add_captions_without_places(self, tok):
        """Token ids and masks of the same scenes' captions without their places, row for row with the data
        cache (its scenes are training_scene(0 … N-1))."""
        from dit_control.tests.training.scenes import training_scene
        ids, mask = tokenize(tok, [training_scene(i).caption_without_places for i in range(len(self.data["ids"]))])
        self.data["ids_without_places"], self.data["mask_without_places"] = ids.to(self.data["ids"].dtype), mask.bool()

    def prompts(self, b, without_places: float, empty: float = 0.0):
        """(ids, mask) of a batch with a share of rows prompted without places and a share with ""."""
        if not without_places and not empty:
            return b["ids"], b["mask"]                  # (no draw: the random stream of the earlier runs)
        n = b["ids"].shape[0]
        u = torch.rand(n, generator=self.gen)
        unplaced = u < without_places
        ids = torch.where(unplaced[:, None], b["ids_without_places"], b["ids"])
        mask = torch.where(unplaced[:, None], b["mask_without_places"], b["mask"])
        if empty:
            blank = (u >= without_places) & (u < without_places + empty)
            ids[blank], mask[blank] = self.empty_ids, self.empty_mask
        return ids, mask

    # batches
    def next_batch(self):
        idx = torch.from_numpy(self.order.integers(0, len(self.data["latents"]), size=self.batch))
        return {k: v[idx] for k, v in self.data.items()}

    def noised(self, x0, t):
        a = self.ac[t].float()[:, None, None, None]
        noise = torch.randn(x0.shape, generator=self.gen)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise

    # checkpoint
    def state(self) -> dict:
        return {"step": self.step, "modules": {k: m.state_dict() for k, m in self.modules().items()},
                "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                "order": self.order.bit_generator.state, "torch": torch.get_rng_state(), "rows": self.rows,
                "args": {k: v for k, v in vars(self.args).items() if k != "out"}}

    def save_ckpt(self):
        tmp = self.dir / "ckpt.pt.tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, self.dir / "ckpt.pt")

    def try_resume(self) -> bool:
        path = self.dir / "ckpt.pt"
        if not path.exists() or self.args.probe:
            return False
        ck = torch.load(path, map_location="cpu", weights_only=False)
        for k, m in self.modules().items():
            m.load_state_dict(ck["modules"][k])
        self.opt.load_state_dict(ck["opt"])
        self.gen.set_state(ck["gen"])
        self.order.bit_generator.state = ck["order"]
        torch.set_rng_state(ck["torch"])
        self.rows = ck["rows"]
        self.step = ck["step"]
        print(f"resumed {self.args.stage} at step {self.step} from {path}", file=sys.stderr)
        return True

    def write_curves(self):
        write_loss_curves(self.dir, self.rows)

    def warm_ema(self) -> float:
        """EMA decay with the usual warm-up, (1 + n) / (10 + n), so that the short runs here do not keep a
        sizeable share of the initial weights (0.999^2000 would be 14%)."""
        return min(self.ema_decay, (1 + self.step) / (10 + self.step))

    def lr_at(self, step):
        warm = min(100, self.steps // 10 + 1)
        lr = self.lr * min(1.0, (step + 1) / warm)
        if 0 < self.decay_from <= step:
            lr *= 1 - (1 - DECAY_TO) * (step - self.decay_from) / max(self.steps - self.decay_from, 1)
        return lr

    def run(self):
        self.step = 0
        self.setup()
        self.opt = torch.optim.AdamW([p for p in self.trained().parameters() if p.requires_grad],
                                     lr=self.lr, weight_decay=0.0)
        self.try_resume()
        t_start = time.time()
        elapsed0 = self.rows[-1][4] if self.rows else 0.0
        first = self.step
        steps = min(self.steps, first + self.args.probe) if self.args.probe else self.steps
        cpu_times = []
        while self.step < steps:
            t0, c0 = time.time(), time.process_time()
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            loss = self.train_step(self.next_batch())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trained().parameters(), 1.0)
            self.opt.step()
            self.after_step()
            self.step += 1
            dt = time.time() - t0
            cpu_times.append(time.process_time() - c0)
            self.rows.append([self.step, float(loss.detach()), self.lr_at(self.step - 1), round(dt, 3),
                              round(elapsed0 + time.time() - t_start, 1)])
            recent = np.mean([r[1] for r in self.rows[-20:]])
            progress(self.args.stage, self.step, steps, t_start - elapsed0,
                     f"loss {recent:.4f} {dt:.2f}s/step")
            if not self.args.probe and (self.step % self.ckpt_every == 0 or self.step == self.steps):
                self.save_ckpt()
                self.write_curves()
        if self.args.probe:
            times = [r[3] for r in self.rows[first + 1:]] or [r[3] for r in self.rows[first:]]
            n = sum(p.numel() for p in self.trained().parameters() if p.requires_grad)
            cpu = float(np.median(cpu_times[1:] or cpu_times))
            # CPU seconds per step / threads: meant as the wall time on idle cores, but on a loaded machine
            # OpenMP threads spin while they wait, so it is inflated as much as the wall time (measured:
            # 2.3-2.6 CPU s/step at load 7.5, 0.37 at load 2.5); trust a probe taken on quiet cores
            print(json.dumps({"stage": self.args.stage, "batch": self.batch, "steps": len(self.rows) - first,
                              "sec_per_step": round(float(np.median(times)), 3),
                              "cpu_sec_per_step": round(cpu, 3),
                              "idle_estimate_sec_per_step": round(cpu / torch.get_num_threads(), 3),
                              "trained_params": n, "threads": torch.get_num_threads(),
                              "load_avg_1min": os.getloadavg()[0]}))
            return []
        self.write_curves()
        files = self.save_files(self.out / "models")
        self.write_report(files, time.time() - t_start)
        return files

    # the base's two-half loss (see LOSS_WEIGHT_CAPS), shared by the ControlNet stage
    def split_noise_levels(self, n: int) -> torch.Tensor:
        """[n] timesteps: the first half uniform, the second from [HIGH_NOISE_FROM, 1000)."""
        half = n // 2
        return torch.cat([torch.randint(0, 1000, (n - half,), generator=self.gen),
                          torch.randint(HIGH_NOISE_FROM, 1000, (half,), generator=self.gen)])

    def split_loss(self, eps, noise, t, cap: float):
        n = eps.shape[0]
        k = n - n // 2
        a = self.ac[t[k:]].float()
        x0_weights = X0_LOSS_SCALE * (1 - a) / a                 # ε error -> x0 error
        weights = content_weights(self.ac, cap)
        return (weighted_mse(eps[:k], noise[:k], weights[t[:k]]) * k
                + weighted_mse(eps[k:], noise[k:], x0_weights) * (n - k)) / n

    def write_report(self, files, seconds):
        info = {"stage": self.args.stage, "steps": self.steps, "batch": self.batch, "lr": self.lr,
                "seconds_this_run": round(seconds, 1), "total_seconds": self.rows[-1][4] if self.rows else 0,
                "sec_per_step_median": float(np.median([r[3] for r in self.rows])) if self.rows else None,
                "final_loss_mean_last_100": float(np.mean([r[1] for r in self.rows[-100:]])) if self.rows else None,
                "config": asdict(self.cfg), "files": {str(f.relative_to(self.out)): f.stat().st_size for f in files}}
        (self.dir / "report.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))


class BaseStage(Stage):
    """ε-prediction on the DDPM schedule (PixArt's linear betas), caption dropout 10% to the null caption,
    ε loss weighted towards the content-deciding noise levels (content_weights)."""

    def setup(self):
        gen = torch.Generator().manual_seed(self.args.seed + 1)
        if self.args.init_from:
            base = load_base_pth(Path(self.args.init_from))   # continue from committed weights (fp16 -> fp32)
        else:
            base = new_base(self.cfg, gen)
            if not self.args.no_passthrough:
                passthrough_init(base, gen)
        self.net = Trainable(base)
        frozen_micro_conditions(self.net.base)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.without_places = (BASE_PROMPTS_WITHOUT_PLACES if self.args.without_places is None
                               else self.args.without_places)
        if self.without_places:
            self.add_captions_without_places(tokenizer())

    def modules(self):
        return {"net": self.net, "ema": self.ema}

    def trained(self):
        return self.net

    def train_step(self, b):
        x0 = full_latent(b["latents"])
        n = x0.shape[0]
        t = self.split_noise_levels(n)
        xt, noise = self.noised(x0, t)
        drop = torch.rand(n, generator=self.gen) < self.args.caption_dropout
        ids, mask = self.prompts(b, self.without_places)
        y = caption_batch(self.t5, ids, mask, drop, self.net.null)
        eps = eps_of(self.net.base, xt, t, y, mask)
        return self.split_loss(eps, noise, t, loss_weight_cap(self.step))

    def after_step(self):
        ema_update(self.ema, self.net, self.warm_ema())

    def save_files(self, models):
        self.ema.sync_null()
        return save_base_files(self.ema.base, models)


class LCMStage(Stage):
    """Latent consistency distillation as PixArt-δ: teacher = the base with CFG (LCM form; w = LCM_GUIDANCE, 3.5
    here where PixArt-δ has 4.5), one
    DDIM step over the 50-point grid (skip 20), EMA target (decay 0.95), Huber loss c = 0.001; the
    student starts from the base. Its outputs are c_skip·x_t + c_out·x0 with kernels/pixart/lcm.py's
    boundary scalings, so the LCM sampler node reproduces what it learned."""

    def setup(self):
        models = self.out / "models"
        if not (models / "diffusion_models" / "PixArt-XL-2-1024-MS.pth").exists():
            raise SystemExit("stage lcm needs the base: run --stage base first (same --out)")
        self.teacher = load_base_pth(models).requires_grad_(False)
        self.null = self.teacher.y_embedder.y_embedding.detach().clone()
        # the student starts from the base, or continues a distilled LCM (--init-from: its committed files);
        # the EMA target starts as the student
        start = load_lcm_transformer(Path(self.args.init_from)) if self.args.init_from else self.teacher
        self.student = copy.deepcopy(start).requires_grad_(True)
        frozen_micro_conditions(self.student)
        self.target = copy.deepcopy(start).requires_grad_(False)
        self.grid = torch.tensor(lcm_grid())

    def modules(self):
        return {"student": self.student, "target": self.target}

    def trained(self):
        return self.student

    def consistency(self, model, x, t, y, mask):
        """f(x, t) = c_skip x + c_out x0(ε); t is a tensor of grid timesteps (≥ 0)."""
        eps = eps_of(model, x, t, y, mask)
        a = self.ac[t].float()[:, None, None, None]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        c_skip, c_out = lcm_boundary_scalings(t)
        return c_skip.float()[:, None, None, None] * x + c_out.float()[:, None, None, None] * x0

    def train_step(self, b):
        x0 = full_latent(b["latents"])
        n = x0.shape[0]
        t = self.grid[torch.randint(0, len(self.grid), (n,), generator=self.gen)]
        if self.args.sampled_share:
            # a share of the rows at the timesteps the 4-step graph samples: its last step returns the student's
            # x0 at t = 259 unchanged, so the error there is what the picture shows
            at = torch.tensor(LCM_SAMPLED_TIMESTEPS)[torch.randint(0, 4, (n,), generator=self.gen)]
            t = torch.where(torch.rand(n, generator=self.gen) < self.args.sampled_share, at, t)
        s = t - LCM_SKIP                                                  # -1 for t = 19: the data end
        xt, _ = self.noised(x0, t)
        y = caption_batch(self.t5, b["ids"], b["mask"], None, None)
        null = self.null[None, : y.shape[1]].expand_as(y)
        with torch.no_grad():
            e = eps_of(self.teacher, torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, null]),
                       torch.cat([b["mask"], b["mask"]]))
            ec, eu = e.chunk(2)
            eps = ec + self.args.guidance * (ec - eu)
            a_t = self.ac[t].float()[:, None, None, None]
            x0_hat = (xt - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            a_s = torch.where(s >= 0, self.ac[s.clamp(min=0)], torch.ones_like(s, dtype=torch.float64))
            a_s = a_s.float()[:, None, None, None]
            xs = a_s.sqrt() * x0_hat + (1 - a_s).sqrt() * eps
            target = self.consistency(self.target, xs, s.clamp(min=0), y, b["mask"])
            target = torch.where((s >= 0)[:, None, None, None], target, xs)
        pred = self.consistency(self.student, xt, t, y, b["mask"])
        return huber(pred, target)

    def after_step(self):
        ema_update(self.target, self.student, self.ema_decay)

    def save_files(self, models):
        return save_lcm_files(self.student, models)


class ControlNetStage(Stage):
    """PixArt-δ ControlNet-Transformer on the frozen base: copies of base blocks 0…K-1 (zero-initialised
    before/after projections), the control latent = the pixel VAE's latent of the Canny map (what core
    Apply ControlNet with the VAE hands our ControlNet), ε loss, caption dropout as the base."""

    def setup(self):
        from dit_control.kernels.pixart.controlnet import PixArtControlNet, block_config
        models = self.out / "models"
        if not (models / "diffusion_models" / "PixArt-XL-2-1024-MS.pth").exists():
            raise SystemExit("stage controlnet needs the base: run --stage base first (same --out)")
        self.base = load_base_pth(models).requires_grad_(False)
        self.null = self.base.y_embedder.y_embedding.detach().clone()
        cfg = self.base.config
        self.cfg = cfg
        blocks = max(1, cfg.depth // 2)            # CONTROL_BLOCKS for the default depth
        self.net = PixArtControlNet(blocks, block_config(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio))
        with torch.no_grad():
            for k, blk in enumerate(self.net.controlnet):
                blk.copied_block.load_state_dict(self.base.blocks[k].state_dict())
                torch.nn.init.zeros_(blk.after_proj.weight)
                torch.nn.init.zeros_(blk.after_proj.bias)
                if k == 0:
                    torch.nn.init.zeros_(blk.before_proj.weight)
                    torch.nn.init.zeros_(blk.before_proj.bias)
        if self.args.init_from:
            # continue from a committed ControlNet (its `controlnet.*` tensors are this module's state dict)
            ckpt = torch.load(Path(self.args.init_from) / "controlnet" / "PixArt-XL-2-1024-ControlNet.pth",
                              map_location="cpu", weights_only=True)["state_dict"]
            self.net.load_state_dict({k: v.float() for k, v in ckpt.items() if k.startswith("controlnet.")})
        tok = tokenizer()
        ids, mask = tokenize(tok, [""])
        self.empty_ids, self.empty_mask = ids[0].to(self.data["ids"].dtype), mask[0].bool()
        self.add_captions_without_places(tok)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)

    def modules(self):
        return {"net": self.net, "ema": self.ema}

    def trained(self):
        return self.net

    def train_step(self, b):
        x0 = full_latent(b["latents"])
        control = full_latent(b["edges"])
        n = x0.shape[0]
        t = self.split_noise_levels(n)
        xt, noise = self.noised(x0, t)
        # prompts: a caption of these scenes fixes the layout by itself, so with full captions only the ControlNet
        # had next to nothing to learn (edge F1 0.49 at strength 0 and 0.51 at 1 after 2000 steps); with "" the
        # base has no colours to draw, and drew low-contrast shapes (F1 ~0.1). Mostly the caption without its
        # places, so the layout must come from the edges and the colours from the prompt.
        ids, mask = self.prompts(b, CONTROLNET_PROMPTS["without_places"], CONTROLNET_PROMPTS["empty"])
        y = caption_batch(self.t5, ids, mask, None, None)
        eps = eps_of(self.base, xt, t, y, mask, control=self.net.branch(control))
        return self.split_loss(eps, noise, t, LOSS_WEIGHT_CAPS[-1][1])

    def after_step(self):
        ema_update(self.ema, self.net, self.warm_ema())

    def save_files(self, models):
        return save_controlnet_files(self.base, self.ema, models)


STAGE_CLASSES = {"base": BaseStage, "lcm": LCMStage, "controlnet": ControlNetStage}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=tuple(STAGES), required=True)
    p.add_argument("--out", required=True, help="output folder (checkpoints, curves, data cache, models/)")
    p.add_argument("--steps", type=int, default=0, help="total steps (default: the stage's)")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--decay-from", type=int, default=-1,
                   help="step from which the lr falls linearly to DECAY_TO (default: the stage's; 0: constant)")
    p.add_argument("--scenes", type=int, default=20000, help="training scenes (seeds 0…N-1), cached in OUT/data")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--jitter", type=float, default=None,
                   help="scenes.JITTER for this run's data (default: scenes.py's; the first 24000 base steps had 1)")
    p.add_argument("--init-from", default="",
                   help="models folder to start base / lcm student / controlnet from (a fine-tune: its steps, "
                        "lr schedule and loss-weight caps start again at step 0)")
    p.add_argument("--without-places", type=float, default=None,
                   help=f"base: share of captions without places (default {BASE_PROMPTS_WITHOUT_PLACES}; "
                        "the first two base runs had 0)")
    p.add_argument("--guidance", type=float, default=LCM_GUIDANCE,
                   help=f"lcm: the teacher's guidance w, cond + w·(cond − uncond) (default {LCM_GUIDANCE}, the base "
                        f"graph's CFG 4.5; PixArt-δ's is {CFG_DISTILLED}: see LCM_GUIDANCE)")
    p.add_argument("--sampled-share", type=float, default=0.0,
                   help="lcm: share of rows at the 4-step schedule's timesteps instead of the uniform grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--probe", type=int, default=0, help="timing probe: run this many steps, save nothing")
    p.add_argument("--hidden", type=int, default=0, help=f"base width (default {MICRO_PIXART['hidden_size']})")
    p.add_argument("--depth", type=int, default=0, help=f"base depth (default {MICRO_PIXART['depth']})")
    p.add_argument("--no-passthrough", action="store_true", help="plain DiT init (see passthrough_init)")
    p.add_argument("--patch", type=int, default=0, help=f"patch size (default {MICRO_PIXART['patch_size']})")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.jitter is not None:
        from dit_control.tests.training import scenes
        scenes.JITTER = args.jitter
        scenes.heldout_scenes.cache_clear()
        scenes.heldout_captions.cache_clear()
    return STAGE_CLASSES[args.stage](args, STAGES[args.stage]).run()


if __name__ == "__main__":
    main()
