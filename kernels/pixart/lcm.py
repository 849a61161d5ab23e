"""Latent Consistency Model (LCM) sampling for PixArt-LCM (PixArt-δ), in pure PyTorch.

Two equivalent forms are offered:

* the diffusers form (`lcm_step`, `lcm_sample`), where the latent is `x_t = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε`
  and the loop reproduces diffusers' `LCMScheduler` (epsilon prediction, set_alpha_to_one);
* the k-diffusion / ComfyUI form (`lcm_sigmas`, `lcm_sample_kdiffusion`), where `x = x0 + σ·ε` with
  `σ = sqrt((1−ᾱ)/ᾱ)`, i.e. `x = x_t / sqrt(ᾱ)`; this backs a SIGMAS node for ComfyUI's own samplers.

Schedule constants are always computed in float64 and applied as Python floats, so the tensors keep the
dtype and device of the latent. Nothing here imports comfy or diffusers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
ORIGINAL_STEPS = 50        # the 50-point DDIM grid 19, 39, …, 999 that PixArt-LCM was distilled on
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5
RULES = ("diffusers", "pixart_repo")


# ----------------------------------------------------------------------------------------------- schedule

def ddpm_alphas_cumprod(beta_start: float = 1e-4, beta_end: float = 0.02,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ᾱ_t = ∏(1 − β) for diffusers' "linear" betas (ComfyUI's `sqrt_linear`), PixArt's schedule."""
    # Built in float64 whatever `dtype` is: a float32 cumprod drifts by ~1e-7 relative over 1000 steps,
    # and x0 = (x − sqrt(1−ᾱ)ε)/sqrt(ᾱ) amplifies that by 1/sqrt(ᾱ_999) ≈ 157.
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def lcm_grid(original_steps: int = ORIGINAL_STEPS,
             num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The ascending distillation grid k·i − 1 (i = 1…original_steps), k = num_train // original_steps."""
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps must be in 1..{num_train_timesteps}, got {original_steps}")
    k = num_train_timesteps // original_steps
    return [k * i - 1 for i in range(1, original_steps + 1)]


def lcm_timesteps(steps: int, original_steps: int = ORIGINAL_STEPS, rule: str = "diffusers",
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The descending network timesteps of an LCM run of `steps` steps under `rule`."""
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= original_steps:
        raise ValueError(f"LCM steps must be an integer in 1..{original_steps} (the distillation grid has "
                         f"{original_steps} timesteps), got {steps!r}")
    steps = int(steps)
    grid = lcm_grid(original_steps, num_train_timesteps)[::-1]   # 999, 979, …, 19
    if rule == "diffusers":
        # diffusers >= 0.24 (PR #5836): floor(linspace(0, N, steps, endpoint=False)). Integer arithmetic
        # gives the same indices without float rounding.
        return [grid[(i * original_steps) // steps] for i in range(steps)]
    if rule == "pixart_repo":
        # PixArt repo diffusion/lcm_scheduler.py and diffusers 0.22/0.23: a fixed stride, then truncate.
        stride = original_steps // steps
        return grid[::stride][:steps]
    raise ValueError(f"unknown LCM timestep rule {rule!r}; expected one of {RULES}")


def lcm_boundary_scalings(t, timestep_scaling: float = TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA):
    """LCM boundary condition (c_skip, c_out) at timestep t: floats, or float64 tensors for a tensor t."""
    # Scaling t by 10 makes this almost a step function: c_skip ≈ 0 and c_out ≈ 1 for every grid t,
    # but the released weights were distilled with it, so it is kept exactly.
    if isinstance(t, torch.Tensor):
        # An integer tensor times 10.0 would be float32 (diffusers' own step loses precision this way).
        t = t.to(torch.float64)
    s = t * timestep_scaling
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s / (s ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def _alpha(alphas_cumprod: torch.Tensor, t: Optional[int]) -> float:
    """ᾱ_t as a float64 Python float; t < 0 means the final alpha, fixed to 1 (set_alpha_to_one)."""
    if t is None or t < 0:
        return 1.0
    return float(alphas_cumprod[int(t)].double())


def alphas_to_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """k-diffusion σ = sqrt((1 − ᾱ)/ᾱ) in float64."""
    a = alphas_cumprod.detach().to("cpu", torch.float64)
    return ((1.0 - a) / a).sqrt()


@dataclass(frozen=True)
class LCMSchedule:
    """The float64 constants of one LCM run: timesteps, ᾱ, boundary scalings and k-diffusion σ."""

    timesteps: tuple[int, ...]
    alphas: tuple[float, ...]       # ᾱ at each timestep
    alphas_prev: tuple[float, ...]  # ᾱ of the next timestep; 1.0 after the last one (set_alpha_to_one)
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    sigmas: torch.Tensor            # σ at each timestep followed by a final 0 (float64)

    @property
    def steps(self) -> int:
        """Number of network evaluations."""
        return len(self.timesteps)


def lcm_schedule(steps: int, rule: str = "diffusers", alphas_cumprod: Optional[torch.Tensor] = None,
                 original_steps: int = ORIGINAL_STEPS) -> LCMSchedule:
    """All constants for an LCM run; `alphas_cumprod` defaults to PixArt's linear-beta schedule."""
    ac = ddpm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.detach().to("cpu", torch.float64)
    ts = lcm_timesteps(steps, original_steps, rule, num_train_timesteps=len(ac))
    alphas = [_alpha(ac, t) for t in ts]
    scalings = [lcm_boundary_scalings(t) for t in ts]
    sigmas = torch.tensor([math.sqrt((1.0 - a) / a) for a in alphas] + [0.0], dtype=torch.float64)
    return LCMSchedule(timesteps=tuple(ts), alphas=tuple(alphas), alphas_prev=tuple(alphas[1:] + [1.0]),
                       c_skip=tuple(c for c, _ in scalings), c_out=tuple(c for _, c in scalings),
                       sigmas=sigmas)


# ----------------------------------------------------------------------------------------- diffusers form

def lcm_step(model_eps: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: Optional[int],
             alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor] = None):
    """One diffusers LCMScheduler.step (ε-prediction); returns (x_next, denoised)."""
    # PixArt predicts learned variance in the channels after ε; only ε enters the update.
    eps = model_eps[:, : x_t.shape[1]] if model_eps.shape[1] != x_t.shape[1] else model_eps
    a_t = _alpha(alphas_cumprod, t)
    # Same operation order as diffusers, so float32 runs agree to the last bits.
    x0 = (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    c_skip, c_out = lcm_boundary_scalings(t)
    denoised = c_out * x0 + c_skip * x_t
    if noise is None or t_prev is None:
        # Last step: diffusers returns the denoised sample and draws no noise.
        return denoised, denoised
    a_prev = _alpha(alphas_cumprod, t_prev)
    x_next = math.sqrt(a_prev) * denoised + math.sqrt(1.0 - a_prev) * noise
    return x_next, denoised


def lcm_sample(eps_fn: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor,
               timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
               noise_fn: Callable[[int, torch.Tensor], torch.Tensor],
               callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """The multistep LCM loop in diffusers form; returns the final denoised latent (x0)."""
    timesteps = [int(t) for t in timesteps]
    total = len(timesteps)
    if total == 0:
        raise ValueError("lcm_sample needs at least one timestep")
    x = x_T
    for i, t in enumerate(timesteps):
        eps = eps_fn(x, t)
        last = i == total - 1
        # Noise is drawn after the model call and only between steps, like diffusers' step().
        noise = None if last else noise_fn(i, x)
        x_next, denoised = lcm_step(eps, x, t, None if last else timesteps[i + 1], alphas_cumprod, noise)
        if callback is not None:
            callback(i, total, x, denoised)
        x = x_next
    return x


# ------------------------------------------------------------------------------------ k-diffusion form

def lcm_sigmas(steps: int, rule: str = "diffusers", alphas_cumprod: Optional[torch.Tensor] = None,
               original_steps: int = ORIGINAL_STEPS) -> torch.Tensor:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) at the LCM timesteps, then a final 0 (float64, for a SIGMAS output)."""
    # Each σ is exactly a grid σ, so ComfyUI's discrete model sampling maps it back to the same timestep
    # (like its `simple` scheduler, unlike `sgm_uniform`, which interpolates σ between grid points).
    return lcm_schedule(steps, rule, alphas_cumprod, original_steps).sigmas


def sigma_to_timestep(sigma, alphas_cumprod: Optional[torch.Tensor] = None,
                      original_steps: Optional[int] = None):
    """The training timestep whose σ is nearest in log-σ (int for a number, LongTensor for a tensor).

    With `original_steps` the candidates are only the distillation grid, as in ComfyUI's
    ModelSamplingDiscreteDistilled; the default considers every training timestep.
    """
    ac = ddpm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    log_sigmas = alphas_to_sigmas(ac).log()
    candidates = torch.arange(len(log_sigmas))
    if original_steps is not None:
        candidates = torch.tensor(lcm_grid(original_steps, len(log_sigmas)))
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()
    dists = (s.log().reshape(-1, 1) - log_sigmas[candidates].reshape(1, -1)).abs()
    t = candidates[dists.argmin(dim=1)].reshape(s.shape)
    if isinstance(sigma, torch.Tensor):
        return t.to(sigma.device)
    return int(t)


def lcm_sample_kdiffusion(denoise_fn: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
                          sigmas: torch.Tensor, noise_fn: Callable[[int, torch.Tensor], torch.Tensor],
                          callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None
                          ) -> torch.Tensor:
    """The LCM loop in k-diffusion form (x = x0 + σ·ε), as ComfyUI's `sample_lcm`; returns the final x0.

    `denoise_fn(x, σ)` must already apply the LCM boundary (c_skip/c_out) at the snapped timestep.
    """
    # Why this is the diffusers step: with x = x_t / sqrt(ᾱ_t) and σ² = (1−ᾱ)/ᾱ, the diffusers update
    #   x_t' = sqrt(ᾱ')·d + sqrt(1−ᾱ')·z
    # divided by sqrt(ᾱ') is  x' = d + sqrt((1−ᾱ')/ᾱ')·z = d + σ'·z,  with the same d and the same z.
    # The σ = 0 end plays the role of ᾱ = 1 (set_alpha_to_one): the last step returns d itself.
    # A full-strength start matches too: x_T ~ N(0, I) in diffusers is x = x_T·sqrt(1+σ_max²) here.
    total = len(sigmas) - 1
    if total < 1:
        raise ValueError("lcm_sample_kdiffusion needs at least two sigmas (one step)")
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise_fn(x, sigma)
        if callback is not None:
            callback(i, total, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = denoised + sigma_next * noise_fn(i, denoised)
    return x
