"""adaLN modulation, the one step PixArt, FLUX and SD3 (DiT4SR) blocks share: x · (1 + scale) + shift.

The modulation comes out of each family's own adaLN layer in its own shape (PixArt's scale-shift table, FLUX's
`Modulation`, SD3's `AdaLN`); the step that applies it is the same maths everywhere, so it lives here once.
"""
from __future__ import annotations

import torch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, in one fused pass over x; shift and scale already broadcast against x."""
    return torch.addcmul(shift, x, 1 + scale)


def modulate_tokens(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`modulate` for tokens x [B, N, D] with one [B, D] modulation per sample, broadcast over the tokens."""
    return modulate(x, shift[:, None], scale[:, None])
