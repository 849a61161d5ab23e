"""No silent black images: a diffusion model's step output that turns NaN/Inf stops sampling with an error
that names the step and the likely cause, instead of decoding to black.

Every family's MODEL adapter passes its output through `check_step_output`; the check is one pass over
a latent-sized tensor per model call.
"""
from __future__ import annotations

import torch


class NonFiniteStepError(RuntimeError):
    """A sampling step produced NaN or Inf."""


def _step_of(transformer_options: dict):
    """(step index from 1, number of steps, σ) of the current model call, as far as the sampler says."""
    sigma = transformer_options.get("sigmas")
    schedule = transformer_options.get("sample_sigmas")
    if sigma is None:
        return None, None, None
    sigma = float(sigma.reshape(-1)[0])
    if schedule is None or schedule.numel() < 2:
        return None, None, sigma
    schedule = schedule.reshape(-1).float().cpu()
    index = int((schedule[:-1] - sigma).abs().argmin())
    return index + 1, schedule.numel() - 1, sigma


def _likely_cause(x: torch.Tensor, context, compute_dtype) -> str:
    if not bool(torch.isfinite(x).all()):
        return ("the latent entering this step was already NaN/Inf: an earlier node (the input latent, a "
                "previous sampler) produced it, or the sampler's cfg is NaN (ComfyUI's range check lets a NaN "
                "widget value through)")
    if context is not None and torch.is_tensor(context) and not bool(torch.isfinite(context).all()):
        return "the text conditioning holds NaN/Inf: check the text encoder's weights and dtype"
    if compute_dtype == torch.float16:
        return ("fp16 overflow: the activations exceeded fp16's range; load the model with weight_dtype "
                "bf16 or fp32")
    return ("damaged or overflowing weights (values so large the maths overflows), or a control strength far "
            "outside its range; try the file again in fp32 and check its source")


def check_step_output(out: torch.Tensor, x: torch.Tensor, context, transformer_options: dict,
                      model_name: str) -> torch.Tensor:
    """`out` unchanged when finite; otherwise raise NonFiniteStepError naming the step and the cause."""
    if bool(torch.isfinite(out).all()):
        return out
    step, steps, sigma = _step_of(transformer_options or {})
    where = f"step {step} of {steps}" if step is not None else "a sampling step"
    at = f" (σ = {sigma:.4g})" if sigma is not None else ""
    bad = int((~torch.isfinite(out)).sum())
    raise NonFiniteStepError(
        f"{model_name}: {where}{at} produced NaN/Inf ({bad} of {out.numel()} values), so the image would "
        f"decode black. Likely cause: {_likely_cause(x, context, x.dtype)}.")
