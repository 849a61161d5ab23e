"""Thin ComfyUI nodes wrapping kernels/, laid out as kernels/ is: one subpackage per model family
(pixart/, easycontrol/, dit4sr/, controlar/) and, at the top, what several families share: the T5 loader
(t5_encoder), control-image preprocessing, tiled VAE decode, weight storage choices (weight_dtype), input
checks, the NaN/Inf step guard (finite_guard) and the host differences (comfy_compat). A shared module
imports no family and no family imports another (tests/test_layout.py)."""
from .control_preprocess import NODES as _CONTROL_PREPROCESS
from .controlar import NODES as _CONTROLAR
from .dit4sr import NODES as _DIT4SR
from .easycontrol import NODES as _EASYCONTROL
from .pixart import NODES as _PIXART
from .t5_encoder import NODES as _T5_ENCODER
from .vae_decode import NODES as _VAE_DECODE

ALL_NODES = [
    *_T5_ENCODER,
    *_PIXART,
    *_CONTROL_PREPROCESS,
    *_VAE_DECODE,
    *_EASYCONTROL,
    *_DIT4SR,
    *_CONTROLAR,
]
