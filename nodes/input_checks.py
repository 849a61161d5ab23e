"""What a user types into a node, checked in one place: float widgets that are not numbers, values a node
changes before it uses them, and sizes whose memory the machine cannot give.

- NaN / ±Inf: ComfyUI's range check compares a FLOAT widget with its min and max, and a NaN compares false
  with both, so `NaN` in /prompt JSON (Python's json reads the NaN literal) reaches `execute` unchecked;
  ±Infinity is refused by that check only where the widget has a max and min, and a value arriving over a
  link (a math or primitive node) is not range-checked at all. `check_finite` refuses both, by node, input
  and value, before the node does any work.
- A value a node clamps or reinterprets is logged once per (node, input, value) with what was used.
- `refuse_over_free_memory`: a size whose estimated allocation exceeds the memory free on the device is
  refused before anything is allocated, with the size, the estimate, the memory free, why it costs that and
  what to do. Each caller derives its estimate from what its code allocates (stated beside the constant).
"""
from __future__ import annotations

import logging
import math

import torch

GIB = float(1 << 30)

_LOGGED: set = set()


def check_finite(node: str, **values) -> None:
    """Raise ValueError naming the node, the input and the value of the first float that is NaN or ±Inf."""
    for name, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(
                f"{node}: {name} is {value}, not a number it can use; give a finite value. (ComfyUI's range "
                f"check lets NaN through, and values arriving over a link are not range-checked.)")


def log_adjusted_once(node: str, name: str, asked, used, why: str) -> None:
    """Log once per (node, input, asked value) that the node used another value than the one asked for."""
    key = (node, name, asked, used)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    logging.warning("dit-control: %s: %s = %s used as %s (%s)", node, name, asked, used, why)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 2**20:.0f} MiB"


def free_memory(device) -> int:
    """Bytes ComfyUI's model management says are free on `device` (RAM available on the CPU)."""
    import comfy.model_management as mm
    return int(mm.get_free_memory(torch.device(device)))


def refuse_over_free_memory(node: str, what: str, needed: float, device, why: str, remedy: str) -> None:
    """Raise ValueError when `needed` bytes exceed what is free on `device`; `what` names the size asked
    for, `why` says what the bytes are, `remedy` what to do instead."""
    free = free_memory(device)
    if needed <= free:
        return
    raise ValueError(f"{node}: {what} needs about {gib(needed)} ({why}), more than the {gib(free)} free on "
                        f"{torch.device(device).type}; refused before allocating. {remedy}")
