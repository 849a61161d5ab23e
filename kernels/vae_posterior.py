"""A KL VAE's posterior: its moments, the mean, and a draw from it as the reference pipelines draw.

The SD/FLUX/SD3 VAEs' encoders end in `quant_conv`, whose 2·C channels are the posterior's mean and log-variance.
ComfyUI's VAE encode returns the mean (core's DiagonalGaussianRegularizer takes the mode). EasyControl's and
DiT4SR's reference pipelines call diffusers' `latent_dist.sample(generator)` instead (diffusers
`models/autoencoders/vae.py` DiagonalGaussianDistribution): log-variance clamped to [−30, 20],
std = exp(0.5·logvar), noise = `randn_tensor(mean.shape, generator, dtype=moments.dtype)` — drawn on the
generator's device (a CPU generator draws on the CPU, then the noise is moved) — and z = mean + std·noise. The
latent format's shift and scale come after, as in the references.
"""
from __future__ import annotations

import torch

POSTERIOR_MODES = ("mean", "sample")


def split_moments(moments: torch.Tensor) -> tuple:
    """[B, 2C, h, w] moments -> (mean, logvar) [B, C, h, w] each, the log-variance clamped as diffusers does."""
    if moments.ndim < 2 or moments.shape[1] % 2:
        raise ValueError(f"VAE moments need an even channel count (mean and log-variance), got shape "
                         f"{tuple(moments.shape)}")
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.clamp(logvar, -30.0, 20.0)


def posterior_noise(shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """The standard-normal draw of a posterior sample of `shape` from `generator` (a CPU generator: the
    reference's `torch.Generator("cpu")`; on a GPU the result is moved after the draw, as randn_tensor does)."""
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=generator.device)


def sample_posterior(moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """mean + std·noise, with diffusers' operations in diffusers' order (bit-identical on the same inputs)."""
    mean, logvar = split_moments(moments)
    if tuple(noise.shape) != tuple(mean.shape):
        raise ValueError(f"posterior noise of shape {tuple(noise.shape)} for a latent of shape {tuple(mean.shape)}")
    std = torch.exp(0.5 * logvar)
    return mean + std * noise.to(device=mean.device, dtype=mean.dtype)
