"""PixArt-δ ControlNet-Transformer: 13 copied PixArt blocks whose outputs feed the inputs of base blocks 1…13.

Lineage: PixArt-δ (arXiv 2401.05252, §ControlNet-Transformer), reference `ControlT2IDitBlockHalf` /
`ControlPixArtMSHalf` in PixArt-alpha/PixArt-alpha@cac2fd3b. Facts: ../shared/specs/controlnet_transformer.md.

There is no hint encoder: the control latent goes through the frozen base model's own patch embedder and
positional table, so the branch runs on top of the base model that `PixArt.forward` hands it. Weights
load in the released names (`controlnet.{k}.copied_block.*`, `controlnet.0.before_proj.*`,
`controlnet.{k}.after_proj.*`); the diffusers research adapter is renamed into them. Layers come from an
`operations` namespace (default `torch.nn`), as in kernels/pixart/model.py. Nothing here imports ComfyUI.

Addition to the reference: `strength` multiplies every skip (1 = reference, 0 = base model exactly).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from ..checkpoint_io import CheckpointError, assign_load, check_strict, describe_foreign, meta_shapes
from .checkpoint import block_to_original, detect_layout, variant_name
from .control_file import (
    ADAPTER_PREFIX,
    BASE_PREFIX,
    CONTROL_PREFIX,
    BundledBase,
    PreparedControlFile,
    base_config_of,
    check_fits_base,
    prepare_bundled_base,
    scales_skips,
    split_control_file,
)
from .model import BlockContext, ControlFn, PixArt, PixArtBlock, PixArtConfig

# ---------------------------------------------------------------------------------------------
#                                         The modules
# ---------------------------------------------------------------------------------------------

def block_config(hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> PixArtConfig:
    """The PixArtConfig a copied block needs (only width, heads and MLP width matter to a block)."""
    return PixArtConfig(hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio)


class ControlBlock(nn.Module):
    """One `ControlT2IDitBlockHalf`: a copy of base block k, a zero-initialised out-projection and, for
    k = 0 only, a zero-initialised in-projection of the control embedding."""

    def __init__(self, index: int, cfg: PixArtConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        d = cfg.hidden_size
        self.index = index
        self.copied_block = PixArtBlock(cfg, operations, **kw)
        if index == 0:
            self.before_proj = operations.Linear(d, d, **kw)
        self.after_proj = operations.Linear(d, d, **kw)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> tuple:
        """-> (new control tokens, skip for base block index + 1)."""
        if self.index == 0:
            # the only place the base stream enters the branch: tokens after base block 0
            c = x + self.before_proj(c)
        c = self.copied_block(c, ctx.t0, ctx.y, ctx.key_mask)
        return c, self.after_proj(c)


class PixArtControlNet(nn.Module):
    """The control branch; state-dict names are the released ones minus `base_model.`."""

    def __init__(self, num_blocks: int, cfg: PixArtConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.config = cfg
        self.controlnet = nn.ModuleList(ControlBlock(k, cfg, operations, dtype=dtype, device=device)
                                        for k in range(num_blocks))
        # set by the loader when the file bundled its own base (None: the file did not say)
        self.released_base: Optional[PixArtConfig] = None

    @property
    def num_blocks(self) -> int:
        return len(self.controlnet)

    def forward(self, base: PixArt, x: torch.Tensor, ctx: BlockContext, control_latent: torch.Tensor,
                strength: Union[float, torch.Tensor] = 1.0) -> dict:
        """Tokens after base block 0 [B, N, D] -> {base block index: skip [B, N, D]}."""
        if self.num_blocks + 1 > len(base.blocks):
            raise ValueError(f"this ControlNet has {self.num_blocks} blocks and feeds base blocks "
                             f"1…{self.num_blocks}, but the base model has only {len(base.blocks)} blocks")
        latent = match_control_latent(control_latent, x.shape[0], ctx.grid, base.config.patch_size)
        c = base.embed_latent(latent.to(x.device), x.dtype)    # base x_embedder + this size's table
        skips = {}
        for block in self.controlnet:
            c, skip = block(x, c, ctx)
            skips[block.index + 1] = skip * strength if scales_skips(strength) else skip
        return skips

    def branch(self, control_latent: torch.Tensor, strength: Union[float, torch.Tensor] = 1.0) -> "ControlBranch":
        """A ControlFn for `PixArt.forward(..., control=...)`."""
        return ControlBranch(self, control_latent, strength)


def match_control_latent(latent: torch.Tensor, batch: int, grid: tuple, patch_size: int) -> torch.Tensor:
    """The control latent repeated to the sampler's batch; its size must already equal the noisy latent's."""
    if latent.ndim != 4:
        raise ValueError(f"control latent must be [B, C, H, W], got shape {tuple(latent.shape)}")
    want = (grid[0] * patch_size, grid[1] * patch_size)
    if tuple(latent.shape[-2:]) != want:
        raise ValueError(f"control latent is {latent.shape[-2]}x{latent.shape[-1]} (H x W) but the noisy latent is "
                         f"{want[0]}x{want[1]}; resize the control image to the generation size before encoding")
    n = latent.shape[0]
    if n == batch:
        return latent
    if batch % n == 0:
        # ComfyUI stacks cond/uncond (and images) as whole copies of the batch, so repeat, not interleave
        return latent.repeat(batch // n, 1, 1, 1)
    raise ValueError(f"control latent batch {n} does not divide the sampler batch {batch}; "
                     f"give one control image or one per generated image")


class ControlBranch:
    """A ControlFn: one ControlNet, its control latent and strength."""

    def __init__(self, controlnet: PixArtControlNet, control_latent: torch.Tensor,
                 strength: Union[float, torch.Tensor] = 1.0):
        self.controlnet = controlnet
        self.control_latent = control_latent
        self.strength = strength

    def __call__(self, base: PixArt, x: torch.Tensor, ctx: BlockContext) -> dict:
        if isinstance(self.strength, (int, float)) and self.strength == 0:
            return {}  # nothing added: the base output bit for bit, and no control compute
        return self.controlnet(base, x, ctx, self.control_latent, self.strength)


def combine_controls(*fns: Optional[ControlFn]) -> Optional[ControlFn]:
    """Several control branches at once: their skips add up per base block (None entries are skipped)."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]

    def combined(base: PixArt, x: torch.Tensor, ctx: BlockContext) -> dict:
        total: dict = {}
        for fn in fns:
            for index, skip in fn(base, x, ctx).items():
                total[index] = total[index] + skip if index in total else skip
        return total

    return combined


