"""HED soft-edge annotator used by PixArt-δ's ControlNet, in the parameter names of `ControlNetHED.pth`.

The network is lllyasviel's Apache-2 HED re-training (`ControlNetHED_Apache2`): a VGG-16 trunk in five
stages, each with a 1×1 side projection to one channel, and a learned per-channel input mean `norm`.
Unlike the original BSDS HED it takes RGB, not BGR, and it has no learned fusion layer: the side maps
are averaged. Facts: ../shared/specs/controlnet_transformer.md ("Control image → control latent");
architecture and post-processing read from PixArt-alpha/PixArt-alpha@cac2fd3b diffusion/model/hed.py.
Weights: `ControlNetHED.pth` from the Hugging Face repo lllyasviel/Annotators (fp16, 37 tensors,
14,716,168 parameters, 29.4 MB).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint_io import CheckpointError, check_strict, meta_shapes, read_state_dict

HED_FILE_HINT = "expected ControlNetHED.pth (lllyasviel/Annotators)"

# (in channels, out channels, 3×3 convs) per stage: VGG-16's conv layout.
HED_STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class HEDCheckpointError(CheckpointError):
    """A file or state dict that is not the released ControlNetHED weights, or is damaged."""


class HEDStage(nn.Module):
    """Optional 2×2 max-pool, then 3×3 conv + ReLU layers, plus a 1×1 side projection to one channel."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, pool: bool):
        super().__init__()
        self.pool = pool
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1)
            for i in range(num_convs)
        )
        self.projection = nn.Conv2d(out_channels, 1, kernel_size=1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        for conv in self.convs:
            h = F.relu(conv(h))
        # The side map is taken after the last ReLU of the stage, as in the reference.
        return h, self.projection(h)


class HEDNetwork(nn.Module):
    """ControlNetHED_Apache2: five VGG stages, each giving one side map at its own resolution."""

    def __init__(self):
        super().__init__()
        # Learned RGB mean, subtracted from the 0..255 input (zeros until the weights are loaded).
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        stages = [HEDStage(cin, cout, n, pool=i > 0) for i, (cin, cout, n) in enumerate(HED_STAGES)]
        self.block1, self.block2, self.block3, self.block4, self.block5 = stages

    def forward(self, image_255: torch.Tensor) -> list[torch.Tensor]:
        """RGB [B,3,H,W] in 0..255 -> five [B,1,h_i,w_i] side maps (logits), finest first."""
        h = image_255 - self.norm
        sides = []
        for stage in (self.block1, self.block2, self.block3, self.block4, self.block5):
            h, side = stage(h)
            sides.append(side)
        return sides


# Peak bytes per input pixel of one hed_edges call in float32 (the first stage's 64-channel maps at full
# resolution, the five side maps resized to full size, their mean): measured 727 (512²) and 785 (1024²)
# above the weights on the CPU.
HED_BYTES_PER_PIXEL = 800


@torch.no_grad()
def hed_edges(net: HEDNetwork, image01: torch.Tensor) -> torch.Tensor:
    """RGB [B,3,H,W] in [0,1] -> soft edges [B,1,H,W] in [0,1], white on black (PixArt's HEDdetector)."""
    if image01.ndim != 4 or image01.shape[1] != 3:
        raise ValueError(f"hed_edges wants an RGB batch [B,3,H,W]; got shape {tuple(image01.shape)}")
    height, width = image01.shape[-2:]
    if min(height, width) < 16:
        # Four 2×2 pools: the fifth stage needs at least one pixel.
        raise ValueError(f"hed_edges needs an image of at least 16×16; got {height}×{width}")
    x = image01.to(device=net.norm.device, dtype=net.norm.dtype) * 255.0
    # torchvision's TF.resize(e, [H, W]) on tensors = bilinear, align_corners=False. Its antialias flag
    # (default True from 0.17, off before) only acts when shrinking; these maps are only ever enlarged.
    sides = [F.interpolate(s, size=(height, width), mode="bilinear", align_corners=False) for s in net(x)]
    mean = torch.cat(sides, dim=1).mean(dim=1, keepdim=True)
    # Written as the reference writes it (1 / (1 + e^-m)) rather than torch.sigmoid, to stay bit-equal.
    edges = 1.0 / (1.0 + torch.exp(-mean))
    return edges.clamp_(0.0, 1.0).float()


def hed_expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter name of ControlNetHED.pth with its shape, read off a meta-device HEDNetwork."""
    return meta_shapes(HEDNetwork)


def load_hed(state_dict: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> HEDNetwork:
    """Strictly load a ControlNetHED state dict into a float32 HEDNetwork in eval mode."""
    not_tensor = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensor:
        raise HEDCheckpointError(f"HED annotator: entries that are not tensors: {not_tensor}; {HED_FILE_HINT}")
    try:
        check_strict(hed_expected_shapes(), state_dict, "HED annotator")
    except CheckpointError as e:
        raise HEDCheckpointError(f"{e}\n{HED_FILE_HINT}") from None
    not_float = [k for k, v in state_dict.items() if not torch.is_floating_point(v)]
    if not_float:
        raise HEDCheckpointError(f"HED annotator: non-float tensors {not_float}; {HED_FILE_HINT}")
    with torch.device("meta"):
        net = HEDNetwork()
    # The release is fp16; the reference loads it into a float32 module, so upcast here too.
    weights = {k: v.detach().to(device=device or "cpu", dtype=torch.float32) for k, v in state_dict.items()}
    net.load_state_dict(weights, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def read_hed_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .pth (torch.load weights_only=True) or .safetensors HED file, with clear errors."""
    try:
        return read_state_dict(os.fspath(path))
    except CheckpointError as e:
        raise HEDCheckpointError(f"{e}\n{HED_FILE_HINT} (29.4 MB)") from None


def load_hed_file(path: str | os.PathLike, device: torch.device | str | None = None) -> HEDNetwork:
    """read_hed_file + load_hed."""
    return load_hed(read_hed_file(path), device=device)
