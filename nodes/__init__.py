"""Thin ComfyUI nodes, one module per capability, wrapping kernels/."""
from .dit_loader import NODES as _DIT_LOADER
from .lcm_sampler import NODES as _LCM_SAMPLER
from .text_encoder import NODES as _TEXT_ENCODER

ALL_NODES = [*_DIT_LOADER, *_TEXT_ENCODER, *_LCM_SAMPLER]