# ---------------------------------------------------------------------------------------------
#                                   Layouts and strict loading
# ---------------------------------------------------------------------------------------------

@dataclass
class ControlNetInfo:
    """What `prepare_pixart_controlnet` found."""
    layout: str                                   # "original" (full .pth), "original-controlnet", "diffusers-adapter"
    num_blocks: int
    hidden_size: int
    mlp_ratio: float
    base_config: Optional[PixArtConfig] = None    # config of the bundled base (full layout only)
    base_layout: Optional[str] = None
    dropped: tuple = ()                           # documented dead keys removed, in the file's names
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        text = (f"PixArt-δ ControlNet-Transformer, {self.num_blocks} blocks, width {self.hidden_size} "
                f"({self.layout} layout)")
        if self.base_config is not None:
            text += f", bundled base {variant_name(self.base_config)}"
        return text


def adapter_to_original(sd: dict) -> dict:
    """Rename a diffusers `PixArtControlNetAdapterModel` state dict to the released `controlnet.*` names;
    unknown keys are kept as they are so that the strict check names them."""
    sd = dict(sd)
    out = {}
    indices = sorted({int(m.group(1)) for k in sd for m in [re.match(r"controlnet_blocks\.(\d+)\.", k)] if m})
    for k in indices:
        src, dst = f"{ADAPTER_PREFIX}{k}.", f"{CONTROL_PREFIX}{k}."
        for proj in ("before_proj", "after_proj"):
            for suffix in ("weight", "bias"):
                if f"{src}{proj}.{suffix}" in sd:
                    out[f"{dst}{proj}.{suffix}"] = sd.pop(f"{src}{proj}.{suffix}")
        block_to_original(sd, f"{src}transformer_block.", f"{dst}copied_block.", out)
    out.update(sd)  # leftovers: unexpected keys
    return out


