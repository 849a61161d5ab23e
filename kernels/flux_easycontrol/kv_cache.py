"""The condition KV bank: per block, the condition tokens' K (after LoRA, before qk-norm and RoPE) and V.

EasyControl's condition stream depends on neither the noise tokens nor the timestep (conditions attend
only to themselves, modulated at t = 0), so within a sampling run it is computed once and every step
reuses it — exactly. It does depend on: the t = 0 vector (pooled text, guidance, the model's
embedders), the condition latents and their position ids, the LoRAs and their strengths, and which
batch element / CFG branch it was built for. The key holds all of these and is compared exactly
(tensors with `torch.equal`, objects by identity), so a changed input can never meet a stale bank: it
misses and the bank is rebuilt.

Why no condition attention outputs are kept: upstream keeps them (`bank_attn`) only because its
diffusers blocks keep pushing the condition tokens through every block on every step; those rows are
dropped at the end and never reach the noise tokens. Here the condition stream is not re-run at all on
a cached step, so they would be dead memory (a third of the bank).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class BankEntry:
    """{("double" | "single", block index): (K [B, H, M, hd], V [B, H, M, hd])}."""
    kv: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv.values() for t in pair)


class BankKey:
    """Everything a bank entry depends on. `tensors` are copied (an in-place edit of a caller's tensor
    must not edit the key), `values` compared with ==, `objects` (model, LoRAs) by identity."""

    def __init__(self, tensors, values, objects):
        self.tensors = tuple(t.detach().clone() for t in tensors)
        self.values = tuple(values)
        self.objects = tuple(objects)

    def matches(self, other: "BankKey") -> bool:
        if self.values != other.values or len(self.objects) != len(other.objects) \
                or len(self.tensors) != len(other.tensors):
            return False
        if any(a is not b for a, b in zip(self.objects, other.objects)):
            return False
        return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                   for a, b in zip(self.tensors, other.tensors))


class ConditionBank:
    """A few entries, most recently used last. Two by default: ComfyUI may run the CFG branches as one
    batch (one entry) or as two calls (one entry each); more would only hold memory (FLUX.1-dev: ~0.7 GB
    per batch element per 1024 condition tokens in bf16)."""

    def __init__(self, max_entries: int = 2):
        self.max_entries = max_entries
        self.entries: list = []        # [(BankKey, BankEntry)]
        self.builds = 0                # entries built (tests and logs: how often the stream ran)
        self.hits = 0

    def lookup(self, key: BankKey) -> Optional[BankEntry]:
        for i, (k, entry) in enumerate(self.entries):
            if k.matches(key):
                self.entries.append(self.entries.pop(i))
                self.hits += 1
                return entry
        return None

    def store(self, key: BankKey, entry: BankEntry) -> None:
        self.builds += 1
        self.entries.append((key, entry))
        del self.entries[:-self.max_entries]

    def clear(self) -> None:
        """Drop every entry (the end of a sampling run; model weights may change before the next)."""
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for _, e in self.entries)


def make_key(model: Any, cond_vec: torch.Tensor, tokens, ids: torch.Tensor, slots, dtype,
             extra: Any = None) -> BankKey:
    """The bank key of one call: cond_vec covers pooled text, guidance and t = 0 through the model's own
    embedders, per batch element; `extra` separates what the inputs do not show (e.g. the CFG branch)."""
    values = (str(dtype), tuple(float(s.strength) for s in slots), tuple(s.kind for s in slots), extra)
    return BankKey([cond_vec, *tokens, ids], values, [model, *[s.lora for s in slots]])
