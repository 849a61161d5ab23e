"""Install the committed micro demo model (tests/training/weights/) into a ComfyUI models folder.

The weights were trained here by tests/training/train.py (README: "The micro demo model"); they are
committed in the released key layouts and file names, fp16, minus what is derived exactly from them, to keep
the repository small:
- diffusion_models/PixArt-XL-2-1024-MS.pth            committed (the base, original .pth layout);
- diffusion_models/PixArt-XL-2-512x512.pth            derived: the same network without its (zero, frozen)
                                                      size embedders, with the 512 file's stale pos_embed;
- diffusion_models/PixArt-LCM-XL-2-1024-MS/transformer/  committed (diffusers layout + config.json);
- controlnet/PixArt-XL-2-1024-ControlNet.pth          committed as its `controlnet.*` tensors; the installed
                                                      file is the released full layout, `base_model.*` = the
                                                      base file's tensors (the ControlNet was trained on it);
- vae/sd-vae-ft-ema.safetensors                       made: the pixel VAE (tests/training/pixel_vae.py);
- text_encoders/t5xxl_fp16.safetensors                made by tests/generators/make_checkpoints.py from the same seed
                                                      the captions were encoded with (not touched here).

The micro DiT4SR (tests/training/train_dit4sr.py), installed by `install_micro_dit4sr`:
- diffusion_models/dit4sr_q/transformer/              committed (released diffusers layout + config.json);
- vae/sd3.5_vae.safetensors                           made: the SD3 pixel VAE (tests/training/pixel_vae.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

WEIGHTS = Path(__file__).resolve().parent / "weights"
BASE = Path("diffusion_models") / "PixArt-XL-2-1024-MS.pth"
BASE_512 = Path("diffusion_models") / "PixArt-XL-2-512x512.pth"
LCM = Path("diffusion_models") / "PixArt-LCM-XL-2-1024-MS" / "transformer"
CONTROLNET = Path("controlnet") / "PixArt-XL-2-1024-ControlNet.pth"
VAE = Path("vae") / "sd-vae-ft-ema.safetensors"
DIT4SR = Path("diffusion_models") / "dit4sr_q" / "transformer"
DIT4SR_FILES = (DIT4SR / "diffusion_pytorch_model.safetensors", DIT4SR / "config.json")
SD3_VAE = Path("vae") / "sd3.5_vae.safetensors"
SIZE_EMBEDDERS = ("csize_embedder.", "ar_embedder.")


def available() -> bool:
    """True when the committed micro model is complete (base, LCM and ControlNet)."""
    return all((WEIGHTS / p).exists() for p in (BASE, LCM / "diffusion_pytorch_model.safetensors",
                                                 LCM / "config.json", CONTROLNET))


def digest() -> str:
    """A short content hash of the committed weights: the models cache is remade when they change."""
    import hashlib
    h = hashlib.sha256()
    for p in (BASE, LCM / "diffusion_pytorch_model.safetensors", LCM / "config.json", CONTROLNET):
        h.update((WEIGHTS / p).read_bytes())
    for p in DIT4SR_FILES if dit4sr_available() else ():
        h.update((WEIGHTS / p).read_bytes())
    return h.hexdigest()[:12]


def dit4sr_available() -> bool:
    """True when the micro DiT4SR is committed."""
    return all((WEIGHTS / p).exists() for p in DIT4SR_FILES)


def install_micro_dit4sr(models_dir: Path) -> bool:
    """Write the micro DiT4SR and the SD3 pixel VAE into `models_dir`; False (nothing written) when the
    micro DiT4SR is not committed."""
    if not dit4sr_available():
        return False
    from dit_control.tests.training.pixel_vae import save_pixel_vae
    for rel in DIT4SR_FILES:
        (models_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(WEIGHTS / rel, models_dir / rel)
    save_pixel_vae(models_dir / SD3_VAE, sd3=True)
    return True


def non_ms_state_dict(ms: dict) -> dict:
    """The 512 (non-MS) file of the same network: size embedders dropped (they must be exactly zero in
    output, else the two files would differ) and the stale pos_embed of a 64-latent grid."""
    from dit_control.kernels.pixart.model import pos_embed_2d
    for k in ("csize_embedder.mlp.2.weight", "csize_embedder.mlp.2.bias", "ar_embedder.mlp.2.weight",
              "ar_embedder.mlp.2.bias"):
        if k in ms and ms[k].abs().max() != 0:
            raise RuntimeError(f"{k} is not zero: the 512 file would not be the same network as the 1024-MS one")
    sd = {k: v for k, v in ms.items() if not k.startswith(SIZE_EMBEDDERS)}
    hidden = sd["x_embedder.proj.weight"].shape[0]
    grid = 64 // sd["x_embedder.proj.weight"].shape[-1]
    sd["pos_embed"] = pos_embed_2d(hidden, grid, grid, grid, 1.0)[None].to(sd["pos_embed"].dtype)
    return sd


def install_micro_model(models_dir: Path) -> bool:
    """Write the micro model's files into `models_dir`; False (nothing written) when it is not committed."""
    if not available():
        return False
    from dit_control.tests.training.pixel_vae import save_pixel_vae
    models_dir = Path(models_dir)
    for rel in (BASE, LCM / "diffusion_pytorch_model.safetensors", LCM / "config.json"):
        (models_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(WEIGHTS / rel, models_dir / rel)
    base = torch.load(WEIGHTS / BASE, map_location="cpu", weights_only=True)["state_dict"]
    torch.save({"state_dict": non_ms_state_dict(base)}, models_dir / BASE_512)
    control = torch.load(WEIGHTS / CONTROLNET, map_location="cpu", weights_only=True)["state_dict"]
    full = {f"base_model.{k}": v for k, v in base.items()}
    full.update(control)
    (models_dir / CONTROLNET).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": full}, models_dir / CONTROLNET)
    save_pixel_vae(models_dir / VAE)
    return True


def commit_from(run: Path):
    """Copy a training run's files (train.py's DIR/models) into tests/training/weights/ (what is committed),
    with each stage's record: DIR/<stage>/loss.png and report.json as weights/<stage>_loss.png, _report.json."""
    run = Path(run)
    run_models = run / "models"
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    for stage in ("base", "lcm", "controlnet"):
        for name in ("loss.png", "report.json"):
            shutil.copyfile(run / stage / name, WEIGHTS / f"{stage}_{name}")
    for rel in (BASE, LCM / "diffusion_pytorch_model.safetensors", LCM / "config.json"):
        (WEIGHTS / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_models / rel, WEIGHTS / rel)
    full = torch.load(run_models / CONTROLNET, map_location="cpu", weights_only=True)["state_dict"]
    control = {k: v for k, v in full.items() if not k.startswith("base_model.")}
    base = torch.load(run_models / BASE, map_location="cpu", weights_only=True)["state_dict"]
    bundled = {k[len("base_model."):]: v for k, v in full.items() if k.startswith("base_model.")}
    if bundled.keys() != base.keys() or any(not torch.equal(bundled[k], base[k]) for k in base):
        raise SystemExit("the ControlNet's bundled base is not the base file: retrain the ControlNet on this base")
    (WEIGHTS / CONTROLNET).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": control}, WEIGHTS / CONTROLNET)


if __name__ == "__main__":
    import sys
    commit_from(Path(sys.argv[1]))
    print(f"copied {sys.argv[1]} into {WEIGHTS}")