def detect_controlnet_layout(sd: dict) -> str:
    """'original' (base_model.* + controlnet.*), 'original-controlnet' or 'diffusers-adapter'."""
    keys = list(sd)
    if any(k.startswith(ADAPTER_PREFIX) for k in keys):
        return "diffusers-adapter"
    control = [k for k in keys if k.startswith(CONTROL_PREFIX)]
    if control:
        if any(".process." in k for k in control) and not any(".copied_block." in k for k in control):
            raise CheckpointError("expected a PixArt-δ ControlNet-Transformer; found a RelaCtrl control branch "
                                  "(controlnet.*.process.* keys): load it with the RelaCtrl loader")
        return "original" if any(k.startswith(BASE_PREFIX) for k in keys) else "original-controlnet"
    try:
        base = detect_layout(sd)
        found = f"a plain PixArt-α transformer ({base} layout, {len(keys)} tensors) without a control branch"
    except CheckpointError:
        found = describe_foreign(sd)
    raise CheckpointError("expected a PixArt-δ ControlNet-Transformer (original keys controlnet.0.copied_block.*, "
                          "optionally with base_model.*, or diffusers adapter keys "
                          f"controlnet_blocks.0.transformer_block.*); found {found}")


def infer_controlnet_dims(sd: dict) -> tuple:
    """(num_blocks, hidden_size, mlp_ratio) from original-layout `controlnet.*` shapes."""
    indices = {int(m.group(1)) for k in sd for m in [re.match(r"controlnet\.(\d+)\.", k)] if m}
    if not indices:
        raise CheckpointError("the ControlNet weights hold no controlnet.{k}.* tensors")
    num_blocks = 1 + max(indices)
    hidden = mlp_hidden = None
    for k in sorted(indices):
        p = f"{CONTROL_PREFIX}{k}."
        for name in ("after_proj.weight", "copied_block.attn.proj.weight", "copied_block.scale_shift_table"):
            if hidden is None and p + name in sd:
                hidden = sd[p + name].shape[-1]
        if mlp_hidden is None and p + "copied_block.mlp.fc1.weight" in sd:
            mlp_hidden = sd[p + "copied_block.mlp.fc1.weight"].shape[0]
    if hidden is None:
        raise CheckpointError("cannot tell the ControlNet width: no after_proj / attn.proj / scale_shift_table "
                              f"tensor in any block (found {len(sd)} tensors, e.g. {', '.join(sorted(sd)[:5])})")
    return num_blocks, hidden, (mlp_hidden / hidden if mlp_hidden else 4.0)


def controlnet_expected_shapes(num_blocks: int, cfg: PixArtConfig) -> dict:
    """{name: shape} of the control branch (meta device: costs no memory)."""
    return meta_shapes(lambda: PixArtControlNet(num_blocks, cfg))


def prepare_pixart_controlnet(sd: dict, num_heads: Optional[int] = None, sample_size: Optional[int] = None,
                              pe_interpolation: Optional[float] = None,
                              micro_condition: Optional[bool] = None) -> PreparedControlFile:
    """-> (checked controlnet state dict, checked bundled base state dict or None, ControlNetInfo).

    `num_heads` / `sample_size` / `pe_interpolation` go to the bundled base's config inference (as for
    `prepare_pixart`). `micro_condition=None` runs a 512 bundled base (trained latent 64) as non-MS, like
    the reference 512 forward, dropping its unused csize/ar embedders; pass True/False to force."""
    layout = detect_controlnet_layout(sd)
    bundled = BundledBase()
    if layout == "original":
        base_sd, control = split_control_file(sd)
        bundled = prepare_bundled_base(base_sd, num_heads, sample_size, pe_interpolation, micro_condition)
    elif layout == "diffusers-adapter":
        control = adapter_to_original(sd)
    else:
        control = dict(sd)

    num_blocks, hidden, mlp_ratio = infer_controlnet_dims(control)
    # heads are invisible in the weights: the bundled base's, the caller's, or PixArt's 72-wide default
    heads = bundled.config.num_heads if bundled.config is not None else (num_heads or _default_heads(hidden))
    cfg = block_config(hidden, heads, mlp_ratio)
    problems = [bundled.error] if bundled.error else []
    try:
        check_strict(controlnet_expected_shapes(num_blocks, cfg), control,
                     f"PixArt-δ ControlNet-Transformer ({layout} layout, {num_blocks} blocks, width {hidden})")
    except CheckpointError as e:
        problems.insert(0, str(e))
    if problems:
        raise CheckpointError("\n".join(problems))

    info = ControlNetInfo(layout=layout, num_blocks=num_blocks, hidden_size=hidden, mlp_ratio=mlp_ratio,
                          base_config=bundled.config, base_layout=bundled.layout, dropped=tuple(bundled.dropped),
                          notes=bundled.notes)
    if bundled.config is not None:
        check_base_compatible(info, bundled.config)
    return PreparedControlFile(control, bundled.state_dict, info)


