"""A "pixel VAE" in the SD kl-f8 layout: weights of core's SD VAE architecture set by hand, never trained.

encode = an exact 8× average pool of the image (RGB in latent channels 0-2, channel 3 zero) and
decode = an exact 8× nearest upsample, so the micro PixArt learns in a latent space that is simply a
small picture. Core's `VAELoader` reads the file as any SD VAE (same tensor names and shapes as
`tests/generators/make_checkpoints.py::sd_vae_shapes`).

How the non-linear stages stay linear (exact up to float rounding, ~1e-6):
- every ResnetBlock has conv2 = 0, so it is its shortcut: the identity, or (where the width changes) a
  1×1 `nin_shortcut` copying the used channels; every attention block has proj_out = 0 (identity);
- the downsample convs (pad right/bottom, 3×3 stride 2) have 0.25 on the 2×2 top-left taps: a 2×2
  average pool, three times = 8×; the upsample convs after core's nearest ×2 are the identity tap;
- the only norms on the path are `encoder.norm_out` / `decoder.norm_out` (GroupNorm + swish before the
  out conv). Each signal v rides as a pair (s·v, −s·v) next to a pair of constants (+B, −B) in the same
  GroupNorm group: the group mean is exactly 0 and its variance is B²·(const share) + O(s²v²), so with
  s/B = 1e-3 the norm is a fixed scale (relative error ~1e-7); the norm's affine maps s·v back to v and
  adds 20, where swish(z) = z·sigmoid(z) is the identity to 1e-7, and the out conv's bias takes 20 off.

Channel layout inside the networks, for colour k = 0, 1, 2: channel 4k = s·v_k, 4k+1 = −s·v_k,
4k+2 = +B, 4k+3 = −B (channels 0-11; the encoder's last GroupNorm groups 16 channels, the decoder's 4).

Latent scale: core multiplies the VAE's latent by the SD1.5 scaling factor 0.18215 before the model sees
it (`latent_format.process_in`) and divides after. The encoder's out conv therefore writes v / 0.18215,
so the MODEL sees latents = v = 2·(block mean of the image) − 1 in [−1, 1] per RGB channel (and 0 in
channel 3) — ComfyUI's VAE encode maps [0, 1] pixels to [−1, 1] first, its decode maps back and clamps.

The file is float32 (the released sd-vae-ft-ema is float32 too): ~335 MB, made at set-up, never committed.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

SD15_SCALE = 0.18215          # comfy.latent_formats.SD15.scale_factor
SIGNAL = 1e-3                 # s: the signal's scale inside the networks
CONST = 1.0                   # B: the constant pair that fixes each GroupNorm group's variance
SHIFT = 20.0                  # into swish's linear range: 1 - sigmoid(19) = 5.6e-9
GN_EPS = 1e-6                 # core's Normalize() eps
LOGVAR = -30.0                # the posterior's log-variance (core clamps to [-30, 20]; mode() ignores it)


def _pairs(k: int) -> tuple:
    return 4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3


# SD3's latent format (comfy.latent_formats.SD3): the MODEL sees (z - SD3_SHIFT) * SD3_SCALE
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609
# The SD3 pixel VAE's posterior log-variance: a small real spread (std 0.018 of the raw latent), so that
# DiT4SR Conditioning's `posterior: sample` draws visible noise its tests can check; `mean` ignores it.
SD3_LOGVAR = -8.0


def _hand_set_vae(shapes: dict, latent_channels: int, scale: float, shift: float, logvar: float) -> dict:
    """Weights of core's kl-f8 VAE (ldm names, `shapes`) set by hand: the MODEL-space latent is
    (raw - shift) * scale = 2·(8× block mean) - 1 in channels 0-2, 0 elsewhere; decode inverts that with an
    8× nearest upsample."""
    sd = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for name in sd:                                   # norm scales 1 (they never reach the output anyway)
        if "norm" in name and name.endswith("weight"):
            sd[name].fill_(1.0)
    used = range(12)

    def identity_1x1(name):
        for c in used:
            sd[name][c, c, 0, 0] = 1.0

    for name in shapes:
        if name.endswith("nin_shortcut.weight"):
            identity_1x1(name)
        if name.endswith("downsample.conv.weight"):
            for c in used:
                sd[name][c, c, 0:2, 0:2] = 0.25       # after pad (0, 1, 0, 1): rows/cols 2i, 2i+1
        if name.endswith("upsample.conv.weight"):
            for c in used:
                sd[name][c, c, 1, 1] = 1.0            # after core's nearest ×2
    # resnets: conv2 = 0 and attention proj_out = 0 are already zero (identity blocks)

    def gain(group_channels: int, const_channels: int) -> float:
        """norm_out scale that turns the normalised s·v back into v."""
        sigma = math.sqrt(CONST ** 2 * const_channels / group_channels + GN_EPS)
        return sigma / SIGNAL

    # ---- encoder: image in [-1, 1] -> raw latent v / scale + shift
    for k in range(3):
        p, n, cp, cn = _pairs(k)
        sd["encoder.conv_in.weight"][p, k, 1, 1] = SIGNAL
        sd["encoder.conv_in.weight"][n, k, 1, 1] = -SIGNAL
        sd["encoder.conv_in.bias"][cp], sd["encoder.conv_in.bias"][cn] = CONST, -CONST
    sd["encoder.norm_out.weight"].zero_()
    enc_gain = gain(512 // 32, 6)                    # one group of 16 channels holds all 12 used ones
    out_scale = 1.0 / scale
    for k in range(3):
        p = _pairs(k)[0]
        sd["encoder.norm_out.weight"][p] = enc_gain
        sd["encoder.norm_out.bias"][p] = SHIFT
        sd["encoder.conv_out.weight"][k, p, 1, 1] = out_scale
        sd["encoder.conv_out.bias"][k] = -SHIFT * out_scale
    sd["encoder.conv_out.bias"][:latent_channels] += shift
    sd["encoder.conv_out.bias"][latent_channels:2 * latent_channels] = logvar
    if "quant_conv.weight" in sd:
        for c in range(2 * latent_channels):
            sd["quant_conv.weight"][c, c, 0, 0] = 1.0
        for c in range(latent_channels):
            sd["post_quant_conv.weight"][c, c, 0, 0] = 1.0
    # ---- decoder: raw latent -> image in [-1, 1]
    for k in range(3):
        p, n, cp, cn = _pairs(k)
        sd["decoder.conv_in.weight"][p, k, 1, 1] = SIGNAL * scale
        sd["decoder.conv_in.weight"][n, k, 1, 1] = -SIGNAL * scale
        sd["decoder.conv_in.bias"][p], sd["decoder.conv_in.bias"][n] = -SIGNAL * scale * shift, SIGNAL * scale * shift
        sd["decoder.conv_in.bias"][cp], sd["decoder.conv_in.bias"][cn] = CONST, -CONST
    sd["decoder.norm_out.weight"].zero_()
    dec_gain = gain(128 // 32, 2)                    # groups of 4: (s·v, −s·v, B, −B) per colour
    for k in range(3):
        p = _pairs(k)[0]
        sd["decoder.norm_out.weight"][p] = dec_gain
        sd["decoder.norm_out.bias"][p] = SHIFT
        sd["decoder.conv_out.weight"][k, p, 1, 1] = 1.0
        sd["decoder.conv_out.bias"][k] = -SHIFT
    return sd


def pixel_vae_state_dict() -> dict:
    """{name: float32 tensor} in the ldm layout of core's SD VAE."""
    from dit_control.tests.generators.make_checkpoints import sd_vae_shapes
    return _hand_set_vae(sd_vae_shapes(), 4, SD15_SCALE, 0.0, LOGVAR)


