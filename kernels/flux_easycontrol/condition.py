"""EasyControl conditions: slots, position ids, the attention mask, and one call's condition state.

Facts (../shared/specs/easycontrol.md, Xiaojiu-z/EasyControl@da44fa8):
- a condition is a VAE latent (model space) packed 2×2 like the noise and embedded by the same img_in;
- its tokens are appended after the noise tokens: attention order [text T][noise N][cond_0]…[cond_n−1];
- slot i has its own LoRA and strength; subjects come first, then spatial conditions;
- position ids: spatial conditions are stretched onto the noise grid (fractional ids
  (0, i·H/h, j·W/w) for latent sizes H×W of the noise and h×w of the condition); subjects sit at
  (0, y + 64, x); text at 0;
- modulation vec of condition tokens = time_in(t = 0) + guidance_in(guidance) + vector_in(pooled).

`EasyControl` holds the conditions and the KV bank; `begin(model, ...)` makes the `ConditionRun` that
the block functions (blocks.py) read. `model` is anything with FLUX's attribute names — our
`model.Flux` or ComfyUI's `comfy.ldm.flux.model.Flux`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from . import blocks
from .kv_cache import BankEntry, ConditionBank, make_key
from .lora import EasyControlLoRA, check_lora_fits
from .model import grid_ids, pack_latents

KINDS = ("subject", "spatial")     # slot order: subjects first (upstream's set_multi_lora rule)
SUBJECT_ROW_OFFSET = 64


# ---------------------------------------------------------------------------------------------
#                                    Conditions and their ids
# ---------------------------------------------------------------------------------------------

def spatial_ids(cond_hw: tuple, noise_hw: tuple, device=None) -> torch.Tensor:
    """[M, 3] ids of a spatial condition of latent size h × w stretched onto a noise latent H × W:
    (0, i·H/h, j·W/w) for i < h/2, j < w/2 (upstream resize_position_encoding; fractional)."""
    (h, w), (hn, wn) = cond_hw, noise_hw
    return grid_ids(h // 2, w // 2, row_scale=hn / h, col_scale=wn / w, device=device)


def subject_ids(cond_hw: tuple, device=None) -> torch.Tensor:
    """[M, 3] ids of a subject condition: its own grid, 64 rows down (0, y + 64, x)."""
    h, w = cond_hw
    return grid_ids(h // 2, w // 2, row_offset=SUBJECT_ROW_OFFSET, device=device)


@dataclass(eq=False)
class Condition:
    """One condition slot: a latent [1 or B, 16, h, w] (VAE-encoded, already (z − shift)·scale), its
    LoRA, strength (upstream `lora_weights`, 1 = as trained) and kind ("subject" or "spatial")."""
    latent: torch.Tensor
    lora: EasyControlLoRA
    strength: float = 1.0
    kind: str = "spatial"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"condition kind must be one of {KINDS}, got {self.kind!r}")
        if self.latent.ndim != 4:
            raise ValueError(f"condition latent must be [B, C, h, w], got shape {tuple(self.latent.shape)}")

    @property
    def tokens(self) -> int:
        return (self.latent.shape[-2] // 2) * (self.latent.shape[-1] // 2)

    def position_ids(self, noise_hw: tuple, device=None) -> torch.Tensor:
        hw = tuple(self.latent.shape[-2:])
        return subject_ids(hw, device) if self.kind == "subject" else spatial_ids(hw, noise_hw, device)


def order_conditions(conditions: Sequence[Condition]) -> list:
    """Subjects first, then spatial conditions, each kind in the given order (stable)."""
    return sorted(conditions, key=lambda c: KINDS.index(c.kind))


def split_tall_latent(latent: torch.Tensor, n: int) -> list:
    """Several images of one kind are VAE-encoded upstream as ONE tall image (slight mixing across the
    seams): its latent [B, C, n·h, w] gives n condition latents, top to bottom."""
    if latent.shape[-2] % n:
        raise ValueError(f"a tall latent of height {latent.shape[-2]} does not split into {n} equal images")
    return list(latent.chunk(n, dim=-2))


def condition_attention_mask(n_main: int, ranges: Sequence[tuple], device=None) -> torch.Tensor:
    """Boolean [L, L] (True = attend), L = n_main + M: rows of the n_main text/noise tokens see every
    token; rows of condition i see only condition i (upstream: additive −1e20 elsewhere)."""
    total = n_main + (ranges[-1][1] if ranges else 0)
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:n_main] = True
    for a, b in ranges:
        mask[n_main + a:n_main + b, n_main + a:n_main + b] = True
    return mask


def _to_batch(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """One latent for every batch element (also both CFG halves), or one per element."""
    n = tokens.shape[0]
    if n == batch:
        return tokens
    if batch % n:
        raise ValueError(f"condition latent batch {n} does not divide the model batch {batch}")
    return tokens.repeat(batch // n, 1, 1)


# ---------------------------------------------------------------------------------------------
#                                   One call's condition state
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class ConditionRun:
    """What the block functions of ONE forward read (see blocks.py for the two modes); begin a new one
    per forward: the joint mode carries the condition tokens in it from block to block."""
    mode: str                              # "cached" | "joint"
    slots: list                            # Conditions in token order
    ranges: list                           # (start, end) of each slot among the M condition tokens
    cond_vec: torch.Tensor                 # [B, D] modulation vector at t = 0
    cond_pe: torch.Tensor                  # [1, 1, M, hd/2, 2, 2]
    entry: Optional[BankEntry] = None      # cached: the bank entry
    cond_hidden: Optional[torch.Tensor] = None   # joint: condition tokens, carried block to block
    _masks: dict = field(default_factory=dict)

    def bank_kv(self, kind: str, index: int) -> tuple:
        return self.entry.kv[(kind, index)]

    def joint_mask(self, n_main: int) -> torch.Tensor:
        mask = self._masks.get(n_main)
        if mask is None:
            mask = self._masks[n_main] = condition_attention_mask(n_main, self.ranges, self.cond_vec.device)
        return mask


def fill_bank(model, cond_tokens: torch.Tensor, run: ConditionRun) -> BankEntry:
    """Run the condition tokens [B, M, 64] alone through every block of `model` (img_in, then
    double_blocks, then single_blocks) and keep each block's K (after LoRA, before qk-norm) and V."""
    entry = BankEntry()
    cond = model.img_in(cond_tokens)
    for i, block in enumerate(model.double_blocks):
        cond, k, v = blocks.condition_double_block(block, cond, run, i)
        entry.kv[("double", i)] = (k, v)
    for i, block in enumerate(model.single_blocks):
        cond, k, v = blocks.condition_single_block(block, cond, run, i)
        entry.kv[("single", i)] = (k, v)
    return entry


