"""Train the micro DiT4SR: the released DiT4SR architecture at tiny width, on super-resolution pairs of the
procedural scenes, in the SD3 pixel VAE's latent space (tests/training/README.md, "The micro DiT4SR").

Data: a scene rendered at 512 px is the high-resolution truth; its low-resolution input is degraded as
Real-ESRGAN-style Real-ISR training degrades (`degrade`): Gaussian blur, bicubic ×1/4, Gaussian noise,
JPEG. The input goes through DiT4SR Conditioning's own preparation (PIL bicubic ×4, `upscale_image`) and the
pixel VAE's encode (8× block means), exactly what the shipped graph hands the model. Latents are the 3 RGB
block-mean channels (the other 13 of SD3's 16 are zero for this VAE).

The model: DiT4SR (LR stream, cross-stream conv, context_pre_only last block) at 2 heads × 32, 4 blocks.
Two choices, both measured in the README:
- text is ignored by construction: `context_embedder` and the pooled text projection are zero and frozen,
  so any prompt — the shipped graph's positive and negative — gives the same prediction and CFG is a no-op;
- it trains on 256 px crops (32×32 latents: 666 tokens instead of 2202, ~4× cheaper a step) but runs on the
  shipped graph's 512 px tiles (64×64 latents, the centre 32×32 patches of the sin-cos table): each training
  crop adds a random 16×16 window of that centre (`RandomWindowPositions`), so every position a tile uses is
  trained and noise token k still meets LR token k at the same position.

    .venv/bin/python tests/training/train_dit4sr.py --out runs/dit4sr [--steps 3000] [--threads 1]

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

from dit_control.kernels.dit4sr.model import DiT4SR, DiT4SRConfig
from dit_control.kernels.dit4sr.preprocess import upscale_image
from dit_control.kernels.dit4sr.schedule import flow_match_sigmas
from dit_control.tests.training import metrics, scenes
from dit_control.tests.training.pixel_vae import sd3_decode_model_latent, sd3_encode_model_latent
from dit_control.tests.training.train import plot_curve, progress

MICRO_DIT4SR = dict(num_layers=4, num_heads=2, head_dim=32, ff_inner_dim=256, dual_attention_layers=(0, 1),
                    pos_embed_max_size=96, joint_attention_dim=4096, pooled_projection_dim=2048, sample_size=64)
HR_SIZE = 512                 # the truth; its ×4 input is 128 px, one 64-latent tile of the shipped graph
CROP = 32                     # training crops, in latent pixels (256 px)
SHIFT = 3.0                   # SD3's flow shift, as the shipped schedule
# Real-ISR degradation ranges (Real-ESRGAN's first order, within its ranges): blur σ in HR px, noise σ of
# 8-bit values, JPEG quality; the held-out evaluation uses one fixed middle setting
BLUR, NOISE, JPEG = (0.5, 3.0), (0.0, 20.0), (40, 95)
EVAL_DEGRADATION = (2.0, 15.0, 60)
TEXT_FROZEN = ("context_embedder.", "time_text_embed.text_embedder.linear_1.")
# the passthrough's path stays as set (passthrough_init): the RGB inputs in, block 0's subtraction, the RGB read-out;
# what trains are the corrections (attention, blocks 1-3, the modulations: 1/σ among them)
PASSTHROUGH_FROZEN = ("pos_embed.proj.", "transformer_blocks.0.ff.", "proj_out.")
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


def lr_model_latent(lr_u8: np.ndarray) -> torch.Tensor:
    """uint8 HWC input -> [1, 16, H/2, W/2]: DiT4SR Conditioning's ×4 preparation, then the pixel VAE."""
    image = torch.from_numpy(lr_u8.astype(np.float32) / 255.0)[None]
    up = upscale_image(image, 4)
    return sd3_encode_model_latent(up.movedim(-1, 1))


def hr_model_latent(hr: np.ndarray) -> torch.Tensor:
    return sd3_encode_model_latent(torch.from_numpy(hr).permute(2, 0, 1)[None])


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


class RandomWindowPositions:
    """Training only: the patch embedding adds a random window of the table's centre TILE_GRID² instead of the
    centre crop (one window per batch; noise and LR halves share it, as they share positions at inference)."""
    TILE_GRID = 32            # patches of a 64-latent tile

    def __init__(self, embed, gen: torch.Generator):
        self.embed, self.gen, self.window = embed, gen, None
        embed.cropped_table = self.cropped_table

    def next_batch(self):
        self.window = None

    def cropped_table(self, h: int, w: int) -> torch.Tensor:
        size = self.embed.max_size
        centre = (size - self.TILE_GRID) // 2
        if self.window is None:
            top, left = (int(torch.randint(self.TILE_GRID - n + 1, (1,), generator=self.gen)) for n in (h, w))
            self.window = (centre + top, centre + left)
        top, left = self.window
        table = self.embed.pos_embed.reshape(1, size, size, -1)
        return table[:, top:top + h, left:left + w, :].reshape(1, h * w, -1)


