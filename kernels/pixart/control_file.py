"""The file around a PixArt control branch — the ControlNet-Transformer's and RelaCtrl's alike: its key prefixes,
the split of a full file into its bundled base and its branch, and the bundled base's strict check and loading.

A released full file holds `base_model.*` (a PixArt-α transformer, stale `pos_embed` table included) beside
`controlnet.*` (the branch); a control-only file holds the branch alone and runs on a base loaded separately.
Both families read their files through this module; what differs (the branch's own layout and shapes) stays in
controlnet.py and relactrl.py. Nothing here imports ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch.nn as nn

from ..checkpoint_io import CheckpointError
from .checkpoint import load_pixart, prepare_pixart, released_base_mismatch
from .model import PixArt, PixArtConfig

BASE_PREFIX = "base_model."
CONTROL_PREFIX = "controlnet."
ADAPTER_PREFIX = "controlnet_blocks."        # diffusers' PixArtControlNetAdapterModel

# Micro-condition embedders of a bundled PixArtMS base that the 512 ControlNet forward never calls
# (`ControlPixArtHalf`); the spec documents them as dead, so the strict check may drop them.
UNUSED_512_BASE_KEYS = tuple(f"{BASE_PREFIX}{e}.mlp.{i}.{p}" for e in ("csize_embedder", "ar_embedder")
                             for i in (0, 2) for p in ("weight", "bias"))
# Trained latent side of the 512 release; its base runs non-MS (lewei 1, square table) like the reference.
SAMPLE_SIZE_512 = 64


def split_control_file(sd: dict) -> tuple:
    """(base part without `base_model.`, control part incl. any stray keys, so the strict check names them)."""
    base, control = {}, {}
    for k, v in sd.items():
        if k.startswith(BASE_PREFIX):
            base[k[len(BASE_PREFIX):]] = v
        else:
            control[k] = v
    return base, control


class PreparedControlFile(NamedTuple):
    """What `prepare_pixart_controlnet` / `prepare_relactrl` hand their loaders."""
    control_state_dict: dict           # the branch (`controlnet.*` names), checked strictly
    base_state_dict: Optional[dict]    # the bundled base (names without `base_model.`), checked; None if none
    info: Any                          # ControlNetInfo / RelaCtrlInfo: what the checks found


@dataclass
class BundledBase:
    """The checked `base_model.*` part of a full file, or why it failed (`error`; the caller reports it together
    with the branch's own problems, so one message names everything). Empty for a control-only file."""
    state_dict: Optional[dict] = None
    config: Optional[PixArtConfig] = None
    layout: Optional[str] = None
    dropped: list = field(default_factory=list)    # documented dead keys removed, in the file's names
    notes: list = field(default_factory=list)
    error: Optional[str] = None


def prepare_bundled_base(base_sd: dict, num_heads: Optional[int] = None, sample_size: Optional[int] = None,
                         pe_interpolation: Optional[float] = None,
                         micro_condition: Optional[bool] = None) -> BundledBase:
    """Strictly check a full file's base part (names without `base_model.`). `num_heads` / `sample_size` /
    `pe_interpolation` go to its config inference (as for `prepare_pixart`); `micro_condition=None` runs a 512
    base (trained latent 64) as non-MS, like the reference 512 forward, dropping its unused csize/ar embedders."""
    bundled = BundledBase()
    if "pos_embed" in base_sd:
        bundled.dropped.append(BASE_PREFIX + "pos_embed")      # stale table; recomputed per size
    trained = sample_size
    if trained is None and "pos_embed" in base_sd and "x_embedder.proj.weight" in base_sd:
        # the stale square table [1, side², D] still tells the trained size, as in `infer_config`
        side = int(round(base_sd["pos_embed"].shape[-2] ** 0.5))
        trained = side * base_sd["x_embedder.proj.weight"].shape[-1]
    if micro_condition is None:
        micro_condition = trained != SAMPLE_SIZE_512 and "csize_embedder.mlp.0.weight" in base_sd
    if not micro_condition:
        unused = [k for k in UNUSED_512_BASE_KEYS if k[len(BASE_PREFIX):] in base_sd]
        for k in unused:
            base_sd.pop(k[len(BASE_PREFIX):])
        if unused:
            bundled.dropped.extend(unused)
            bundled.notes.append("the bundled base has PixArtMS micro-condition embedders that the 512 ControlNet "
                                 "forward never uses; they were dropped and the base runs as non-MS")
    try:
        bundled.state_dict, bundled.config, bundled.layout = prepare_pixart(
            base_sd, num_heads=num_heads, sample_size=sample_size, pe_interpolation=pe_interpolation,
            what="PixArt-α base bundled in the ControlNet file (names without base_model.)")
    except CheckpointError as e:
        bundled.error = str(e)
    return bundled


def load_bundled_base(base_sd: dict, info, operations=nn, dtype=None, device=None) -> PixArt:
    """The base model a full file carries, with the config its `prepare_*` settled on (`info.base_config`: a
    ControlNetInfo or RelaCtrlInfo)."""
    cfg = info.base_config
    if cfg is None:
        raise CheckpointError(f"{info.describe()}: the file carries no base model; load one separately")
    return load_pixart(base_sd, operations=operations, dtype=dtype, device=device, num_heads=cfg.num_heads,
                       sample_size=cfg.sample_size, pe_interpolation=cfg.pe_interpolation)


def base_config_of(base, branch: str) -> PixArtConfig:
    """The PixArtConfig of `base` (a PixArt model or its config); anything else is refused naming the branch."""
    base_cfg = base.config if isinstance(base, PixArt) else base
    if not isinstance(base_cfg, PixArtConfig):
        raise CheckpointError(f"{branch} needs a PixArt-α base model; got {type(base).__name__}")
    return base_cfg


def check_fits_base(branch: str, base_cfg: PixArtConfig, width: int, released: Optional[PixArtConfig],
                    branch_problems: list) -> None:
    """The one base-fit check of a control branch: its width, what the branch kind itself needs of the base
    (`branch_problems`, already worded), and, for a file that carries its base, that `base_cfg` is that
    released base. Raises one CheckpointError naming everything that does not fit."""
    problems = []
    if width != base_cfg.hidden_size:
        problems.append(f"width {width} vs the base's {base_cfg.hidden_size}")
    problems.extend(branch_problems)
    mismatch = released_base_mismatch(released, base_cfg)
    if mismatch:
        problems.append(mismatch)
    if problems:
        raise CheckpointError(f"this {branch} does not fit the base model: " + "; ".join(problems))


def scales_skips(strength) -> bool:
    """Whether a skip must be multiplied by `strength`: anything but the literal 1 (a tensor strength always
    is: its value is not known without a device sync)."""
    return not (isinstance(strength, (int, float)) and strength == 1)
