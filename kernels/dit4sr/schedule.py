"""The reference's σ list: SD3.5-medium's FlowMatchEulerDiscreteScheduler (shift 3.0), as DiT4SR's pipeline sets it.

adam-duan/DiT4SR pipelines/pipeline_dit4sr.py (diffusers 0.31) calls `set_timesteps(N)`: the scheduler made its
σ range at construction in float32 torch (σ_max = 1, σ_min = shift(1/1000)), spaces N timesteps from 1000·σ_max
to 1000·σ_min in float64 (numpy), divides by 1000, shifts σ' = s·σ / (1 + (s − 1)·σ) in float64, casts to
float32 and appends 0. Core's `normal` scheduler on the DiT4SR MODEL computes the same list in float32 arithmetic
(within 2 float32 steps, 1.2e-7); this is the reference's own arithmetic, bit-identical to diffusers' scheduler
(tests/kernels/test_reference_schedules.py).
"""
from __future__ import annotations

import numpy as np
import torch

SHIFT = 3.0                 # SD3.5-medium's scheduler/scheduler_config.json
TRAIN_TIMESTEPS = 1000


def _shift(sigma, shift: float):
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_match_sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """[steps + 1] float32 σ, the last 0: the reference's list for `steps` steps."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    # the scheduler's construction: the training σ table in float32 torch, shifted; its ends as Python floats
    table = torch.from_numpy(np.linspace(1, TRAIN_TIMESTEPS, TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy())
    table = _shift(table.to(torch.float32) / TRAIN_TIMESTEPS, shift)
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    timesteps = np.linspace(sigma_max * TRAIN_TIMESTEPS, sigma_min * TRAIN_TIMESTEPS, steps)
    sigmas = _shift(timesteps / TRAIN_TIMESTEPS, shift)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])
