"""The reference schedulers (EasyControl Scheduler, DiT4SR Scheduler) against diffusers' own
FlowMatchEulerDiscreteScheduler, configured as each reference pipeline configures it, at every step count from 1
to 200: bit for bit, in float32. (The API tests check the nodes through a server at the issue's step counts;
this checks the arithmetic everywhere else.)"""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dit_control.kernels.dit4sr.schedule import flow_match_sigmas
from dit_control.kernels.flux_easycontrol.schedule import dynamic_shift_mu, dynamic_shift_sigmas

STEPS = range(1, 201)
# EasyControl's reference sizes (1024², 768×1024, 720×992) and others a user picks, square and not
SIZES = ((1024, 1024), (768, 1024), (720, 992), (512, 512), (1344, 768), (2048, 2048))


@pytest.mark.parametrize("width, height", SIZES)
def test_easycontrol_scheduler_is_diffusers_flux_dynamic_shift(width, height):
    """FLUX.1-dev's scheduler config, `set_timesteps(sigmas=linspace(1, 1/N, N), mu=μ)` as FluxPipeline calls it."""
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    mu = dynamic_shift_mu(width, height)
    for steps in STEPS:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = dynamic_shift_sigmas(steps, width, height)
        assert ours.dtype == torch.float32 and torch.equal(ours, scheduler.sigmas), (steps, width, height)


def test_dit4sr_scheduler_is_diffusers_sd35_shift_3():
    """SD3.5-medium's scheduler config (shift 3.0, no dynamic shifting), `set_timesteps(N)` as DiT4SR calls it."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for steps in STEPS:
        scheduler.set_timesteps(steps)
        ours = flow_match_sigmas(steps)
        assert ours.dtype == torch.float32 and torch.equal(ours, scheduler.sigmas), steps


def test_step_counts_below_one_are_refused():
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        dynamic_shift_sigmas(0, 1024, 1024)
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        flow_match_sigmas(0)
