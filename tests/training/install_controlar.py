"""Install the committed micro ControlAR (tests/training/weights/controlar/) into a ComfyUI models folder.

Trained here by tests/training/train_controlar.py (README: "ControlAR micro"); committed fp16 in the released
layout and file name, minus what is derived exactly from it:
- controlar/canny_MR.safetensors        committed (flat ControlAR T2I file, block size 2304);
- controlar/hed.safetensors             derived: the same network, its zeros buffer `condition_mlp.uncond_embedding`
                                        at 1024 rows (the 512-px models' token budget, and so their 32-wide RoPE
                                        grid) — exactly how the trainer writes its two files;
- controlar/vq_ds16_t2i.pt              made: the palette VQ-16 (tests/training/palette_vq.py);
- text_encoders/flan-t5-xl/             made: the contextual tiny T5 the captions were encoded with
                                        (make_checkpoints.save_context_t5, the micro PixArt's, seed 4) as HF shards.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

WEIGHTS = Path(__file__).resolve().parent / "weights" / "controlar"
COMMITTED = "canny_MR.safetensors"
DERIVED = {"hed.safetensors": 1024}        # file -> block size (rows of condition_mlp.uncond_embedding)
VQ_FILE = "vq_ds16_t2i.pt"
T5_FOLDER = "flan-t5-xl"
T5_SEED = 4                                # tests/training/train.py T5_SEED: make_all's t5xxl_fp16.safetensors


def available() -> bool:
    return (WEIGHTS / COMMITTED).exists()


def digest() -> str:
    """A short content hash of the committed file: the models cache is remade when it changes."""
    return hashlib.sha256((WEIGHTS / COMMITTED).read_bytes()).hexdigest()[:12]


def with_block_size(sd: dict, block: int) -> dict:
    out = dict(sd)
    ref = sd["condition_mlp.uncond_embedding"]
    out["condition_mlp.uncond_embedding"] = torch.zeros(block, ref.shape[1], dtype=ref.dtype)
    return out


def install_controlar_micro(models_dir: Path) -> bool:
    """Write the micro ControlAR's files into `models_dir`; False (nothing written) when it is not committed."""
    if not available():
        return False
    import safetensors.torch

    from dit_control.tests.generators.make_checkpoints import save_context_t5, shard_t5
    from dit_control.tests.training.palette_vq import save_palette_vq
    models_dir = Path(models_dir)
    folder = models_dir / "controlar"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(WEIGHTS / COMMITTED, folder / COMMITTED)
    sd = safetensors.torch.load_file(str(WEIGHTS / COMMITTED))
    for name, block in DERIVED.items():
        safetensors.torch.save_file(with_block_size(sd, block), str(folder / name))
    save_palette_vq(folder / VQ_FILE)
    single = models_dir / "text_encoders" / f".{T5_FOLDER}-single.safetensors"
    save_context_t5(single, seed=T5_SEED)
    shutil.rmtree(models_dir / "text_encoders" / T5_FOLDER, ignore_errors=True)
    shard_t5(single, models_dir / "text_encoders" / T5_FOLDER)
    single.unlink()
    return True


def commit_from(run: Path):
    """Copy a training run's file (train_controlar.py's DIR/models/controlar/canny_MR.safetensors) and its
    record (DIR/controlar/loss.png, report.json) into tests/training/weights/controlar/."""
    run = Path(run)
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "models" / "controlar" / COMMITTED, WEIGHTS / COMMITTED)
    for name in ("loss.png", "report.json"):
        shutil.copyfile(run / "controlar" / name, WEIGHTS / name)


if __name__ == "__main__":
    import sys
    commit_from(Path(sys.argv[1]))
    print(f"copied {sys.argv[1]} into {WEIGHTS}")
