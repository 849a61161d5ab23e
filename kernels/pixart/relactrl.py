"""RelaCtrl (relevance-guided control) on PixArt-α 1024-MS: 11 light RGLC blocks instead of PixArt-δ's 13 copies.

Lineage: arXiv 2502.14377, reference `RGLC_Block` / `TDSM` / `TDSM_token` / `ControlPixArtMSHalf_RelaCtrl` in
360CVGroup/RelaCtrl@88b81c25 `diffusion/model/nets/pixart_relactrl_v1.py`. Facts (and the corrections found by
running the reference): ../shared/specs/relactrl.md.

Each RGLC block replaces a copied transformer block by a two-dimensional shuffle mixer (TDSM): the channels are
permuted and split into experts (widths read from the weights), each expert's [tokens x channels] slab is
flattened, permuted again and cut into 4 "pseudo-token" segments that one small attention mixes; both
permutations are undone afterwards. The permutations are drawn inside every forward in the reference; here they
come from an injectable `PermutationSource` (recorded list, seeded CPU generator, identity) so a ComfyUI graph is
reproducible and the global RNG the samplers use is left alone.

The branch plugs into `PixArt.forward(control=...)` like the ControlNet-Transformer, with lazy additions: an RGLC
block reads the base state after base blocks 0, 2…9, 18 and 19, so its skip is computed when the forward gets
there. The skip is never reset (a reference quirk the weights were trained with): every later base block gets
the latest one again.

Addition to the reference: `strength` multiplies every skip (1 = reference, 0 = base model exactly), as for
the ControlNet-Transformer. Layers come from an `operations` namespace. Nothing here imports ComfyUI.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..adaln import modulate
from ..checkpoint_io import CheckpointError, assign_load, check_strict, describe_foreign, meta_shapes
from .checkpoint import detect_layout, variant_name
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
from .controlnet import block_config, match_control_latent
from .model import BlockContext, PixArt, PixArtConfig, PixArtSelfAttention, _cast, _layer_norm

__all__ = ["RelaCtrlConfig", "RelaCtrl", "RGLCBlock", "TDSM", "TokenMixer", "RelaCtrlBranch",
           "PermutationSource", "RecordedPermutations", "GeneratorPermutations", "SeededPermutations",
           "IdentityPermutations", "permutation_source", "step_seed", "RelaCtrlInfo", "prepare_relactrl",
           "load_relactrl", "check_relactrl_base_compatible", "detect_relactrl_layout"]

# `c_adding_index` of the release: RGLC block k reads the output of base block PLACEMENT[k] and its skip
# enters base block PLACEMENT[k] + 1 (and every later one until the next RGLC block).
PLACEMENT = (0, 2, 3, 4, 5, 6, 7, 8, 9, 18, 19)
EXPERT_HEADS = 4      # TDSM_token's attention: 4 heads of Dg/4 whatever the width
SEGMENTS = 4          # pseudo-token segments per expert


# ---------------------------------------------------------------------------------------------
#                                          Config
# ---------------------------------------------------------------------------------------------

@dataclass
class RelaCtrlConfig:
    hidden_size: int = 1152
    # per RGLC block, the width of each expert in order (the release: G = 6,2,6,4,2,2,4,4,6,6,6 experts of
    # D/G; not always D/G at other widths, so always read from the weights)
    expert_widths: tuple = ()
    placement: tuple = PLACEMENT
    expert_heads: int = EXPERT_HEADS

    @property
    def num_blocks(self) -> int:
        return len(self.expert_widths)


# ---------------------------------------------------------------------------------------------
#                                   Permutation sources
# ---------------------------------------------------------------------------------------------

class PermutationSource:
    """Where the TDSM permutations come from. `begin()` runs at the start of every forward; `draw(n, kind)`
    gives a CPU int64 permutation of range(n), in the reference's call order: per RGLC block one channel
    permutation (n = D), then one token permutation per expert (n = L * Dg)."""

    def begin(self) -> None:
        pass

    def draw(self, n: int, kind: str) -> torch.Tensor:
        raise NotImplementedError


class IdentityPermutations(PermutationSource):
    """Every permutation is arange(n): contiguous channel groups, tokens re-grouped in 4 contiguous segments."""

    def draw(self, n, kind):
        return torch.arange(n)


class RecordedPermutations(PermutationSource):
    """Replays a list of permutations (e.g. the golden's perm_0…perm_58); every forward starts from the first."""

    def __init__(self, perms: Sequence[torch.Tensor]):
        self.perms = [torch.as_tensor(p, dtype=torch.long).cpu() for p in perms]
        self.position = 0

    def begin(self):
        self.position = 0

    def draw(self, n, kind):
        if self.position >= len(self.perms):
            raise ValueError(f"recorded permutations exhausted: a forward needs more than {len(self.perms)}")
        p = self.perms[self.position]
        if p.numel() != n:
            raise ValueError(f"recorded permutation {self.position} has {p.numel()} entries but the {kind} "
                             f"permutation drawn here needs {n} (recorded at another size?)")
        self.position += 1
        return p


class GeneratorPermutations(PermutationSource):
    """Draws from a caller's CPU torch.Generator and keeps drawing across forwards. Seeded like the reference's
    global RNG (torch.manual_seed(s) right before its forward), the draws equal the reference's bit for bit."""

    def __init__(self, generator: torch.Generator):
        if generator.device.type != "cpu":
            # a CPU generator gives the same permutations on every device
            raise ValueError(f"RelaCtrl permutations need a CPU torch.Generator, got one on {generator.device}")
        self.generator = generator

    def draw(self, n, kind):
        return torch.randperm(n, generator=self.generator)


def step_seed(seed: int, step: Optional[int]) -> int:
    """The generator seed for one sampling step: `seed` itself without a step (the reference's manual_seed),
    otherwise a splitmix64 mix of both, so neighbouring seeds and steps do not share streams."""
    seed = int(seed) % 2 ** 64
    if step is None:
        return seed
    z = (seed + (int(step) + 1) * 0x9E3779B97F4A7C15) % 2 ** 64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return z ^ (z >> 31)


class SeededPermutations(PermutationSource):
    """The default: a fresh CPU generator seeded from (seed, step) at the start of EVERY forward, so a step's
    cond and uncond halves see the same permutations even when the sampler runs them as separate batches
    (the reference's CFG batch shares one set), and re-running a graph gives the same image."""

    def __init__(self, seed: int = 0, step: Optional[int] = None):
        self.seed, self.step = seed, step
        self.generator = torch.Generator(device="cpu")
        self.begin()

    def begin(self):
        self.generator.manual_seed(step_seed(self.seed, self.step))

    def draw(self, n, kind):
        return torch.randperm(n, generator=self.generator)


def permutation_source(spec=None, seed: int = 0, step: Optional[int] = None) -> PermutationSource:
    """A PermutationSource from: None (seeded from `seed` and `step`), an int seed, "identity", a CPU
    torch.Generator, a list of recorded permutations, or a PermutationSource."""
    if spec is None:
        return SeededPermutations(seed, step)
    if isinstance(spec, PermutationSource):
        return spec
    if isinstance(spec, str):
        if spec == "identity":
            return IdentityPermutations()
        raise ValueError(f"unknown permutation source {spec!r}: use 'identity', a seed, a generator or a list")
    if isinstance(spec, torch.Generator):
        return GeneratorPermutations(spec)
    if isinstance(spec, int):
        return SeededPermutations(spec, step)
    if isinstance(spec, (list, tuple)):
        return RecordedPermutations(spec)
    raise TypeError(f"cannot make RelaCtrl permutations from a {type(spec).__name__}")


# ---------------------------------------------------------------------------------------------
#                                         The modules
# ---------------------------------------------------------------------------------------------

class TokenMixer(nn.Module):
    """One `TDSM_token` expert: plain softmax attention (4 heads, qkv with bias) over pseudo-tokens of width Dg."""

    def __init__(self, width: int, heads: int = EXPERT_HEADS, operations=nn, dtype=None, device=None):
        super().__init__()
        self.width = width
        # PixArt's own self-attention (same qkv layout and names as timm's Attention), at the expert's width
        self.attn = PixArtSelfAttention(block_config(width, heads), operations, dtype=dtype, device=device)

    def forward(self, segments: torch.Tensor) -> torch.Tensor:      # [B * 4, L / 4, Dg]
        return self.attn(segments)


class TDSM(nn.Module):
    """Two-dimensional shuffle mixer: replaces self-attention and FFN; no caption input, msa modulation only."""

    def __init__(self, hidden_size: int, widths: Sequence[int], heads: int = EXPERT_HEADS, operations=nn,
                 dtype=None, device=None):
        super().__init__()
        if sum(widths) != hidden_size:
            raise ValueError(f"TDSM expert widths {list(widths)} do not add up to the width {hidden_size}")
        self.scale_shift_table = nn.Parameter(torch.empty(6, hidden_size, dtype=dtype, device=device))
        self.experts_attn = nn.ModuleList(TokenMixer(w, heads, operations, dtype=dtype, device=device)
                                          for w in widths)

    def shuffle_index(self, tokens: int, perms: PermutationSource, device) -> torch.Tensor:
        """Flat index into [L * D] giving, expert after expert, the reference's (channel, then token) permuted
        order: entry i of expert j is h[tp_j[i] // Dg, cp[s_j + tp_j[i] % Dg]]. One gather then does both
        shuffles, and one scatter with the same index undoes them."""
        d = self.scale_shift_table.shape[-1]
        channel = perms.draw(d, "channel").to(device)
        parts, start = [], 0
        for mixer in self.experts_attn:
            dg = mixer.width
            tp = perms.draw(tokens * dg, "token").to(device)
            parts.append(torch.div(tp, dg, rounding_mode="floor") * d + channel[start:start + dg][tp % dg])
            start += dg
        return torch.cat(parts)

    def forward(self, z: torch.Tensor, t0: torch.Tensor, perms: PermutationSource) -> torch.Tensor:
        b, n, d = z.shape
        if n % SEGMENTS:
            raise ValueError(f"RelaCtrl's TDSM cuts the tokens into {SEGMENTS} segments, but this latent has {n} "
                             f"tokens; use a size whose token count (H/2 x W/2) is divisible by {SEGMENTS}")
        # only the msa third of the modulation exists here (no FFN); the last three rows are unused
        shift, scale, gate = (_cast(self.scale_shift_table, z)[None] + t0)[:, :3].unbind(1)
        h = modulate(_layer_norm(z), shift[:, None], scale[:, None])
        index = self.shuffle_index(n, perms, z.device)
        shuffled = h.reshape(b, n * d).index_select(1, index)
        outs, start = [], 0
        for mixer in self.experts_attn:
            size = n * mixer.width
            # the 4 segments share one attention module: batch them [B, 4, L/4, Dg] -> [B*4, L/4, Dg]
            seg = shuffled[:, start:start + size].reshape(b * SEGMENTS, n // SEGMENTS, mixer.width)
            outs.append(mixer(seg).reshape(b, size))
            start += size
        out = torch.empty_like(shuffled).index_copy_(1, index, torch.cat(outs, 1))
        return torch.addcmul(z, gate[:, None], out.view(b, n, d))


class RGLCBlock(nn.Module):
    """Relevance-guided light control block k: TDSM plus zero-initialised in/out projections (both in every
    block, unlike PixArt-δ). Block 0 projects the control embedding into the base stream; later blocks
    project the base stream into the control stream."""

    def __init__(self, index: int, hidden_size: int, widths: Sequence[int], heads: int = EXPERT_HEADS,
                 operations=nn, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.index = index
        self.process = TDSM(hidden_size, widths, heads, operations, **kw)
        self.before_proj = operations.Linear(hidden_size, hidden_size, **kw)
        self.after_proj = operations.Linear(hidden_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor, c: torch.Tensor, t0: torch.Tensor, perms: PermutationSource) -> tuple:
        """x = base tokens at this depth -> (new control tokens, skip)."""
        z = x + self.before_proj(c) if self.index == 0 else c + self.before_proj(x)
        c = self.process(z, t0, perms)
        return c, self.after_proj(c)


class RelaCtrl(nn.Module):
    """The control branch; state-dict names are the released ones minus `base_model.`."""

    def __init__(self, cfg: RelaCtrlConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        if len(cfg.placement) != cfg.num_blocks or list(cfg.placement) != sorted(set(cfg.placement)):
            raise ValueError(f"RelaCtrl placement {list(cfg.placement)} must be {cfg.num_blocks} increasing "
                             "base block indices, one per RGLC block")
        self.config = cfg
        self.controlnet = nn.ModuleList(
            RGLCBlock(k, cfg.hidden_size, widths, cfg.expert_heads, operations, dtype=dtype, device=device)
            for k, widths in enumerate(cfg.expert_widths))
        # set by the loader when the file bundled its own base (None: the file did not say)
        self.released_base: Optional[PixArtConfig] = None

    @property
    def num_blocks(self) -> int:
        return len(self.controlnet)

    def branch(self, control_latent: torch.Tensor, strength: Union[float, torch.Tensor] = 1.0,
               permutations=None, seed: int = 0, step: Optional[int] = None) -> "RelaCtrlBranch":
        """A ControlFn for `PixArt.forward(..., control=...)`. `permutations`: see `permutation_source`
        (default: a CPU generator seeded from `seed` and `step`, re-seeded every forward)."""
        return RelaCtrlBranch(self, control_latent, strength, permutation_source(permutations, seed, step))


class LazySkip:
    """A control addition computed when the base forward reaches its block (see `ControlFn` in model.py).
    Adding it to a tensor or to another LazySkip (as `combine_controls` does) gives a LazySkip of the sum."""

    def __init__(self, parts: list):
        self.parts = parts

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        total = None
        for p in self.parts:
            value = p(tokens) if callable(p) else p
            total = value if total is None else total + value
        return total

    def __add__(self, other):
        return LazySkip(self.parts + (other.parts if isinstance(other, LazySkip) else [other]))

    def __radd__(self, other):
        return LazySkip([other] + self.parts)


class _RelaCtrlRun:
    """One forward of the branch: the control stream and the current skip, advanced block by block."""

    def __init__(self, net: RelaCtrl, c: torch.Tensor, ctx: BlockContext, perms: PermutationSource, strength):
        self.net, self.c, self.t0, self.perms, self.strength = net, c, ctx.t0, perms, strength
        self.skip = None
        self.done = 0          # RGLC blocks run so far
        self.rglc_at = {p: k for k, p in enumerate(net.config.placement)}

    def skip_for(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        """The addition to the input of base `block`; `tokens` are the output of base block `block - 1`."""
        k = self.rglc_at.get(block - 1)
        if k is not None:
            if k != self.done:
                raise RuntimeError(f"RelaCtrl block {k} ran out of order (after {self.done} blocks)")
            self.c, skip = self.net.controlnet[k](tokens, self.c, self.t0, self.perms)
            # never reset: this skip goes into every later base block until the next RGLC block
            self.skip = skip * self.strength if scales_skips(self.strength) else skip
            self.done += 1
        return self.skip


class _BlockSkip:
    def __init__(self, run: _RelaCtrlRun, block: int):
        self.run, self.block = run, block

    def __call__(self, tokens):
        return self.run.skip_for(self.block, tokens)


class RelaCtrlBranch:
    """A ControlFn: one RelaCtrl, its control latent, strength and permutation source."""

    def __init__(self, net: RelaCtrl, control_latent: torch.Tensor, strength: Union[float, torch.Tensor] = 1.0,
                 permutations: Optional[PermutationSource] = None):
        self.net = net
        self.control_latent = control_latent
        self.strength = strength
        self.permutations = permutations if permutations is not None else SeededPermutations()

    def __call__(self, base: PixArt, x: torch.Tensor, ctx: BlockContext) -> dict:
        if isinstance(self.strength, (int, float)) and self.strength == 0:
            return {}  # nothing added: the base output bit for bit, no control compute, no draws
        check_relactrl_base_compatible(self.net, base)
        latent = match_control_latent(self.control_latent, x.shape[0], ctx.grid, base.config.patch_size)
        c = base.embed_latent(latent.to(x.device), x.dtype)     # base x_embedder + this size's table
        self.permutations.begin()
        run = _RelaCtrlRun(self.net, c, ctx, self.permutations, self.strength)
        first = self.net.config.placement[0] + 1
        return {i: LazySkip([_BlockSkip(run, i)]) for i in range(first, len(base.blocks))}


# ---------------------------------------------------------------------------------------------
#                                   Layouts and strict loading
# ---------------------------------------------------------------------------------------------

@dataclass
class RelaCtrlInfo:
    """What `prepare_relactrl` found."""
    layout: str                                   # "original" (base_model.* + controlnet.*) or "original-controlnet"
    config: RelaCtrlConfig
    base_config: Optional[PixArtConfig] = None    # config of the bundled base (full layout only)
    base_layout: Optional[str] = None
    dropped: tuple = ()                           # documented dead keys removed, in the file's names
    notes: list = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def describe(self) -> str:
        experts = "/".join(str(len(w)) for w in self.config.expert_widths)
        text = (f"RelaCtrl, {self.num_blocks} RGLC blocks ({experts} experts), width {self.hidden_size} "
                f"({self.layout} layout)")
        if self.base_config is not None:
            text += f", bundled base {variant_name(self.base_config)}"
        return text


def detect_relactrl_layout(sd: dict) -> str:
    """'original' (base_model.* + controlnet.*) or 'original-controlnet'; other files get an error naming them."""
    keys = list(sd)
    control = [k for k in keys if k.startswith(CONTROL_PREFIX)]
    if any(".process." in k for k in control):
        return "original" if any(k.startswith(BASE_PREFIX) for k in keys) else "original-controlnet"
    expected = ("expected a RelaCtrl control branch (keys controlnet.{k}.process.scale_shift_table, "
                "controlnet.{k}.process.experts_attn.{j}.attn.*, optionally with base_model.*)")
    if any(".copied_block." in k for k in control) or any(k.startswith(ADAPTER_PREFIX) for k in keys):
        raise CheckpointError(f"{expected}; found a PixArt-δ ControlNet-Transformer (copied transformer blocks, "
                              f"{len(keys)} tensors): load it with the PixArt ControlNet-Transformer loader")
    try:
        base = detect_layout(sd)
        found = f"a plain PixArt-α transformer ({base} layout, {len(keys)} tensors) without a control branch"
    except CheckpointError:
        found = describe_foreign(sd)
    raise CheckpointError(f"{expected}; found {found}")


def _indices(sd: dict, pattern: str) -> list:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m})


def _expert_width(sd: dict, prefix: str) -> Optional[int]:
    """Dg of one expert from whichever of its tensors is present."""
    for name, width in (("attn.qkv.weight", lambda s: s[1]), ("attn.proj.weight", lambda s: s[1]),
                        ("attn.qkv.bias", lambda s: s[0] // 3), ("attn.proj.bias", lambda s: s[0])):
        if prefix + name in sd:
            return int(width(sd[prefix + name].shape))
    return None


def infer_relactrl_config(sd: dict, placement: Optional[Sequence[int]] = None) -> RelaCtrlConfig:
    """RelaCtrlConfig from `controlnet.*` shapes: block count, width, and each expert's width (never D/G)."""
    blocks = _indices(sd, r"controlnet\.(\d+)\.")
    if not blocks:
        raise CheckpointError("the RelaCtrl weights hold no controlnet.{k}.* tensors")
    hidden = None
    for k in blocks:
        for name in ("process.scale_shift_table", "after_proj.weight", "before_proj.weight"):
            if hidden is None and f"{CONTROL_PREFIX}{k}.{name}" in sd:
                hidden = int(sd[f"{CONTROL_PREFIX}{k}.{name}"].shape[-1])
    if hidden is None:
        raise CheckpointError("cannot tell the RelaCtrl width: no scale_shift_table / after_proj / before_proj "
                              f"tensor in any block (found {len(sd)} tensors, e.g. {', '.join(sorted(sd)[:5])})")
    widths, unknown = [], []
    for k in range(1 + max(blocks)):
        prefix = f"{CONTROL_PREFIX}{k}.process.experts_attn."
        experts = _indices(sd, re.escape(prefix) + r"(\d+)\.")
        row = []
        for j in (range(1 + max(experts)) if experts else ()):
            w = _expert_width(sd, f"{prefix}{j}.")
            if w is None:
                unknown.append(f"{prefix}{j}.attn.*")
            row.append(w or 0)
        if not experts:
            unknown.append(f"{prefix}*")
        elif sum(row) != hidden and not unknown:
            raise CheckpointError(f"RelaCtrl block {k}: expert widths {row} add up to {sum(row)}, not the width "
                                  f"{hidden}")
        widths.append(tuple(row))
    if unknown:
        raise CheckpointError("the RelaCtrl weights do not match the expected layout: no tensors at all for "
                              + ", ".join(unknown) + " (expert widths cannot be read)")
    placement = tuple(placement) if placement is not None else PLACEMENT
    if len(placement) != len(widths):
        raise CheckpointError(f"the RelaCtrl file has {len(widths)} RGLC blocks but the placement table has "
                              f"{len(placement)} entries ({list(placement)}); pass the placement for this file")
    return RelaCtrlConfig(hidden_size=hidden, expert_widths=tuple(widths), placement=placement)


def relactrl_expected_shapes(cfg: RelaCtrlConfig) -> dict:
    """{name: shape} of the control branch (meta device: costs no memory)."""
    return meta_shapes(lambda: RelaCtrl(cfg))


def prepare_relactrl(sd: dict, num_heads: Optional[int] = None, sample_size: Optional[int] = None,
                     pe_interpolation: Optional[float] = None,
                     placement: Optional[Sequence[int]] = None) -> PreparedControlFile:
    """-> (checked controlnet state dict, checked bundled base state dict or None, RelaCtrlInfo).

    Accepts the full file (base_model.* + controlnet.*; the stale base_model.pos_embed dropped, as the reference
    deletes it) and the control-only file (load PixArt-XL-2-1024-MS separately). `num_heads` / `sample_size` /
    `pe_interpolation` go to the bundled base's config inference (as for `prepare_pixart`)."""
    layout = detect_relactrl_layout(sd)
    bundled = BundledBase()
    if layout == "original":
        base_sd, control = split_control_file(sd)
        bundled = prepare_bundled_base(base_sd, num_heads, sample_size, pe_interpolation)
    else:
        control = dict(sd)
    if "pos_embed" in control:
        # the reference deletes `pos_embed` as well as `base_model.pos_embed` before loading: a stale table
        control.pop("pos_embed")
        bundled.dropped.append("pos_embed")
    cfg = infer_relactrl_config(control, placement)
    problems = [bundled.error] if bundled.error else []
    try:
        check_strict(relactrl_expected_shapes(cfg), control,
                     f"RelaCtrl ({layout} layout, {cfg.num_blocks} RGLC blocks, width {cfg.hidden_size})")
    except CheckpointError as e:
        problems.insert(0, str(e))
    if problems:
        raise CheckpointError("\n".join(problems))
    info = RelaCtrlInfo(layout=layout, config=cfg, base_config=bundled.config, base_layout=bundled.layout,
                        dropped=tuple(bundled.dropped), notes=bundled.notes)
    if bundled.config is not None:
        check_relactrl_base_compatible(info, bundled.config)
    return PreparedControlFile(control, bundled.state_dict, info)


def check_relactrl_base_compatible(relactrl: Union[RelaCtrl, RelaCtrlInfo], base) -> None:
    """Raise CheckpointError when the RelaCtrl branch cannot run on `base` (a PixArt, or its PixArtConfig)."""
    base_cfg = base_config_of(base, "RelaCtrl")
    cfg = relactrl.config
    released = relactrl.released_base if isinstance(relactrl, RelaCtrl) else relactrl.base_config
    # the RGLC blocks read base blocks by index and feed the block after each
    problems = []
    if max(cfg.placement) + 1 >= base_cfg.depth:
        problems.append(f"its last RGLC block reads base block {max(cfg.placement)} and feeds block "
                        f"{max(cfg.placement) + 1}, but the base has {base_cfg.depth} blocks")
    check_fits_base("RelaCtrl", base_cfg, cfg.hidden_size, released, problems)


def load_relactrl(controlnet_sd: dict, base_config, operations=nn, dtype=None, device=None,
                  info: Optional[RelaCtrlInfo] = None) -> RelaCtrl:
    """Strictly load a checked `controlnet.*` state dict (from `prepare_relactrl`) for a base with
    `base_config` (a PixArtConfig or PixArt model)."""
    base_cfg = base_config.config if isinstance(base_config, PixArt) else base_config
    cfg = infer_relactrl_config(controlnet_sd, info.config.placement if info else None)
    check_relactrl_base_compatible(RelaCtrlInfo(layout="original", config=cfg,
                                                base_config=info.base_config if info else None), base_cfg)
    check_strict(relactrl_expected_shapes(cfg), controlnet_sd,
                 f"RelaCtrl ({cfg.num_blocks} RGLC blocks, width {cfg.hidden_size})")
    model = assign_load(lambda: RelaCtrl(cfg, operations=operations, dtype=dtype), controlnet_sd, dtype, device)
    model.released_base = info.base_config if info else None
    return model
