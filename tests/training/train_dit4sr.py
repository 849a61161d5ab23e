"""Train the micro DiT4SR: the released DiT4SR architecture at tiny width, on super-resolution pairs of the
procedural scenes, in the SD3 pixel VAE's latent space (tests/training/README.md, "The micro DiT4SR").

Data: a scene rendered at 512 px is the high-resolution truth; its low-resolution input is degraded as
Real-ESRGAN-style Real-ISR training degrades (`degrade`): Gaussian blur, bicubic ×1/4, Gaussian noise,
JPEG. The input goes through DiT4SR Conditioning's own preparation (PIL bicubic ×4, `upscale_image`) and the
pixel VAE's encode (8× block means), exactly what the shipped graph hands the model. Latents are the 3 RGB
block-mean channels (the other 13 of SD3's 16 are zero for this VAE).

The model: DiT4SR (LR stream, cross-stream conv, context_pre_only last block) at 2 heads × 32, 4 blocks, trained in
two stages (README, "The micro DiT4SR"):
1. a linear restorer fitted in closed form — least squares from each LR token's 3×3 token neighbourhood to the
   truth's token, over every token of the training pairs (`fit_linear_restorer`) — set into block 0 by hand
   (`restorer_init`): every x0 estimate of the model is then x̂ = W·N(L) + b, and 20-step Euler returns it;
1b. (the committed file, `--nonlinear 1`, the default) 256 random GELU features of each LR token set into blocks
   1-2 (`features_init`), fitted jointly with the linear part (`fit_restorer`) and set (`nonlinear_init`):
   x̂ = W·N(L) + b + W_nl·φ(L);
2. SGD on the corrections (blocks 1–3, attention; on stage 1 alone, `--nonlinear 0`), as a regression inside the
   flow: x_t is built around x̂ and noise, never the truth, at the low-noise end of the schedule where sampling
   reads the estimate; scored in x0.
Text is ignored by construction: `context_embedder` and the pooled text projection are zero and frozen, so any
prompt — the shipped graph's positive and negative — gives the same prediction and CFG is a no-op. The positional
table is zero (SR is local: the cross-stream conv gives the neighbourhood), so 256 px training crops and the
graph's 512 px tiles are the same problem.

    .venv/bin/python tests/training/train_dit4sr.py --out runs/dit4sr --steps 0   # stages 1 + 1b: the committed file
    .venv/bin/python tests/training/train_dit4sr.py --out runs/dit4sr --nonlinear 0 [--steps 3000] [--threads 1]

Resumable (OUT/ckpt.pt); writes OUT/models/dit4sr_q/transformer/ (released layout, fp16 base + fp32
control tensors, config.json), OUT/loss.png and OUT/report.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dit_control.kernels.dit4sr.model import DiT4SR, DiT4SRConfig
from dit_control.kernels.dit4sr.preprocess import upscale_image
from dit_control.kernels.dit4sr.schedule import flow_match_sigmas
from dit_control.tests.training import metrics, scenes
from dit_control.tests.training.pixel_vae import decode_model_latent, encode_model_latent
from dit_control.tests.training.train import plot_curve, progress

MICRO_DIT4SR = dict(num_layers=4, num_heads=2, head_dim=32, ff_inner_dim=256, dual_attention_layers=(0, 1),
                    pos_embed_max_size=96, joint_attention_dim=4096, pooled_projection_dim=2048, sample_size=64)
HR_SIZE = 512                 # the truth; its ×4 input is 128 px, one 64-latent tile of the shipped graph
CROP = 32                     # training crops, in latent pixels (256 px)
SHIFT = 3.0                   # SD3's flow shift, as the shipped schedule
# Real-ISR degradation (Real-ESRGAN's first order: blur σ ≤ 3 HR px, Gaussian noise σ ≤ 30 of 8-bit values, JPEG
# ≥ 30), its heavier half: blur σ, noise σ, JPEG quality drawn uniformly in these ranges. The held-out evaluation
# uses one fixed heavy setting inside them; README's table scores lighter ones too (where the pixel VAE's 8× block
# means, not the model, cap the picture below bicubic)
BLUR, NOISE, JPEG = (2.0, 3.0), (10.0, 30.0), (30, 60)
EVAL_DEGRADATION = (3.0, 25.0, 30)
TEXT_FROZEN = ("context_embedder.", "time_text_embed.text_embedder.linear_1.")
# the restorer stays as set (restorer_init): the RGB inputs in, block 0's linear restorer, the time embedding and the
# final 1/σ modulation read from it, the RGB read-out; what SGD trains are the corrections (attention, blocks 1-3)
RESTORER_FROZEN = ("pos_embed.", "transformer_blocks.0.ff.", "transformer_blocks.0.norm1.", "proj_out.", "norm_out.",
                   "time_text_embed.")
TRAIN_SIGMAS = (0.005, 0.3)   # the σ range the corrections train on
DATA_SEED0 = 5_000_000        # training scenes (held-out scenes are scenes.HELDOUT_SEED0 + i)


def degrade(hr: np.ndarray, blur: float, noise: float, quality: int, rng: np.random.Generator) -> np.ndarray:
    """HWC float [0, 1] truth -> uint8 input at 1/4 size: blur, bicubic ×1/4, Gaussian noise, JPEG."""
    x = cv2.GaussianBlur(hr, (0, 0), blur, borderType=cv2.BORDER_REFLECT)
    h, w = hr.shape[:2]
    x = cv2.resize(x, (w // 4, h // 4), interpolation=cv2.INTER_CUBIC)
    x = x + rng.normal(0.0, noise / 255.0, x.shape).astype(np.float32)
    u8 = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encode failed")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def bicubic_x4(lr_u8: np.ndarray) -> np.ndarray:
    """uint8 HWC input -> float HWC [0, 1]: DiT4SR Conditioning's own ×4 preparation (its `upscaled` output), the
    bicubic every score is compared with."""
    return upscale_image(torch.from_numpy(lr_u8.astype(np.float32) / 255.0)[None], 4)[0].numpy()


def lr_model_latent(lr_u8: np.ndarray) -> torch.Tensor:
    """uint8 HWC input -> [1, 16, H/2, W/2]: DiT4SR Conditioning's ×4 preparation, then the pixel VAE."""
    return hr_model_latent(bicubic_x4(lr_u8))


