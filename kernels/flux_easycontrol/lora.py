"""EasyControl condition LoRA files: the released layout, config read from the weights, strict loading.

Released layout (Xiaojiu-Z/EasyControl `models/*.safetensors`, manifests/flux_easycontrol/; the names
are EasyControl's attention processors as train.py saves them, one LoRA slot per file):

  transformer_blocks.{i}.attn.processor.{q,k,v,proj}_loras.0.{down,up}.weight         i < 19
  single_transformer_blocks.{i}.attn.processor.{q,k,v}_loras.0.{down,up}.weight         i < 38
  down [rank, D], up [D, rank], no biases; rank 128, D 3072, BF16.

The module below carries exactly these names, so `load_state_dict(strict=True)` is the layout check and
the full-size layout can be built on the meta device. Block counts, rank and width come from the
weights (the golden's tiny files: 2 + 2 blocks, rank 8, width 64). Scale alpha/rank = 1: upstream's
loader forces alpha = rank whatever the file says.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from ..checkpoint_io import CheckpointError, assign_load, check_strict, describe_foreign, meta_shapes

_KEY = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.processor\."
                  r"(q|k|v|proj)_loras\.(\d+)\.(down|up)\.weight$")
EXAMPLE_KEYS = ("transformer_blocks.0.attn.processor.q_loras.0.down.weight",
                "single_transformer_blocks.0.attn.processor.k_loras.0.up.weight")


@dataclass
class EasyControlLoRAConfig:
    hidden_size: int = 3072
    rank: int = 128
    double_blocks: int = 19
    single_blocks: int = 38

    def describe(self) -> str:
        return (f"{self.double_blocks} double + {self.single_blocks} single blocks, rank {self.rank}, "
                f"width {self.hidden_size}")


class LoRALinear(nn.Module):
    """up(down(h)) — EasyControl's LoRALinearLayer without its token mask (the caller runs it on the rows
    of its own condition slot only, which is what the mask does)."""

    def __init__(self, cfg: EasyControlLoRAConfig, ops, **kw):
        super().__init__()
        self.down = ops.Linear(cfg.hidden_size, cfg.rank, bias=False, **kw)
        self.up = ops.Linear(cfg.rank, cfg.hidden_size, bias=False, **kw)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


class _Processor(nn.Module):
    """One block's LoRAs, one slot each (the `.0.` of the released names)."""

    def __init__(self, cfg, ops, names, **kw):
        super().__init__()
        for name in names:
            setattr(self, f"{name}_loras", nn.ModuleList([LoRALinear(cfg, ops, **kw)]))


class _Block(nn.Module):
    def __init__(self, cfg, ops, names, **kw):
        super().__init__()
        self.attn = nn.Module()
        self.attn.processor = _Processor(cfg, ops, names, **kw)


class EasyControlLoRA(nn.Module):
    """One condition LoRA: q/k/v/proj deltas for every double block, q/k/v for every single block."""

    def __init__(self, cfg: EasyControlLoRAConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.config = cfg
        kw = dict(dtype=dtype, device=device)
        self.transformer_blocks = nn.ModuleList(
            _Block(cfg, operations, ("q", "k", "v", "proj"), **kw) for _ in range(cfg.double_blocks))
        self.single_transformer_blocks = nn.ModuleList(
            _Block(cfg, operations, ("q", "k", "v"), **kw) for _ in range(cfg.single_blocks))

    def processor(self, kind: str, index: int) -> nn.Module:
        """The LoRAs of ("double" | "single") block `index`: .q_loras[0], .k_loras[0], ... ."""
        blocks = self.transformer_blocks if kind == "double" else self.single_transformer_blocks
        return blocks[index].attn.processor


def expected_shapes(cfg: EasyControlLoRAConfig) -> dict:
    return meta_shapes(lambda: EasyControlLoRA(cfg))


# ---------------------------------------------------------------------------------------------
#                             What a file is, config, strict load
# ---------------------------------------------------------------------------------------------

def describe_found(sd: Mapping[str, torch.Tensor]) -> str:
    """Name what a state dict is, with the LoRA layouts a user may pick by mistake told apart
    (kohya, PEFT/diffusers, ComfyUI/BFL FLUX LoRAs; EasyControl files) before the shared families."""
    keys = list(sd.keys())
    sample = ", ".join(sorted(keys)[:4])
    n = f"{len(keys)} tensors, e.g. {sample}"
    if any(_KEY.match(k) for k in keys):
        return f"an EasyControl condition LoRA ({n})"
    flux_words = ("double_blocks", "single_blocks", "transformer_blocks", "single_transformer_blocks")
    is_flux = any(w in k for k in keys for w in flux_words)
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return f"a kohya-style {'FLUX ' if is_flux else ''}LoRA ({n})"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k for k in keys):
        return f"a PEFT/diffusers-style {'FLUX ' if is_flux else ''}LoRA ({n})"
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return f"a {'FLUX ' if is_flux else ''}LoRA with lora_down/lora_up weights ({n})"
    if any(k.startswith("t_block.") or k.startswith("adaln_single.") for k in keys):
        return f"a PixArt-α transformer ({n})"
    return describe_foreign(sd)