def new_model(seed: int) -> DiT4SR:
    from dit_control.tests.generators.make_dit4sr_checkpoints import sincos_table
    torch.manual_seed(seed)
    cfg = DiT4SRConfig(**MICRO_DIT4SR)
    model = DiT4SR(cfg)
    with torch.no_grad():
        model.pos_embed.pos_embed.copy_(sincos_table(cfg.hidden_size, cfg.pos_embed_max_size))
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
                         and not name.startswith(PASSTHROUGH_FROZEN))
    return model


PASSTHROUGH_CHANNELS = 8      # residual channels that carry the constant (the LayerNorms become fixed scales)
PASSTHROUGH_RADIUS = 240.0    # its norm, far above the signal's and the positions' (|pos| ≈ 5.7)
GELU_SHIFT = 10.0             # pre-activation offset: GELU-tanh is the identity to 1e-20 there


def passthrough_init(model: DiT4SR, gen: torch.Generator):
    """Start the micro DiT4SR as the flow whose every x0 estimate is the LR latent: v = (x_t − L)/σ, so that
    sampling returns the input's latent (PSNR ≈ the pixel VAE alone) and training learns corrections.

    Why: from a normal initialisation the x0 estimate at σ = 0.9 was still 20× worse than copying the LR latent
    after 500 steps (v- or x0-scored): the noise token k has to find LR token k (attention by position, or the FF
    conv), through LayerNorms that divide every token by its own norm. As in the micro PixArt's passthrough:
    - the patch embedding writes the 12 RGB inputs of a token (3 channels × 2×2) into orthonormal columns U
      (⟂ the all-ones direction) and its bias a constant c of norm R on PASSTHROUGH_CHANNELS channels (zero
      mean), so each LayerNorm is (nearly) a fixed scale;
    - block 0's FF, gated at 1, its pre-activations shifted into GELU's linear range: inner group A (the
      non-constant channels) cancels the residual stream's own signal and positions; inner group B reads U, and
      its depthwise conv (centre tap −1/1.2) subtracts the LR token's group B from the noise token's: the noise
      stream becomes c + κ·U(x_t − L) (positions cancel: both halves share them);
    - every attention gate and blocks 1-3 start at zero (adaLN-Zero identity);
    - the final modulation's scale is fitted (least squares on the random time features) to 1/σ − 1, and
      proj_out reads U back into the RGB outputs: v ≈ (x_t − L)/σ. The 13 other channels start at v = 0."""
    cfg = model.config
    d, p, inner = cfg.hidden_size, cfg.patch_size, cfg.ff_inner_dim
    k = PASSTHROUGH_CHANNELS
    rest = torch.arange(k, d)
    n_sig = 3 * p * p                                                # RGB inputs of a token
    raw = torch.randn(d - k, n_sig, generator=gen, dtype=torch.float64)
    raw -= raw.mean(0, keepdim=True)                                 # ⟂ ones
    u = torch.linalg.qr(raw).Q                                       # [d-k, 12] orthonormal, ⟂ ones
    g = 1.0
    c = torch.zeros(d, dtype=torch.float64)
    c[:k] = PASSTHROUGH_RADIUS / math.sqrt(k) * torch.tensor([(-1.0) ** i for i in range(k)], dtype=torch.float64)
    scale_ln = PASSTHROUGH_RADIUS / math.sqrt(d)                     # ≈ every image token's LayerNorm std
    group_a = torch.arange(n_sig, n_sig + d - k)                     # inner channels of group A
    if group_a[-1] >= inner:
        raise SystemExit(f"passthrough_init needs {n_sig + d - k} FF channels, the model has {inner}")
    block0 = model.transformer_blocks[0]
    with torch.no_grad():
        w = torch.zeros(d, cfg.in_channels, p, p, dtype=torch.float64)
        for ch in range(3):
            for i in range(p):
                for j in range(p):
                    w[rest, ch, i, j] = g * u[:, (ch * p + i) * p + j]
        model.pos_embed.proj.weight.copy_(w.float())
        model.pos_embed.proj.bias.copy_(c.float())
        for block in model.transformer_blocks:                       # adaLN-Zero: every block the identity
            block.norm1.linear.weight.zero_()
            block.norm1.linear.bias.zero_()
        # block 0's FF gate = 1 (chunk 5: shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, ...)
        block0.norm1.linear.bias[5 * d:6 * d].fill_(1.0)
        ff = block0.ff
        w0 = torch.zeros(inner, d, dtype=torch.float64)
        w0[:n_sig, rest] = u.T                                       # group B: the signal coordinates
        w0[group_a[:, None], rest[None, :]] = torch.eye(d - k, dtype=torch.float64)   # group A: non-constant channels
        ff.net[0].proj.weight.copy_(w0.float())
        ff.net[0].proj.bias.zero_()
        ff.net[0].proj.bias[:n_sig + d - k] = GELU_SHIFT
        ff.control_conv.weight.zero_()
        ff.control_conv.bias.zero_()
        ff.control_conv.weight[:n_sig, 0, 1, 1] = -1.0 / cfg.conv_factor
        w2 = torch.zeros(d, inner, dtype=torch.float64)
        w2[rest, :n_sig] = scale_ln * u                              # + U (x_t − L) on the noise half
        w2[rest[:, None], group_a[None, :]] = -scale_ln * torch.eye(d - k, dtype=torch.float64)
        ff.net[2].weight.copy_(w2.float())
        # group A's shift comes back as −scale_ln·GELU_SHIFT on the rest channels: cancel it (the noise half's
        # group B shift is cancelled by the conv; the LR half keeps +GELU_SHIFT on U, never read)
        ff.net[2].bias.zero_()
        ff.net[2].bias[rest] = scale_ln * GELU_SHIFT
        # the final modulation: shift 0, scale(σ) fitted to 1/σ − 1 on this model's random time features
        # (relative error; the shipped 20-step schedule's σ weighted 30×, where sampling reads it)
        shipped = flow_match_sigmas(20, SHIFT)[:-1].double()
        sig = torch.cat([shipped, torch.linspace(0.005, 1.0, 200, dtype=torch.float64)])
        weight = torch.cat([torch.full_like(shipped, 30.0), torch.ones(200, dtype=torch.float64)])
        zeros = no_text(sig.shape[0])[1]
        feats = torch.nn.functional.silu(model.time_text_embed(sig * 1000, zeros, torch.float32)).double()
        a = torch.cat([feats, torch.ones(sig.shape[0], 1, dtype=torch.float64)], dim=1) * (sig * weight)[:, None]
        fit = torch.linalg.lstsq(a, (1.0 / sig - 1.0) * sig * weight).solution
        model.norm_out.linear.weight.zero_()
        model.norm_out.linear.bias.zero_()
        model.norm_out.linear.weight[:d] = fit[:-1].float()[None].expand(d, -1)
        model.norm_out.linear.bias[:d] = float(fit[-1])
        # proj_out: (1/scale_ln) Uᵀ back to the RGB outputs in unpatchify order ((i·p + j)·C + ch)
        out = torch.zeros(p * p * cfg.out_channels, d, dtype=torch.float64)
        for ch in range(3):
            for i in range(p):
                for j in range(p):
                    out[(i * p + j) * cfg.out_channels + ch, rest] = scale_ln / g * u[:, (ch * p + i) * p + j]
        model.proj_out.weight.copy_(out.float())
        model.proj_out.bias.zero_()


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