def hr_model_latent(image: np.ndarray) -> torch.Tensor:
    """float HWC [0, 1] -> [1, 16, H/8, W/8]: the SD3 pixel VAE's latent (its mean)."""
    return encode_model_latent(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], 16)


def decoded(latent: torch.Tensor) -> np.ndarray:
    """[1, 16, h, w] -> float HWC [0, 1]: the SD3 pixel VAE's decode."""
    return decode_model_latent(latent)[0].permute(1, 2, 0).numpy()


def pair(seed: int, degradation=None) -> tuple:
    """(truth HWC float, input uint8) of scene `seed` at HR_SIZE, degraded at random (or as given)."""
    rng = np.random.default_rng(seed)
    hr = scenes.render(scenes.training_scene(seed) if seed < scenes.HELDOUT_SEED0 else scenes.scene_from_seed(seed),
                       HR_SIZE)
    if degradation is None:
        degradation = (rng.uniform(*BLUR), rng.uniform(*NOISE), int(rng.integers(JPEG[0], JPEG[1] + 1)))
    return hr, degrade(hr, *degradation, rng)


def build_dataset(out: Path, count: int) -> dict:
    cache = out / f"data_{count}.pt"
    if cache.exists():
        return torch.load(cache)
    hr_l, lr_l, t0 = [], [], time.time()
    for i in range(count):
        hr, lr = pair(DATA_SEED0 + i)
        hr_l.append(hr_model_latent(hr)[0, :3].half())
        lr_l.append(lr_model_latent(lr)[0, :3].half())
        if i % 50 == 0 or i == count - 1:
            progress("data", i + 1, count, t0)
    data = {"hr": torch.stack(hr_l), "lr": torch.stack(lr_l)}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def new_model(seed: int) -> DiT4SR:
    """The micro DiT4SR before its restorer is set: positional table zero (below), RMSNorm scales 1, the text
    projections zero, every block the identity once restorer_init has run."""
    torch.manual_seed(seed)
    cfg = DiT4SRConfig(**MICRO_DIT4SR)
    model = DiT4SR(cfg)
    with torch.no_grad():
        # no positions: super-resolution is local, the restorer reads a token's 3×3 neighbourhood through block 0's
        # conv, and a position term would leak into that read-out (a neighbour's position is not the token's own)
        model.pos_embed.pos_embed.zero_()
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.fill_(1.0)                                      # RMSNorm scales (torch.empty in the kernel)
        for name, p in model.named_parameters():
            if name.startswith(TEXT_FROZEN) and name.endswith("weight"):
                p.zero_()
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    for name, p in model.named_parameters():
        p.requires_grad_(not (name.startswith(TEXT_FROZEN) and name.endswith("weight"))
                         and not name.startswith(RESTORER_FROZEN))
    return model


# ---- the linear restorer: x̂ = W · (the LR latent's 3×3 token neighbourhood) + b, fitted in closed form ----