def sd3_pixel_vae_state_dict() -> dict:
    """{name: float32 tensor} of the SD3 pixel VAE: SD3's VAE layout (16 latent channels, no quant convs,
    what core's VAELoader reads as the SD3 / SD3.5 VAE), the same maps as the SD one."""
    from dit_control.tests.generators.make_checkpoints import flux_vae_shapes
    return _hand_set_vae(flux_vae_shapes(), 16, SD3_SCALE, SD3_SHIFT, SD3_LOGVAR)


def save_pixel_vae(path: Path, sd3: bool = False) -> Path:
    """Write the pixel VAE (float32 safetensors; `sd3`: the SD3 one) where core's VAELoader finds it."""
    import safetensors.torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = sd3_pixel_vae_state_dict() if sd3 else pixel_vae_state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# ---- the same maps in plain torch, for training (what core's VAE computes, without the network) ----

def encode_model_latent(image: torch.Tensor, channels: int = 4) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> the MODEL-space latent [B, channels, H/8, W/8]: RGB block means, the rest zero
    (= core VAEEncode · 0.18215 for the SD pixel VAE; channels=16: (core VAEEncode − 0.0609) · 1.5305 of the SD3 one's
    mean)."""
    v = torch.nn.functional.avg_pool2d(image * 2.0 - 1.0, 8)
    return torch.cat([v, torch.zeros_like(v[:, :1]).expand(-1, channels - 3, -1, -1)], dim=1)


def decode_model_latent(latent: torch.Tensor) -> torch.Tensor:
    """MODEL-space latent [B, 4 or 16, h, w] -> image [B, 3, 8h, 8w] in [0, 1] (= core VAEDecode of latent / 0.18215;
    of the SD3 pixel VAE for 16 channels: only channels 0-2 are read)."""
    up = torch.nn.functional.interpolate(latent[:, :3], scale_factor=8, mode="nearest")
    return ((up + 1.0) / 2.0).clamp(0.0, 1.0)

