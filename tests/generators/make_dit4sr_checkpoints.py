"""DiT4SR test files (issue 12), made by our own code in the released layouts (nothing is downloaded):

- diffusion_models/dit4sr_q/transformer/: the micro DiT4SR trained here (tests/training/train_dit4sr.py, committed)
  where it is committed, else a tiny random DiT4SR transformer; both in acceptee/DiT4SR's diffusers layout —
  the released key names (dead attn2 tensors included), F16 base + F32 control tensors as released, and its
  config.json. Small width and depth (2 heads × 32, 4 blocks: 0–1 dual attention, 3 context_pre_only) but SD3's
  text widths (joint 4096, pooled 2048), so core's SD3 conditioning shapes go in unchanged;
- diffusion_models/dit4sr_random/transformer/: the tiny random DiT4SR, always (its text projections are not zero,
  so the kernel-parity test sees CFG and the pooled text at work);
- diffusion_models/dit4sr_bad/: an SD3.5-style base transformer without the control tensors, and a truncated
  DiT4SR file (the bad-input tests; the FLUX-like file is conftest's broken/flux1-dev-like.safetensors);
- vae/sd3.5_vae.safetensors: a FULL-SIZE SD3 VAE (kl-f8, 16 latent channels, no quant convs, ldm names — what
  core's VAELoader reads as SD3's VAE; core fixes its width): the hand-set SD3 pixel VAE with the micro DiT4SR
  (tests/training/pixel_vae.py), else random weights;
- text_encoders/clip_g.safetensors: a placeholder (TripleCLIPLoader's name in the shipped workflow; never
  loaded: the API tests use tests/host_probe's SD3 conditioning stand-in; clip_l / t5xxl_fp16 exist already);
- input images for the workflow (`write_dit4sr_inputs`).

`dit4sr_state_dict(cfg)` also makes the full-size 2.9 B model (random weights, real layout) for the benchmark.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dit_control.kernels.dit4sr.checkpoint import DEAD_TENSOR_PARTS
from dit_control.kernels.dit4sr.model import DiT4SR, DiT4SRConfig
from dit_control.tests.training.install import install_micro_dit4sr

TINY_DIT4SR = dict(num_layers=4, num_heads=2, head_dim=32, ff_inner_dim=256, dual_attention_layers=(0, 1),
                   pos_embed_max_size=96, joint_attention_dim=4096, pooled_projection_dim=2048, sample_size=128)
DIT4SR_FOLDER = "dit4sr_q/transformer"
RANDOM_DIT4SR_FOLDER = "dit4sr_random/transformer"
SD3_VAE_NAME = "sd3.5_vae.safetensors"
INPUTS = {"dit4sr_input.png": (96, 128), "dit4sr_input_small.png": (40, 32),     # name: (width, height)
          "dit4sr_input_500.png": (500, 500)}                                    # ×4: the 2000² case


def sincos_table(dim: int, size: int) -> torch.Tensor:
    """[1, size², dim] 2-D sin-cos positions (half the channels for each axis), as SD3's stored table."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(size, dtype=torch.float64)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")

    def axis(p):
        args = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.cat([axis(xx), axis(yy)], dim=1)[None].float()


def dead_shapes(cfg: DiT4SRConfig) -> dict:
    d, hd = cfg.hidden_size, cfg.head_dim
    shapes = {}
    for i in cfg.dual_attention_layers:
        for part in DEAD_TENSOR_PARTS:
            name = f"transformer_blocks.{i}.attn2.{part}"
            shapes[name] = (hd,) if part.startswith("norm_") else ((d, d) if part.endswith("weight") else (d,))
    return shapes


def dit4sr_shapes(cfg: DiT4SRConfig, dead: bool = True) -> dict:
    """{name: shape} of a released-layout file for `cfg` (dead attn2 tensors included unless dead=False)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DiT4SR(cfg).state_dict().items()}
    if dead:
        shapes.update(dead_shapes(cfg))
    return shapes


def released_dtype(name: str) -> torch.dtype:
    """The release's storage: F32 for every `*control*` tensor, F16 for the SD3.5 base."""
    return torch.float32 if "control" in name else torch.float16