def _block_count(sd, prefix: str) -> int:
    found = {int(m.group(2)) for k in sd for m in [_KEY.match(k)] if m and m.group(1) == prefix}
    return 1 + max(found) if found else 0


def infer_lora_config(sd: Mapping[str, torch.Tensor]) -> EasyControlLoRAConfig:
    """Config from the weights; a file that is not an EasyControl LoRA raises, saying what it is."""
    downs = sorted(k for k in sd if _KEY.match(k) and k.endswith(".down.weight"))
    if not downs:
        raise CheckpointError("expected an EasyControl condition LoRA (keys like "
                              f"{EXAMPLE_KEYS[0]}, {EXAMPLE_KEYS[1]}); found {describe_found(sd)}")
    first = EXAMPLE_KEYS[0] if EXAMPLE_KEYS[0] in sd else downs[0]
    rank, width = (int(s) for s in sd[first].shape[:2]) if sd[first].ndim == 2 else (0, 0)
    if rank == 0:
        raise CheckpointError(f"EasyControl LoRA: {first} should be a [rank, width] matrix, found shape "
                              f"{tuple(sd[first].shape)}")
    return EasyControlLoRAConfig(hidden_size=width, rank=rank,
                                 double_blocks=_block_count(sd, "transformer_blocks"),
                                 single_blocks=_block_count(sd, "single_transformer_blocks"))


def prepare_lora(sd: Mapping[str, torch.Tensor], what: str = "EasyControl LoRA") -> EasyControlLoRAConfig:
    """Strict check: exactly the released names for the inferred block counts / rank / width."""
    cfg = infer_lora_config(sd)
    check_strict(expected_shapes(cfg), sd, f"{what} ({cfg.describe()})")
    return cfg


def check_lora_fits(cfg: EasyControlLoRAConfig, hidden_size: int, double_blocks: int, single_blocks: int,
                    what: str = "EasyControl LoRA") -> None:
    """A LoRA made for another FLUX (width or depth) cannot be applied: say which numbers differ."""
    if (cfg.hidden_size, cfg.double_blocks, cfg.single_blocks) != (hidden_size, double_blocks, single_blocks):
        raise CheckpointError(f"{what} was made for a FLUX with {cfg.double_blocks} double + {cfg.single_blocks} "
                              f"single blocks of width {cfg.hidden_size}; this model has {double_blocks} double + "
                              f"{single_blocks} single blocks of width {hidden_size} (FLUX.1-dev: 19 + 38, 3072)")


def load_lora(sd: Mapping[str, torch.Tensor], operations=nn, dtype=None, device=None) -> EasyControlLoRA:
    """Strictly load an EasyControl LoRA state dict (floats cast to `dtype` when given)."""
    cfg = prepare_lora(sd)
    return assign_load(lambda: EasyControlLoRA(cfg, operations=operations), dict(sd), dtype, device)
