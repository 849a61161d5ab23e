"""The VAE posterior's moments from core's VAE object, and the `posterior` / `posterior_seed` inputs that Apply
EasyControl and DiT4SR Conditioning share (kernels/vae_posterior.py has the maths).

Core's `VAE.encode` runs `first_stage_model.encode`: encoder, quant_conv (2·C channels: mean and log-variance), then
its `regularization` (DiagonalGaussianRegularizer) keeps the mean. `encode_moments` runs that same encode with the
regularizer wrapped so that it also hands back what it was given: the mean comes out exactly as core's plain encode
gives it (the `mean` choice does not use this at all), and the moments come from the same call.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..kernels.vae_posterior import POSTERIOR_MODES

POSTERIOR_TOOLTIP = ("mean: the VAE posterior's mean, as core's VAE Encode gives (deterministic). sample: a draw "
                     "from the posterior, mean + std·noise, as the reference pipeline encodes (its "
                     "latent_dist.sample), with noise from a CPU generator seeded by posterior_seed.")


def posterior_inputs(seed_tooltip: str) -> list:
    """The two inputs, optional so that graphs saved before they existed still run (as `mean`)."""
    return [io.Combo.Input("posterior", options=list(POSTERIOR_MODES), default="mean", optional=True,
                           tooltip=POSTERIOR_TOOLTIP),
            io.Int.Input("posterior_seed", default=0, min=0, max=0xffffffffffffffff, optional=True,
                         control_after_generate=False, tooltip=seed_tooltip)]


def check_posterior(node: str, posterior: str) -> str:
    if posterior not in POSTERIOR_MODES:
        raise ValueError(f"{node}: posterior must be one of {POSTERIOR_MODES}, got {posterior!r}")
    return posterior


class _KeepMoments(torch.nn.Module):
    """Core's regularizer, unchanged, plus a record of the moments it receives (one entry per encode batch)."""

    def __init__(self, regularizer):
        super().__init__()
        self.regularizer = regularizer
        self.moments = []

    def forward(self, z):
        self.moments.append(z)
        return self.regularizer(z)


def encode_moments(vae, pixels: torch.Tensor, node: str) -> tuple:
    """(mean latent exactly as `vae.encode(pixels)` returns it, moments [B, 2C, h, w] on the same device and
    dtype). Refused for a VAE without a KL posterior and when core fell back to its tiled encode (out of memory:
    its tiles' moments cannot be put together)."""
    model = getattr(vae, "first_stage_model", None)
    regularizer = getattr(model, "regularization", None)
    if regularizer is None or type(regularizer).__name__ != "DiagonalGaussianRegularizer":
        raise ValueError(f"{node}: posterior 'sample' needs a KL VAE (an encoder giving the posterior's mean and "
                         f"log-variance); this VAE ({type(model).__name__}) has none: use posterior 'mean'")
    keep = _KeepMoments(regularizer)
    model.regularization = keep
    try:
        mean = vae.encode(pixels)
    finally:
        model.regularization = regularizer
    moments = torch.cat([m.to(device=mean.device, dtype=mean.dtype) for m in keep.moments], dim=0) \
        if keep.moments else None
    if moments is None or moments.shape[0] != mean.shape[0] or moments.shape[1] != 2 * mean.shape[1] \
            or moments.shape[2:] != mean.shape[2:]:
        found = "nothing" if moments is None else f"moments of shape {tuple(moments.shape)}"
        raise RuntimeError(f"{node}: posterior 'sample' needs the VAE's plain encode (moments of shape "
                           f"{(mean.shape[0], 2 * mean.shape[1], *mean.shape[2:])}), but the encode gave {found} "
                           f"(core encodes in tiles after running out of memory): use posterior 'mean' or a "
                           f"smaller image")
    return mean, moments
