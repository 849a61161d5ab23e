"""Thin ComfyUI nodes, one module per capability, wrapping kernels/."""
from .control_preprocess import NODES as _CONTROL_PREPROCESS
from .controlar import NODES as _CONTROLAR
from .controlar_sampler import NODES as _CONTROLAR_SAMPLER
from .controlnet import NODES as _CONTROLNET
from .dit4sr import NODES as _DIT4SR
from .dit_loader import NODES as _DIT_LOADER
from .easycontrol import NODES as _EASYCONTROL
from .lcm_sampler import NODES as _LCM_SAMPLER
from .relactrl import NODES as _RELACTRL
from .text_encoder import NODES as _TEXT_ENCODER
from .vae_decode import NODES as _VAE_DECODE

ALL_NODES = [
    *_DIT_LOADER,
    *_TEXT_ENCODER,
    *_LCM_SAMPLER,
    *_CONTROLNET,
    *_RELACTRL,
    *_CONTROL_PREPROCESS,
    *_VAE_DECODE,
    *_EASYCONTROL,
    *_DIT4SR,
    *_CONTROLAR,
    *_CONTROLAR_SAMPLER,
]
