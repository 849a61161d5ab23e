"""The tiny RelaCtrl checkpoint the RelaCtrl workflow and API tests run on, in the released full layout.

`make_relactrl(models_dir)` writes `controlnet/relactrl_pixart_canny_1024.pth` (the code default name of the
`qihoo360/RelaCtrl` "RelaCtrl_PixArt_Canny" weights): `{"state_dict": {base_model.* , controlnet.*}}` with a
tiny PixArtMS base (tests/generators/make_checkpoints.TINY_PIXART widths, so the tiny T5 conditions it, 1024-MS
micro-conditions and its stale `base_model.pos_embed`) of depth 21 — the least depth the release's placement
(last RGLC block after base block 19) fits — and the 11 RGLC blocks with the release's expert counts
G = 6,2,6,4,2,2,4,4,6,6,6 at width 144 (experts of 24 / 72 / 36 channels, 4 heads each). Seeded random
weights, every tensor non-zero (the zero-initialised projections of the release are drawn small instead, so
control shows). Idempotent: an existing file is left alone.

`save_relactrl_control_only` / `save_relactrl_base` split the same weights into the other accepted set-up
(a control-only file + a separate base), for the loader tests.

Usage: python tests/generators/make_relactrl_checkpoints.py [models_dir]   (default .comfy_host/models)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from dit_control.kernels.pixart.model import PixArtConfig  # noqa: E402
from dit_control.tests.generators.make_checkpoints import TINY_PIXART, random_pixart_pth_state_dict  # noqa: E402

RELACTRL_FILE = "relactrl_pixart_canny_1024.pth"
RELACTRL_EXPERTS = (6, 2, 6, 4, 2, 2, 4, 4, 6, 6, 6)     # G_k of the release
RELACTRL_DEPTH = 21
RELACTRL_SEED = 31
TINY_RELACTRL_BASE = PixArtConfig(sample_size=128, pe_interpolation=2.0, micro_condition=True,
                                  **{**TINY_PIXART, "depth": RELACTRL_DEPTH})


def relactrl_state_dict(seed: int = RELACTRL_SEED, base_cfg: PixArtConfig = TINY_RELACTRL_BASE) -> dict:
    """The full released naming: base_model.* (with the stale pos_embed) + controlnet.*."""
    from dit_control.kernels.pixart.relactrl import RelaCtrl, RelaCtrlConfig
    d = base_cfg.hidden_size
    widths = tuple(tuple([d // g] * g) for g in RELACTRL_EXPERTS)
    with torch.device("meta"):
        net = RelaCtrl(RelaCtrlConfig(hidden_size=d, expert_widths=widths))
    gen = torch.Generator().manual_seed(seed + 1000)
    control = {}
    for name, t in net.state_dict().items():
        fan_in = t.shape[1] if t.ndim >= 2 else t.shape[-1]
        # before/after projections are zero at initialisation upstream; small but non-zero here
        std = 0.02 if name.endswith("bias") else (0.3 if "_proj" in name else 1.0) / fan_in ** 0.5
        control[f"controlnet.{name[len('controlnet.'):]}"] = torch.randn(t.shape, generator=gen) * std
    base = random_pixart_pth_state_dict(base_cfg, seed)
    return {**{f"base_model.{k}": v for k, v in base.items()}, **control}


def _save(path: Path, sd: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": sd}, tmp)
    tmp.replace(path)


def make_relactrl(models_dir: Path) -> Path:
    """Write models_dir/controlnet/relactrl_pixart_canny_1024.pth (full layout) unless it exists."""
    path = Path(models_dir) / "controlnet" / RELACTRL_FILE
    if not path.exists():
        _save(path, relactrl_state_dict())
    return path


def save_relactrl_control_only(path: Path) -> Path:
    """The same control weights without base_model.* (load the base separately)."""
    path = Path(path)
    if not path.exists():
        _save(path, {k: v for k, v in relactrl_state_dict().items() if k.startswith("controlnet.")})
    return path


def save_relactrl_base(path: Path) -> Path:
    """The bundled base alone, as a PixArt .pth (what PixArt-XL-2-1024-MS.pth is for the real weights)."""
    path = Path(path)
    if not path.exists():
        _save(path, {k[len("base_model."):]: v for k, v in relactrl_state_dict().items()
                     if k.startswith("base_model.")})
    return path


if __name__ == "__main__":
    print(make_relactrl(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / ".comfy_host" / "models"))
