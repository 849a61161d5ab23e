"""The reference's σ list: FlowMatchEulerDiscreteScheduler with dynamic shift, as FLUX.1's pipeline sets it.

Xiaojiu-z/EasyControl src/pipeline.py (diffusers 0.32 FluxPipeline) calls `set_timesteps(sigmas=linspace(1, 1/N,
N), mu=μ)`; the scheduler casts the base σ to float32 and shifts them in float32 (numpy):
  μ = base_shift + (L − 256)·(max_shift − base_shift)/(4096 − 256), L = (H/16)·(W/16) noise tokens;
  σ' = e^μ / (e^μ + (1/σ − 1)), then a final 0.
Core's ModelSamplingFlux + `simple` picks σ from a 1000-entry table, so it meets this list only when the step
count divides 1000; this computes it for any step count, with the reference's own float32 arithmetic
(bit-identical to diffusers' scheduler: tests/kernels/test_reference_schedules.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# FLUX.1-dev's scheduler config (scheduler/scheduler_config.json): what the reference pipeline reads
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def dynamic_shift_mu(width: int, height: int, max_shift: float = MAX_SHIFT, base_shift: float = BASE_SHIFT) -> float:
    """μ for a W×H px image: linear in its noise tokens (H/16)·(W/16) (the pipeline's calculate_shift)."""
    tokens = (height // 16) * (width // 16)
    slope = (max_shift - base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return tokens * slope + (base_shift - slope * BASE_SEQ_LEN)


def dynamic_shift_sigmas(steps: int, width: int, height: int, max_shift: float = MAX_SHIFT,
                         base_shift: float = BASE_SHIFT) -> torch.Tensor:
    """[steps + 1] float32 σ, the last 0: the reference's list for `steps` steps at W×H px."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    base = np.array(np.linspace(1.0, 1.0 / steps, steps)).astype(np.float32)
    e = math.exp(dynamic_shift_mu(width, height, max_shift, base_shift))
    # numpy float32 with Python-float scalars, as the scheduler's time_shift computes it
    shifted = e / (e + (1 / base - 1) ** 1.0)
    return torch.cat([torch.from_numpy(np.asarray(shifted, dtype=np.float32)), torch.zeros(1)])
