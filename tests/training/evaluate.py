"""Measure what the trained micro model draws, in this process (no server): caption adherence on the held-out
captions and ControlNet++'s edge F1, with the samplers of the shipped workflows re-done on our kernels.

    python tests/training/evaluate.py --out DIR [--stage base|lcm|controlnet|all] [--count 64]

- base: DPM-Solver++(2M), 20 steps, `simple` σ schedule (every 50th of the model's 1000 σ, as core's
  `simple` scheduler), CFG 4.5 against the learned null caption — the pixart_alpha_t2i workflow's sampler;
- lcm: 4 LCM steps (kernels/pixart/lcm.py, diffusers rule), cfg 1 — the main job's sampler;
- controlnet: the base sampler with the ControlNet at strengths 0 / 0.5 / 1 on each held-out scene's
  Canny map, prompted with the scene's caption without places (as the ControlNet workflow and its tests);
- empty caption: the same samplers on "" (chance level expected).
`--compute-dtype bf16` runs T5 and the transformers as the loaders' compute_dtype bf16 does (weights stored and
multiplied in bf16, activations bf16; the sampler's arithmetic and the decode stay fp32, as in ComfyUI).
Images are decoded with the pixel VAE's exact map (an 8× nearest upsample) and scored with
tests/training/metrics.py. Writes DIR/eval.json and DIR/eval_<stage>.png (a grid of the first samples).
The API tests that come later measure the same through ComfyUI; this is the trainer's own yardstick.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from dit_control.kernels.pixart.lcm import ddpm_alphas_cumprod, lcm_sample, lcm_timesteps
from dit_control.tests.training.metrics import caption_agreement, image_edge_f1
from dit_control.tests.training.pixel_vae import decode_model_latent, encode_model_latent
from dit_control.tests.training.scenes import edge_map, heldout_scenes, render
from dit_control.tests.training.train import (
    LATENT,
    TOKENS,
    ensure_t5,
    load_lcm_transformer,
    load_t5,
    tokenize,
    tokenizer,
    write_png,
)

AC = ddpm_alphas_cumprod(dtype=torch.float64)
SIGMAS = ((1 - AC) / AC).sqrt()                       # k-diffusion σ of each training timestep


def encode(t5, tok, captions):
    ids, mask = tokenize(tok, captions, TOKENS)
    with torch.no_grad():
        return t5(ids, mask, dtype=t5.shared.weight.dtype), mask


def eps_model(model, y, mask, null=None, cfg=1.0, control=None):
    """ε(x_t, t) with optional CFG against the null caption (masked like the positive, as the node does), computed
    in the model's dtype (inputs cast as ComfyUI's BaseModel casts them), returned in fp32."""
    dtype = model.x_embedder.proj.weight.dtype
    y = y.to(dtype)

    def fn(x, t):
        tt = torch.full((x.shape[0],), int(t))
        x = x.to(dtype)
        with torch.no_grad():
            if null is None or cfg == 1.0:
                return model(x, tt, y, mask, control=control)[:, :4].float()
            n = null[None, : y.shape[1]].expand_as(y).to(dtype)
            e = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, n]), torch.cat([mask, mask]),
                      control=control)[:, :4].float()
            ec, eu = e.chunk(2)
            return eu + cfg * (ec - eu)
    return fn


def dpmpp_2m(eps_fn, shape, steps: int, gen: torch.Generator) -> torch.Tensor:
    """k-diffusion DPM-Solver++(2M) on the discrete schedule with core's `simple` σ spacing; returns x0."""
    idx = [int(round(999 - i * 1000 / steps)) for i in range(steps)]
    sigmas = [float(SIGMAS[i]) for i in idx] + [0.0]
    x = torch.randn(shape, generator=gen) * math.sqrt(1 + sigmas[0] ** 2)   # full-strength start

    def denoise(x, i):
        s = sigmas[i]
        eps = eps_fn(x / math.sqrt(1 + s * s), idx[i])
        return x - s * eps
    old = None
    for i in range(steps):
        d = denoise(x, i)
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            x = d
            break
        t, t_next = -math.log(s), -math.log(s_next)
        h = t_next - t
        if old is None:
            x = (s_next / s) * x - math.expm1(-h) * d
        else:
            h_last = t - (-math.log(sigmas[i - 1]))
            r = h_last / h
            x = (s_next / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
    return x


def lcm(eps_fn, shape, steps: int, gen: torch.Generator) -> torch.Tensor:
    ts = lcm_timesteps(steps)
    x = torch.randn(shape, generator=gen)
    return lcm_sample(eps_fn, x, ts, AC, lambda i, x: torch.randn(x.shape, generator=gen))


def images_of(latent: torch.Tensor) -> list:
    return [im.permute(1, 2, 0).numpy() for im in decode_model_latent(latent.float())]


def grid_png(path: Path, images: list, cols: int = 8):
    rows = math.ceil(len(images) / cols)
    h, w, _ = images[0].shape
    sheet = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
    write_png(path, sheet)


def load_models(out: Path, dtype=torch.float32):
    from dit_control.kernels.checkpoint_io import read_state_dict
    from dit_control.kernels.pixart.checkpoint import load_pixart
    from dit_control.kernels.pixart.control_file import load_bundled_base
    from dit_control.kernels.pixart.controlnet import load_pixart_controlnet, prepare_pixart_controlnet
    models = out / "models"
    got = {}
    base_path = models / "diffusion_models" / "PixArt-XL-2-1024-MS.pth"
    if base_path.exists():
        got["base"] = load_pixart({k: v.float() for k, v in read_state_dict(str(base_path)).items()}).eval()
    lcm_path = models / "diffusion_models" / "PixArt-LCM-XL-2-1024-MS" / "transformer" / \
        "diffusion_pytorch_model.safetensors"
    if lcm_path.exists():
        got["lcm"] = load_lcm_transformer(models)
    cn_path = models / "controlnet" / "PixArt-XL-2-1024-ControlNet.pth"
    if cn_path.exists():
        control, base_sd, info = prepare_pixart_controlnet(
            {k: v.float() for k, v in read_state_dict(str(cn_path)).items()})
        base = load_bundled_base(base_sd, info).eval()
        got["controlnet"] = (base, load_pixart_controlnet(control, base, info=info).eval())
    for name, m in got.items():
        got[name] = tuple(part.to(dtype) for part in m) if isinstance(m, tuple) else m.to(dtype)
    return got


def at_scene_size(image: np.ndarray) -> np.ndarray:
    """An image of k·256 px block-averaged to the 256 px the metrics read (identity at 256)."""
    k = image.shape[0] // LATENT // 8
    if k <= 1:
        return image
    h, w, c = image.shape
    return image.reshape(h // k, k, w // k, k, c).mean(axis=(1, 3))


def evaluate(out: Path, stages, count: int = 64, seed: int = 0, batch: int = 16, size: int = 8 * LATENT,
             compute_dtype: str = "fp32") -> dict:
    """`size`: the image size sampled (the model is trained at 256 px); pictures are scored at 256.
    `compute_dtype`: "fp32" or "bf16" (T5 and the transformers stored and computing in it)."""
    out = Path(out)
    torch.set_grad_enabled(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    t5, tok = load_t5(ensure_t5(out)).to(dtype), tokenizer()
    models = load_models(out, dtype)
    suffix = ("" if size == 8 * LATENT else f"_{size}") + ("" if compute_dtype == "fp32" else f"_{compute_dtype}")
    scenes = list(heldout_scenes())[:count]
    captions = [s.caption for s in scenes]
    shape = (1, 4, size // 8, size // 8)
    report = {}

    def run(sampler, model_fn, caps, tag, control_latents=None, strength=1.0):
        gen = torch.Generator().manual_seed(seed)
        imgs = []
        for k in range(0, len(caps), batch):
            chunk = caps[k:k + batch]
            y, mask = encode(t5, tok, chunk)
            model = model_fn[0] if isinstance(model_fn, tuple) else model_fn
            null = model.y_embedder.y_embedding if hasattr(model.y_embedder, "y_embedding") else None
            control = None
            if control_latents is not None:
                # CFG doubles the batch (cond, uncond): the control latent repeats, as in core's batches;
                # match_control_latent repeats whole copies of the batch
                control = model_fn[1].branch(control_latents[k:k + batch], strength)
            if sampler == "lcm":
                fn = eps_model(model, y, mask)
                x0 = lcm(fn, (len(chunk),) + shape[1:], 4, gen)
            else:
                fn = eps_model(model, y, mask, null=null, cfg=4.5, control=control)
                x0 = dpmpp_2m(fn, (len(chunk),) + shape[1:], 20, gen)
            imgs += [at_scene_size(im) for im in images_of(x0)]
        grid_png(out / f"eval_{tag}{suffix}.png", imgs[:32])
        return imgs

    if "base" in stages and "base" in models:
        imgs = run("dpm", models["base"], captions, "base")
        empty = run("dpm", models["base"], [""] * min(count, 16), "base_empty")
        report["base_dpmpp2m_20_cfg4.5"] = float(np.mean([caption_agreement(i, c) for i, c in zip(imgs, captions)]))
        report["base_empty_caption"] = float(np.mean([caption_agreement(i, c) for i, c in zip(empty, captions)]))
    if "lcm" in stages and "lcm" in models:
        imgs = run("lcm", models["lcm"], captions, "lcm")
        empty = run("lcm", models["lcm"], [""] * min(count, 16), "lcm_empty")
        report["lcm_4_cfg1"] = float(np.mean([caption_agreement(i, c) for i, c in zip(imgs, captions)]))
        report["lcm_empty_caption"] = float(np.mean([caption_agreement(i, c) for i, c in zip(empty, captions)]))
    if "controlnet" in stages and "controlnet" in models:
        gts = [render(s) for s in scenes]
        controls = [edge_map(g) for g in gts]
        lat = torch.cat([encode_model_latent(torch.from_numpy(e)[None, None].expand(1, 3, -1, -1))
                         for e in controls])
        for strength in (0.0, 0.5, 1.0):
            imgs = run("dpm", models["controlnet"], [s.caption_without_places for s in scenes],
                       f"controlnet_{strength}", lat, strength)
            report[f"controlnet_edge_f1_strength_{strength}"] = float(
                np.mean([image_edge_f1(i, c) for i, c in zip(imgs, controls)]))
    report["size"] = size
    report["compute_dtype"] = compute_dtype
    (out / f"eval{suffix}.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stage", default="all", choices=("base", "lcm", "controlnet", "all"))
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=8 * LATENT, help="image size to sample at (trained: 256)")
    p.add_argument("--compute-dtype", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = ("base", "lcm", "controlnet") if args.stage == "all" else (args.stage,)
    print(json.dumps(evaluate(Path(args.out), stages, args.count, size=args.size,
                              compute_dtype=args.compute_dtype), indent=1))


if __name__ == "__main__":
    main()