# Memory of a sampling run beyond the weights (EasyControl.run_bytes), from what this kernel allocates:
# - a block's live activations per text/noise token and row, in values of the width: the single block's
#   fused linear1 output (3 q/k/v + 4 MLP = 7), its GELU (4), the input, norm, attention output and their
#   concatenation (5), the residual stream and the double block's two streams (~4 more); 20 rounds it up;
ACTIVATION_VALUES_PER_TOKEN = 20
# - cache on: the KV bank, K and V of every condition token in every block ([rows, heads, M, head_dim]),
#   for every CFG branch;
# - cache off: the [L, L] boolean joint mask over all L = text + noise + condition tokens, which SDPA also
#   turns into an additive float mask of that size (measured on the CPU: 5 bytes per entry).
JOINT_MASK_BYTES_PER_ENTRY = 5


class EasyControl:
    """Condition slots + their KV bank, for one model (one ComfyUI model clone).

    cache=True (default): the condition stream runs once per bank key and every later call of the run
    reuses its K/V; cache=False: every call runs EasyControl's uncached processor (all tokens in one
    masked attention). Wrap a sampling run in `sampling_run()` so the bank is dropped when it ends."""

    def __init__(self, conditions: Sequence[Condition], cache: bool = True, max_bank_entries: int = 2):
        self.conditions = order_conditions(conditions)
        self.cache = cache
        self.bank = ConditionBank(max_bank_entries)

    @contextlib.contextmanager
    def sampling_run(self):
        self.bank.clear()
        try:
            yield self
        finally:
            self.bank.clear()

    def run_bytes(self, hidden: int, blocks_total: int, noise_tokens: int, text_tokens: int, rows: int,
                  dtype_bytes: int) -> int:
        """Bytes one sampling run allocates beyond the weights with these conditions, from what this kernel
        allocates (see the constants above); `rows`: the latent batch times the CFG branches (the bank holds
        every branch's K/V, whether the sampler runs them as one call or two)."""
        cond_tokens = sum(c.tokens for c in self.conditions)
        activations = ACTIVATION_VALUES_PER_TOKEN * rows * (text_tokens + noise_tokens) * hidden * dtype_bytes
        if self.cache:
            return activations + 2 * blocks_total * rows * cond_tokens * hidden * dtype_bytes
        total = text_tokens + noise_tokens + cond_tokens
        return activations + JOINT_MASK_BYTES_PER_ENTRY * total * total

    def check_fits(self, model) -> None:
        width = model.double_blocks[0].hidden_size if len(model.double_blocks) else model.single_blocks[0].hidden_size
        for c in self.conditions:
            check_lora_fits(c.lora.config, width, len(model.double_blocks), len(model.single_blocks))
        for b in model.double_blocks[:1]:
            blocks.check_flux1_block(b, "double")
        for b in model.single_blocks[:1]:
            blocks.check_flux1_block(b, "single")

    def begin(self, model, y: Optional[torch.Tensor], guidance: Optional[torch.Tensor], noise_hw: tuple,
              batch: int, dtype, extra_key: Any = None, device=None) -> Optional[ConditionRun]:
        """The state for one forward of `model` on a noise latent of size noise_hw (latent pixels, after
        padding to patches) and batch `batch`; fills the bank on a miss. None without conditions.
        `device`: where the forward computes (default: where img_in's weight is; ComfyUI's offloading
        ops may keep weights elsewhere and cast them to the input's device per call)."""
        if not self.conditions:
            return None
        self.check_fits(model)
        device = device if device is not None else model.img_in.weight.device
        slots = self.conditions
        tokens = [_to_batch(pack_latents(c.latent.to(device)), batch).to(dtype) for c in slots]
        ranges, start = [], 0
        for t in tokens:
            ranges.append((start, start + t.shape[1]))
            start += t.shape[1]
        ids = torch.cat([c.position_ids(noise_hw, device) for c in slots])
        cond_vec = blocks.embed_vector(model, torch.zeros(batch, device=device), y, guidance, dtype)
        run = ConditionRun(mode="cached" if self.cache else "joint", slots=slots, ranges=ranges,
                           cond_vec=cond_vec, cond_pe=model.pe_embedder(ids[None]))
        cond_tokens = torch.cat(tokens, dim=1)
        if not self.cache:
            run.cond_hidden = model.img_in(cond_tokens)
            return run
        key = make_key(model, cond_vec, tokens, ids, slots, dtype, extra_key)
        run.entry = self.bank.lookup(key)
        if run.entry is None:
            run.entry = fill_bank(model, cond_tokens, run)
            self.bank.store(key, run.entry)
        return run