def evaluate(model: DiT4SR, count: int = 8, steps: int = 20) -> dict:
    """PSNR and edge F1 against the truth on held-out scenes, for the model, bicubic and the input's latent
    decoded as it is (the pixel VAE alone)."""
    rows = []
    for i in range(count):
        hr, lr = pair(scenes.HELDOUT_SEED0 + i, EVAL_DEGRADATION)
        lat = lr_model_latent(lr)
        out = sd3_decode_model_latent(upscale(model, lat, steps))[0].permute(1, 2, 0).numpy()
        bicubic = upscale_image(torch.from_numpy(lr.astype(np.float32) / 255.0)[None], 4)[0].numpy()
        vae_only = sd3_decode_model_latent(lat)[0].permute(1, 2, 0).numpy()
        edges = scenes.edge_map(hr)
        rows.append([metrics.psnr(out, hr), metrics.psnr(bicubic, hr), metrics.psnr(vae_only, hr),
                     metrics.image_edge_f1(out, edges), metrics.image_edge_f1(bicubic, edges),
                     metrics.image_edge_f1(vae_only, edges)])
    m = np.mean(rows, axis=0)
    keys = ("psnr", "psnr_bicubic", "psnr_vae_only", "f1", "f1_bicubic", "f1_vae_only")
    return {k: round(float(v), 3) for k, v in zip(keys, m)}


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
    passthrough_init(model, torch.Generator().manual_seed(args.seed))
    ema = new_model(args.seed)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    positions = RandomWindowPositions(model.pos_embed, gen)
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
    while step < args.steps:
        lr_now = args.lr * min(1.0, (step + 1) / 200) * (0.1 if step >= args.decay_from else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_now
        x0, lr_lat = batch(data, args.batch, gen)
        positions.next_batch()
        u = torch.rand(x0.shape[0], generator=gen)
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        ctx, pooled = no_text(x0.shape[0])
        v = model.forward_single(xt, sigma * 1000, ctx, pooled, lr_lat)
        # scored in x0 (σ²-weighted flow loss): plain v-MSE weighs 1/σ² and is ruled by the lowest noise levels,
        # where the answer is x_t itself; the high levels, where the picture must come from the LR latent, got
        # next to no gradient (README: 12 dB after 500 steps with it)
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
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-count", type=int, default=8)
    train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