def dit4sr_tensors(cfg: DiT4SRConfig, seed: int, dead: bool = True):
    """(name, tensor) in name order, one at a time: seeded random weights in the released naming and dtypes;
    every tensor non-zero (upstream zero-initialises the control projections and the conv, which would hide
    bugs). One at a time, so the full-size 2.9 B model can be streamed to a file (the graph benchmark)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = dit4sr_shapes(cfg, dead)
    for name in sorted(shapes):
        shape = shapes[name]
        if name == "pos_embed.pos_embed":
            t = sincos_table(cfg.hidden_size, cfg.pos_embed_max_size)
        elif name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            gain = 0.5 if ".norm1" in name or "norm_out" in name else 1.0      # moderate AdaLN modulation
            t = torch.randn(shape, generator=gen) * (gain / fan_in ** 0.5)
        yield name, t.to(released_dtype(name)).contiguous()


def dit4sr_state_dict(cfg: DiT4SRConfig, seed: int, dead: bool = True) -> dict:
    """`dit4sr_tensors` as one dict."""
    return dict(dit4sr_tensors(cfg, seed, dead))


def stream_dit4sr_safetensors(path: Path, cfg: DiT4SRConfig, seed: int) -> Path:
    """`dit4sr_tensors` written straight into a .safetensors file (8-byte header length, JSON header, raw
    little-endian data): memory stays at one tensor, where safetensors' save_file holds the file twice."""
    import json as _json
    names_shapes = sorted(dit4sr_shapes(cfg).items())
    header, offset = {}, 0
    for name, shape in names_shapes:
        dtype = released_dtype(name)
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": "F32" if dtype == torch.float32 else "F16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = _json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                                   # the format aligns the data to 8 bytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _name, t in dit4sr_tensors(cfg, seed):
            f.write(t.numpy().tobytes())
    return path


def diffusers_config(cfg: DiT4SRConfig) -> dict:
    return {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0",
            "attention_head_dim": cfg.head_dim, "caption_projection_dim": cfg.hidden_size,
            "dual_attention_layers": list(cfg.dual_attention_layers), "in_channels": cfg.in_channels,
            "joint_attention_dim": cfg.joint_attention_dim, "num_attention_heads": cfg.num_heads,
            "num_layers": cfg.num_layers, "out_channels": cfg.out_channels, "patch_size": cfg.patch_size,
            "pooled_projection_dim": cfg.pooled_projection_dim, "pos_embed_max_size": cfg.pos_embed_max_size,
            "qk_norm": "rms_norm", "sample_size": cfg.sample_size}


def save_dit4sr_folder(folder: Path, cfg: DiT4SRConfig, seed: int) -> Path:
    """A released-layout `transformer/` folder: diffusion_pytorch_model.safetensors + config.json."""
    import safetensors.torch
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(dit4sr_state_dict(cfg, seed), str(weights))
    (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
    return weights


def save_sd35_base(path: Path, cfg: DiT4SRConfig, seed: int):
    """An SD3.5-style diffusers base transformer: DiT4SR's file without its control tensors and dead ones."""
    import safetensors.torch
    sd = {k: v for k, v in dit4sr_state_dict(cfg, seed, dead=False).items() if "control" not in k}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))


def save_random_sd3_vae(path: Path, seed: int):
    """Full-size SD3 VAE, random weights: the same kl-f8 16-channel architecture as FLUX's `ae`."""
    import safetensors.torch

    from dit_control.tests.generators.make_checkpoints import _random_like, flux_vae_shapes
    sd = _random_like(flux_vae_shapes(), seed, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.to(torch.float16) for k, v in sd.items()}, str(path))


def write_dit4sr_inputs(input_dir: Path):
    """Low-resolution photos for the workflow, drawn: non-square, smooth shading plus some edges."""
    from PIL import Image, ImageDraw
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    for name, (w, h) in INPUTS.items():
        img = Image.new("RGB", (w, h), (110, 150, 190))
        d = ImageDraw.Draw(img)
        d.rectangle([0, int(h * 0.65), w, h], fill=(80, 120, 60))
        d.polygon([(w * 0.2, h * 0.65), (w * 0.2, h * 0.4), (w * 0.5, h * 0.2), (w * 0.8, h * 0.4),
                   (w * 0.8, h * 0.65)], fill=(190, 160, 140))
        d.ellipse([w * 0.75, h * 0.05, w * 0.95, h * 0.25], fill=(250, 220, 120))
        img.save(input_dir / name)


def make_dit4sr_files(models_dir: Path):
    models_dir = Path(models_dir)
    dm = models_dir / "diffusion_models"
    cfg = DiT4SRConfig(**TINY_DIT4SR)
    bad = dm / "dit4sr_bad"
    # the micro DiT4SR trained here (tests/training/train_dit4sr.py) with the SD3 pixel VAE where it is
    # committed, else random tiny weights and a random full-size SD3 VAE
    if not install_micro_dit4sr(models_dir):
        save_dit4sr_folder(dm / DIT4SR_FOLDER, cfg, seed=30)
        save_random_sd3_vae(models_dir / "vae" / SD3_VAE_NAME, seed=32)
    # random weights that read their text (the micro model's text projections are zero): the kernel-parity test
    save_dit4sr_folder(dm / RANDOM_DIT4SR_FOLDER, cfg, seed=30)
    save_sd35_base(bad / "sd3.5_medium_base_no_control.safetensors", cfg, seed=31)
    data = (dm / DIT4SR_FOLDER / "diffusion_pytorch_model.safetensors").read_bytes()
    (bad / "dit4sr_truncated.safetensors").write_bytes(data[: len(data) // 2])
    import safetensors.torch
    te = models_dir / "text_encoders"
    te.mkdir(parents=True, exist_ok=True)
    for name in ("clip_g.safetensors", "clip_l.safetensors"):
        if not (te / name).exists():
            safetensors.torch.save_file({"placeholder": torch.zeros(1)}, str(te / name))