TAPS = 9                      # a token's 3×3 neighbourhood (offsets (dy, dx) in {-1, 0, 1}², row-major)
TOKEN_VALUES = 12             # the RGB latent values of one 2×2 patch, in the patch embedding's (ch, i, j) order


def tokens(latent: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB latent -> [B, 12, H/2, W/2]: each 2×2 patch's values in (ch, i, j) order."""
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def untokens(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `tokens`."""
    b, _, h, w = t.shape
    return t.reshape(b, 3, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, 3, h * 2, w * 2)


def neighbourhood(t: torch.Tensor) -> torch.Tensor:
    """[B, 12, h, w] -> [B, 9·12 + 1, h, w]: the 3×3 neighbours' values (zero beyond the grid, as block 0's conv
    pads), tap-major, and a constant 1."""
    p = F.pad(t, (1, 1, 1, 1))
    h, w = t.shape[-2:]
    taps = [p[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    return torch.cat(taps + [torch.ones_like(t[:, :1])], dim=1)


def ridge_fit(data: dict, features, ridge: float) -> torch.Tensor:
    """W [F, 12]: ridge least squares from features(LR RGB latents) [B, F, h, w] to the truth's tokens, over every
    token of the training pairs (normal equations in float64, a batch of scenes at a time)."""
    xtx = xty = None
    for s in range(0, data["lr"].shape[0], 100):
        x = features(data["lr"][s:s + 100].float())
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
        y = tokens(data["hr"][s:s + 100].float()).permute(0, 2, 3, 1).reshape(-1, TOKEN_VALUES).double()
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
        xty = x.T @ y if xty is None else xty + x.T @ y
    return torch.linalg.solve(xtx + ridge * torch.eye(xtx.shape[0], dtype=torch.float64), xty)


def fit_linear_restorer(data: dict, ridge: float = 1e-3) -> torch.Tensor:
    """W [9·12 + 1, 12]: from the LR latent's neighbourhoods to the truth's tokens."""
    return ridge_fit(data, lambda lr: neighbourhood(tokens(lr)), ridge)


def identity_restorer() -> torch.Tensor:
    """The W of x̂ = L (the centre tap): the model then returns its input's latent."""
    w = torch.zeros(TAPS * TOKEN_VALUES + 1, TOKEN_VALUES, dtype=torch.float64)
    centre = TAPS // 2
    w[centre * TOKEN_VALUES:(centre + 1) * TOKEN_VALUES] = torch.eye(TOKEN_VALUES, dtype=torch.float64)
    return w


def apply_restorer(w: torch.Tensor, lr_latent: torch.Tensor) -> torch.Tensor:
    """x̂ of the RGB latent [B, 3, H, W] in plain torch (what the set model computes): for checks."""
    feats = neighbourhood(tokens(lr_latent.float())).double()
    return untokens(torch.einsum("bfhw,fo->bohw", feats, w).float())


RESTORER_CHANNELS = 8         # residual channels that carry the constant (the LayerNorms become fixed scales)
RESTORER_RADIUS = 240.0       # its norm, far above the signal's (|U x| ≤ ~4): LayerNorm's scale moves < 1e-4
GELU_SHIFT = 10.0             # pre-activation offset: GELU-tanh is the identity to ~1e-11 there
CONSTANT_CUT = 10.0           # after block 0 the constant's norm is R/10: LayerNorm's scale then moves ≤ ~2 %
TIME_KNOTS = (0.004, 1.0)     # the time embedding's hinges span these σ (the shipped 20 steps end at 0.0089)
TIME_SLOPE = 1000.0           # β: each hinge's slope in σ


def restorer_init(model: DiT4SR, w: torch.Tensor, gen: torch.Generator):
    """Set the micro DiT4SR so that every x0 estimate is x̂ = W·N(L) + b, the linear restorer `w` applied to the
    LR latent L's token neighbourhoods: v = (x_t − x̂)/σ, so 20-step Euler returns x̂ exactly as it would any fixed
    estimate (its path is (1 − σ)·x̂ + σ·ε). The released architecture computes it as follows:
    - the patch embedding writes a token's 12 RGB values x into orthonormal columns U (⟂ the all-ones direction)
      and its bias a constant c of norm R on RESTORER_CHANNELS channels (zero mean): every token is c + U·x (no
      positions), so each LayerNorm is a fixed scale s = R/√D to ~1e-4;
    - block 0's FF (gated at 1, attention gates 0), in pairs of inner channels (+z + 10, −z + 10) read through
      GELU's linear range, so that their difference is exactly 2z and a zero-padded neighbour reads as 0:
      for each tap t and value i a pair reads x_i, and the depthwise conv adds the LR half's x_i at offset t to
      the noise half's; 12 more pairs read x_i with no conv. net.2 weighs the tap pairs by −U·W and the plain
      pairs by +U·ΣₜW, so the noise half's own x_t cancels and the update is −U·x̂; on the LR half every term
      cancels but the bias (216 + 24 = 240 of 256 channels);
    - blocks 1–3 start as the identity (adaLN-Zero), the corrections SGD may train;
    - the final modulation's scale is fitted (least squares on the random time features) to 1/σ − 1, and proj_out
      reads U back into the RGB outputs: v ≈ (x_t − x̂)/σ. The 13 other channels stay at v = 0."""
    cfg = model.config
    d, p, inner = cfg.hidden_size, cfg.patch_size, cfg.ff_inner_dim
    k = RESTORER_CHANNELS
    rest = torch.arange(k, d)
    n_sig = TOKEN_VALUES
    if 2 * n_sig * (TAPS + 1) > inner:
        raise SystemExit(f"restorer_init needs {2 * n_sig * (TAPS + 1)} FF channels, the model has {inner}")
    raw = torch.randn(d - k, n_sig, generator=gen, dtype=torch.float64)
    raw -= raw.mean(0, keepdim=True)                                 # ⟂ ones
    u = torch.zeros(d, n_sig, dtype=torch.float64)
    u[rest] = torch.linalg.qr(raw).Q                                 # [D, 12] orthonormal, ⟂ ones and c
    c = torch.zeros(d, dtype=torch.float64)
    c[:k] = RESTORER_RADIUS / math.sqrt(k) * torch.tensor([(-1.0) ** i for i in range(k)], dtype=torch.float64)
    s = RESTORER_RADIUS / math.sqrt(d)                               # every image token's LayerNorm std
    block0 = model.transformer_blocks[0]
    with torch.no_grad():
        emb = torch.zeros(d, cfg.in_channels, p, p, dtype=torch.float64)
        for ch in range(3):
            for i in range(p):
                for j in range(p):
                    emb[:, ch, i, j] = u[:, (ch * p + i) * p + j]
        model.pos_embed.proj.weight.copy_(emb.float())
        model.pos_embed.proj.bias.copy_(c.float())
        for block in model.transformer_blocks:                       # adaLN-Zero: every block the identity
            block.norm1.linear.weight.zero_()
            block.norm1.linear.bias.zero_()
        # block 0's FF gate = 1 (chunk 5: shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, ...)
        block0.norm1.linear.bias[5 * d:6 * d].fill_(1.0)
        ff = block0.ff
        w0 = torch.zeros(inner, d, dtype=torch.float64)
        b0 = torch.zeros(inner, dtype=torch.float64)
        conv = torch.zeros(inner, 1, 3, 3, dtype=torch.float64)
        w2 = torch.zeros(d, inner, dtype=torch.float64)
        wt = w[:-1].reshape(TAPS, n_sig, n_sig)                      # [tap, value in, value out]
        for t in range(TAPS + 1):                                   # tap pairs, then the plain pairs (t = TAPS)
            for i in range(n_sig):
                a = 2 * (t * n_sig + i)
                w0[a], w0[a + 1] = s * u[:, i], -s * u[:, i]         # z = ±x_i after the LayerNorm
                b0[a:a + 2] = GELU_SHIFT
                if t < TAPS:
                    conv[a:a + 2, 0, t // 3, t % 3] = 1.0 / cfg.conv_factor
                    col = -(u @ wt[t, i])                            # −U·W[t, i, :]
                else:
                    col = u @ wt[:, i].sum(0)                        # +U·Σₜ W[t, i, :]: the own x_t cancels
                w2[:, a], w2[:, a + 1] = col / 2, -col / 2
        ff.net[0].proj.weight.copy_(w0.float())
        ff.net[0].proj.bias.copy_(b0.float())
        ff.control_conv.weight.copy_(conv.float())
        ff.control_conv.bias.zero_()
        ff.net[2].weight.copy_(w2.float())
        # the bias: −U·b, and the constant cut to 1/CONSTANT_CUT of itself from here on (both halves), so that in
        # blocks 1–3 the signal is CONSTANT_CUT× larger beside it: their corrections train at ordinary weight sizes
        ff.net[2].bias.copy_((-(u @ w[-1]) - (1.0 - 1.0 / CONSTANT_CUT) * c).float())
        # the time embedding, set: D hinges silu(β·(κ_j − σ)) at knots κ_j spaced geometrically over TIME_KNOTS, σ
        # read off SD3's lowest sinusoid frequency (sin(f·1000σ)/(f·1000) = σ to 0.2 %); the text part zero. The
        # final modulation's scale is a ridge least-squares fit of 1/σ − 1 on them (through the second SiLU, as
        # computed): σ·(1 + scale) = 1 within 0.2 % from σ = 0.004 to 1, in fp16 as released. (The random time
        # features were 80 % off.)
        tte = model.time_text_embed
        lowest = math.exp(-math.log(10000.0) * 127 / 128)             # sin of it: the sinusoid's last column
        knots = torch.logspace(math.log10(TIME_KNOTS[0]), math.log10(TIME_KNOTS[1]), d, dtype=torch.float64)
        te = tte.timestep_embedder
        te.linear_1.weight.zero_()
        te.linear_1.weight[:, -1] = -TIME_SLOPE / (lowest * 1000)
        te.linear_1.bias.copy_((TIME_SLOPE * knots).float())
        te.linear_2.weight.copy_(torch.eye(d))
        te.linear_2.bias.zero_()
        for layer in (tte.text_embedder.linear_1, tte.text_embedder.linear_2):
            layer.weight.zero_()
            layer.bias.zero_()
        for layer in (te.linear_1, te.linear_2):                   # fitted on the weights as released (fp16)
            layer.weight.copy_(layer.weight.half().float())
            layer.bias.copy_(layer.bias.half().float())
        sig = torch.cat([torch.logspace(math.log10(TIME_KNOTS[0]), 0, 400, dtype=torch.float64)]
                        + [flow_match_sigmas(n, SHIFT)[:-1].double() for n in (4, 8, 10, 20, 30, 50)])
        feats = F.silu(tte(sig * 1000, no_text(sig.shape[0])[1], torch.float32)).double()
        a = torch.cat([feats, torch.ones(sig.shape[0], 1, dtype=torch.float64)], dim=1) * sig[:, None]
        fit = torch.linalg.solve(a.T @ a + 1e-8 * torch.eye(a.shape[1], dtype=torch.float64), a.T @ (1.0 - sig))
        model.norm_out.linear.weight.zero_()
        model.norm_out.linear.bias.zero_()
        model.norm_out.linear.weight[:d] = fit[:-1].float()[None].expand(d, -1)
        model.norm_out.linear.bias[:d] = float(fit[-1])
        # proj_out: (s / CONSTANT_CUT)·Uᵀ back to the RGB outputs in unpatchify order ((i·p + j)·C + ch)
        out = torch.zeros(p * p * cfg.out_channels, d, dtype=torch.float64)
        for ch in range(3):
            for i in range(p):
                for j in range(p):
                    out[(i * p + j) * cfg.out_channels + ch] = s / CONSTANT_CUT * u[:, (ch * p + i) * p + j]
        model.proj_out.weight.copy_(out.float())
        model.proj_out.bias.zero_()


# ---- stage 1b, non-linear: blocks 1-2 add W_nl · φ(L), random GELU features of each LR token, fitted jointly ----

NONLINEAR_BLOCKS = (1, 2)     # each gives ff_inner_dim / 2 features (a pair of FF channels per feature)
FEATURE_SCALE = 3.0           # φ_f = GELU(a_f · (L − b0) + c_f), a_f ~ N(0, scale²/12), c_f ~ N(0, (scale/2)²)


def random_features(model: DiT4SR, gen: torch.Generator) -> tuple:
    """(A [K, 12], c [K]) of K = ff_inner_dim / 2 features per non-linear block."""
    k = len(NONLINEAR_BLOCKS) * (model.config.ff_inner_dim // 2)
    a = torch.randn(k, TOKEN_VALUES, generator=gen, dtype=torch.float64) * FEATURE_SCALE / math.sqrt(TOKEN_VALUES)
    return a, torch.randn(k, generator=gen, dtype=torch.float64) * FEATURE_SCALE / 2


def basis(model: DiT4SR) -> torch.Tensor:
    """U [D, 12], read back from the patch embedding restorer_init set."""
    p = model.config.patch_size
    emb = model.pos_embed.proj.weight.detach().double()
    return torch.stack([emb[:, ch, i, j] for ch in range(3) for i in range(p) for j in range(p)], dim=1)


def features_init(model: DiT4SR, a: torch.Tensor, c: torch.Tensor):
    """Blocks 1-2's FF first half (gate 1): channel pair (2f, 2f + 1) both read φ_f of their token through the block's
    LayerNorm — the LR half holds c/CUT + U·(L − b0) after block 0, so w = std·(U·a_f) with std its LayerNorm's
    scale — and the depthwise conv brings the LR half's channel 2f (centre tap) to the noise half's. net.2 is set by
    `nonlinear_init`: +col on 2f and −col on 2f + 1, so the noise half gets col·φ(L) and its own φ cancels, the LR
    half nothing. Weights rounded to fp16 here (as released), so the features fitted are the ones computed."""
    cfg = model.config
    d, inner, half = cfg.hidden_size, cfg.ff_inner_dim, cfg.ff_inner_dim // 2
    std = RESTORER_RADIUS / CONSTANT_CUT / math.sqrt(d)
    u = basis(model)
    with torch.no_grad():
        for n, index in enumerate(NONLINEAR_BLOCKS):
            block = model.transformer_blocks[index]
            block.norm1.linear.bias[5 * d:6 * d].fill_(1.0)
            rows = std * (a[n * half:(n + 1) * half] @ u.T)            # [half, D]
            w0 = rows.repeat_interleave(2, dim=0)
            b0 = c[n * half:(n + 1) * half].repeat_interleave(2)
            block.ff.net[0].proj.weight.copy_(w0.half().float())
            block.ff.net[0].proj.bias.copy_(b0.half().float())
            conv = torch.zeros(inner, 1, 3, 3)
            conv[0::2, 0, 1, 1] = 1.0 / cfg.conv_factor
            block.ff.control_conv.weight.copy_(conv.half().float())
            block.ff.control_conv.bias.zero_()
            block.ff.net[2].weight.zero_()
            block.ff.net[2].bias.zero_()


@torch.no_grad()
def lr_features(model: DiT4SR, lr_latent: torch.Tensor) -> torch.Tensor:
    """φ [B, K, h, w] of the LR latent [B, 16, H, W] as blocks 1-2 read it, in plain torch from the model's tensors:
    the patch embedding, block 0's FF bias (all the LR half keeps of block 0), the LayerNorm, each block's net.0
    (the even channel of each pair)."""
    tokens = model.pos_embed.proj(lr_latent.float())                              # [B, D, h, w]
    tokens = tokens + model.transformer_blocks[0].ff.net[2].bias[None, :, None, None]
    normed = F.layer_norm(tokens.permute(0, 2, 3, 1), tokens.shape[1:2], eps=1e-6)
    out = [F.gelu(model.transformer_blocks[i].ff.net[0].proj(normed)[..., 0::2], approximate="tanh")
           for i in NONLINEAR_BLOCKS]
    return torch.cat(out, dim=-1).permute(0, 3, 1, 2)


def fit_restorer(model: DiT4SR, data: dict, ridge: float = 1e-3) -> torch.Tensor:
    """W [9·12 + 1 + K, 12]: from [the LR neighbourhood, 1, φ(L)] to the truth's tokens, φ as the model
    (restorer_init and features_init already run) computes them."""
    return ridge_fit(data, lambda lr: torch.cat([neighbourhood(tokens(lr)), lr_features(model, full16(lr))], 1), ridge)


def nonlinear_init(model: DiT4SR, w: torch.Tensor, block0_bias: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                   seed: int):
    """Set the model to x̂ = W_lin·N(L) + b1 + W_nl·φ(L) from the joint fit `w` (fit_restorer): restorer_init with the
    linear part but block 0's bias kept at b0 (the LR half the features read holds L − b0; the same seed, so the same
    U), features_init, then the linear part's own bias, as −U·(b1 − b0), into the last non-linear block's net.2 bias
    (after it nothing reads the LR half), and each feature f into its pair's net.2 columns ∓U·W_nl[f]."""
    n_lin = TAPS * TOKEN_VALUES + 1
    half = model.config.ff_inner_dim // 2
    lin = w[:n_lin].clone()
    lin[-1] = block0_bias
    restorer_init(model, lin, torch.Generator().manual_seed(seed))
    features_init(model, a, c)
    u = basis(model)
    with torch.no_grad():
        for n, index in enumerate(NONLINEAR_BLOCKS):
            block = model.transformer_blocks[index]
            cols = -(u @ w[n_lin + n * half:n_lin + (n + 1) * half].T)            # [D, half]: −U·W_nl[f]
            w2 = torch.zeros(model.config.hidden_size, 2 * half, dtype=torch.float64)
            w2[:, 0::2], w2[:, 1::2] = cols, -cols
            block.ff.net[2].weight.copy_(w2.float())
        last = model.transformer_blocks[NONLINEAR_BLOCKS[-1]].ff.net[2]
        last.bias.copy_((-(u @ (w[n_lin - 1] - block0_bias))).float())


def set_restorer(model: DiT4SR, data: dict, seed: int) -> torch.Tensor:
    """Stages 1 and 1b: the linear fit into block 0, random features into blocks 1-2, the joint fit over both, set.
    Returns the joint W."""
    linear = fit_linear_restorer(data)
    restorer_init(model, linear, torch.Generator().manual_seed(seed))
    a, c = random_features(model, torch.Generator().manual_seed(seed + 1))
    features_init(model, a, c)
    w = fit_restorer(model, data)
    nonlinear_init(model, w, linear[-1], a, c, seed)
    return w


def full16(three: torch.Tensor) -> torch.Tensor:
    return torch.cat([three.float(), torch.zeros(three.shape[0], 13, *three.shape[2:])], dim=1)


def no_text(b: int, dtype=torch.float32) -> tuple:
    """Any context of SD3's shapes (the model ignores it): zeros."""
    return torch.zeros(b, 154, 4096, dtype=dtype), torch.zeros(b, 2048, dtype=dtype)


@torch.no_grad()
def upscale(model: DiT4SR, lr_latent: torch.Tensor, steps: int = 20, seed: int = 0) -> torch.Tensor:
    """Euler on the reference's flow-match σ list (what the shipped KSampler euler/normal runs), one pass."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(lr_latent.shape, generator=gen)
    sigmas = flow_match_sigmas(steps, SHIFT)
    ctx, pooled = no_text(x.shape[0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = model.forward_single(x, torch.full((x.shape[0],), float(s) * 1000), ctx, pooled, lr_latent)
        x = x + (float(s_next) - float(s)) * v
    return x


def evaluate(model: DiT4SR, count: int = 8, steps: int = 20, degradation: tuple = EVAL_DEGRADATION) -> dict:
    """PSNR and edge F1 against the truth on held-out scenes, for the model, bicubic and the input's latent
    decoded as it is (the pixel VAE alone)."""
    rows = []
    for i in range(count):
        hr, lr = pair(scenes.HELDOUT_SEED0 + i, degradation)
        lat = lr_model_latent(lr)
        out, bicubic, vae_only = decoded(upscale(model, lat, steps)), bicubic_x4(lr), decoded(lat)
        edges = scenes.edge_map(hr)
        rows.append([metrics.psnr(out, hr), metrics.psnr(bicubic, hr), metrics.psnr(vae_only, hr),
                     metrics.image_edge_f1(out, edges), metrics.image_edge_f1(bicubic, edges),
                     metrics.image_edge_f1(vae_only, edges)])
    m = np.mean(rows, axis=0)
    keys = ("psnr", "psnr_bicubic", "psnr_vae_only", "f1", "f1_bicubic", "f1_vae_only")
    return {k: round(float(v), 3) for k, v in zip(keys, m)}


TABLE_DEGRADATIONS = ((1.0, 5.0, 90), (2.0, 10.0, 60), (2.0, 20.0, 50), (2.5, 20.0, 40), EVAL_DEGRADATION,
                      (3.0, 30.0, 30))


def degradation_table(model: DiT4SR, count: int = 8) -> list:
    """`evaluate` at several degradations (blur σ, noise σ, JPEG quality): the README's table."""
    rows = []
    for deg in TABLE_DEGRADATIONS:
        rows.append({"degradation": list(deg), **evaluate(model, count, degradation=deg)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def released_state_dict(model: DiT4SR) -> dict:
    """The released layout: F16 base, F32 `*control*` tensors, the 130-style dead attn2 tensors (zeros)."""
    from dit_control.tests.generators.make_dit4sr_checkpoints import dead_shapes, released_dtype
    sd = {k: v.detach().to(released_dtype(k)).contiguous() for k, v in model.state_dict().items()}
    for name, shape in dead_shapes(model.config).items():
        sd[name] = torch.zeros(shape, dtype=released_dtype(name))
    return sd


def export(model: DiT4SR, folder: Path) -> Path:
    import safetensors.torch

    from dit_control.tests.generators.make_dit4sr_checkpoints import diffusers_config
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(released_state_dict(model), str(weights))
    (folder / "config.json").write_text(json.dumps(diffusers_config(model.config), indent=2))
    return weights


def batch(data: dict, b: int, gen: torch.Generator) -> tuple:
    n, _, h, w = data["hr"].shape
    idx = torch.randint(n, (b,), generator=gen)
    ys = torch.randint(h - CROP + 1, (b,), generator=gen)
    xs = torch.randint(w - CROP + 1, (b,), generator=gen)
    hr = torch.stack([data["hr"][i, :, y:y + CROP, x:x + CROP] for i, y, x in zip(idx, ys, xs)])
    lr = torch.stack([data["lr"][i, :, y:y + CROP, x:x + CROP] for i, y, x in zip(idx, ys, xs)])
    flips = torch.randint(2, (2,), generator=gen)                    # one flip / transpose per batch
    if flips[0]:
        hr, lr = hr.flip(-1), lr.flip(-1)
    if flips[1]:
        hr, lr = hr.transpose(-1, -2), lr.transpose(-1, -2)
    return full16(hr), full16(lr)


def train(args):
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = build_dataset(out, args.scenes)
    model = new_model(args.seed)
    if args.nonlinear and args.fit_restorer:
        if args.steps > 0:
            raise SystemExit("stage 2 (--steps > 0) trains around the linear restorer: run it with --nonlinear 0")
        set_restorer(model, data, args.seed)
    else:
        restorer = fit_linear_restorer(data) if args.fit_restorer else identity_restorer()
        restorer_init(model, restorer, torch.Generator().manual_seed(args.seed))
    if args.table:                                  # the run's EMA (the stage-1 model when it has no checkpoint)
        if (out / "ckpt.pt").exists():
            model.load_state_dict(torch.load(out / "ckpt.pt", weights_only=False)["ema"])
        return degradation_table(model.eval(), args.eval_count)
    ema = new_model(args.seed)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    step, losses, evals, seconds = 0, [], [], 0.0
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, losses, evals, seconds = state["step"], state["losses"], state["evals"], state["seconds"]
        print(f"resumed at step {step}")
    channel_w = torch.zeros(1, 16, 1, 1)
    channel_w[:, :3] = 1.0           # the decoded RGB channels; the other 13 stay the initial noise, never read
    t0 = time.time() - seconds
    if not evals:                                                   # stage 1 alone: the fitted linear restorer
        evals.append({"step": 0, **evaluate(ema, count=args.eval_count)})
        print(evals[-1])
    while step < args.steps:
        lr_now = args.lr * min(1.0, (step + 1) / 200) * (0.1 if step >= args.decay_from else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_now
        x0, lr_lat = batch(data, args.batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        # x_t is built around block 0's estimate x̂ of the LR latent L, not the truth: (1 − σ)·x̂ + σ·ε, what the
        # sampler's own x_t is when every x0 estimate is (close to) x̂. Nothing in it tells more about x0 than L
        # does, so the network learns a regression on the LR stream, and sampling returns that estimate (Euler
        # with a fixed x0 estimate x̂ walks exactly (1 − σ)·x̂ + σ·ε). The 13 unread channels stay the initial
        # noise, as they do when sampling (their v starts at 0).
        # Only the low-noise end trains (σ log-uniform in TRAIN_SIGMAS): sampling's output is the last steps'
        # estimate (an earlier step's error is shrunk by σ_last/σ on the way), and there the 1/σ fit's few-%
        # error, times σ·|ε − x̂|, stays far below what the corrections have to learn
        lo, hi = (math.log(v) for v in TRAIN_SIGMAS)
        sigma = torch.exp(lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen))
        s = sigma[:, None, None, None]
        start = full16(apply_restorer(restorer, lr_lat[:, :3]))
        xt = torch.where(channel_w > 0, (1 - s) * start + s * noise, noise)
        ctx, pooled = no_text(x0.shape[0])
        v = model.forward_single(xt, sigma * 1000, ctx, pooled, lr_lat)
        # scored in x0 (the σ²-weighted flow loss): the error of the picture the sampler returns
        x0_pred = xt - s * v
        loss = (((x0_pred - x0) ** 2) * channel_w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        step += 1
        losses.append(float(loss))
        progress("dit4sr", step, args.steps, t0, f"loss {np.mean(losses[-50:]):.4f}")
        if step % args.save_every == 0 or step == args.steps:
            if step % args.eval_every == 0 or step == args.steps:
                evals.append({"step": step, **evaluate(ema, count=args.eval_count)})
                print(f"\n{evals[-1]}")
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "step": step, "losses": losses, "evals": evals,
                        "seconds": time.time() - t0}, ckpt)
    seconds = time.time() - t0
    weights = export(ema, out / "models" / "dit4sr_q" / "transformer")
    if losses:
        plot_curve(out / "loss.png", list(range(1, len(losses) + 1)), losses)
    report = {"steps": step, "batch": args.batch, "lr": args.lr, "seconds": round(seconds, 1),
              "threads": args.threads, "params": sum(p.numel() for p in ema.parameters()),
              "file_bytes": weights.stat().st_size, "evals": evals}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["evals"][-1:], indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--decay-from", type=int, default=10 ** 9)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--scenes", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-restorer", type=int, default=1,
                   help="1: block 0 starts as the least-squares linear restorer; 0: as x̂ = L (the input's latent)")
    p.add_argument("--nonlinear", type=int, default=1,
                   help="1: blocks 1-2 add random GELU features of each LR token, fitted jointly (stage 1b)")
    p.add_argument("--table", action="store_true", help="score OUT/ckpt.pt's EMA at several degradations, then stop")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-count", type=int, default=8)
    train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