def _default_heads(hidden: int) -> int:
    """PixArt's 72-wide heads (1152 -> 16); the same fallback as `infer_config`."""
    return hidden // 72 if hidden % 72 == 0 else max(1, hidden // 64)


def check_base_compatible(controlnet: Union[PixArtControlNet, ControlNetInfo], base) -> None:
    """Raise CheckpointError when the ControlNet cannot run on `base` (a PixArt, or its PixArtConfig)."""
    base_cfg = base_config_of(base, "the PixArt-δ ControlNet-Transformer")
    if isinstance(controlnet, PixArtControlNet):
        hidden, heads, blocks = controlnet.config.hidden_size, controlnet.config.num_heads, controlnet.num_blocks
        mlp_hidden = int(controlnet.config.hidden_size * controlnet.config.mlp_ratio)
        released = controlnet.released_base
    else:
        hidden, heads, blocks = controlnet.hidden_size, None, controlnet.num_blocks
        mlp_hidden = int(controlnet.hidden_size * controlnet.mlp_ratio)
        released = controlnet.base_config
    # the copied blocks must be the base's own blocks, and each feeds the base block after it
    problems = []
    if heads is not None and heads != base_cfg.num_heads:
        problems.append(f"{heads} heads vs the base's {base_cfg.num_heads}")
    if mlp_hidden != int(base_cfg.hidden_size * base_cfg.mlp_ratio):
        problems.append(f"MLP width {mlp_hidden} vs the base's {int(base_cfg.hidden_size * base_cfg.mlp_ratio)}")
    if blocks + 1 > base_cfg.depth:
        problems.append(f"{blocks} control blocks feed base blocks 1…{blocks} but the base has "
                        f"{base_cfg.depth} blocks")
    check_fits_base("PixArt-δ ControlNet", base_cfg, hidden, released, problems)


def load_pixart_controlnet(controlnet_sd: dict, base_config, operations=nn, dtype=None, device=None,
                           info: Optional[ControlNetInfo] = None) -> PixArtControlNet:
    """Strictly load a checked `controlnet.*` state dict (from `prepare_pixart_controlnet`) for a base
    with `base_config` (a PixArtConfig or PixArt model); heads and MLP width come from the base."""
    base_cfg = base_config.config if isinstance(base_config, PixArt) else base_config
    num_blocks, hidden, mlp_ratio = infer_controlnet_dims(controlnet_sd)
    check_base_compatible(ControlNetInfo(layout="original", num_blocks=num_blocks, hidden_size=hidden,
                                         mlp_ratio=mlp_ratio, base_config=info.base_config if info else None),
                          base_cfg)
    cfg = block_config(base_cfg.hidden_size, base_cfg.num_heads, base_cfg.mlp_ratio)
    check_strict(controlnet_expected_shapes(num_blocks, cfg), controlnet_sd,
                 f"PixArt-δ ControlNet-Transformer ({num_blocks} blocks, width {hidden})")
    model = assign_load(lambda: PixArtControlNet(num_blocks, cfg, operations=operations, dtype=dtype),
                        controlnet_sd, dtype, device)
    model.released_base = info.base_config if info else None
    return model
