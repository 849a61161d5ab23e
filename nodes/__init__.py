"""Thin ComfyUI nodes, one module per capability, wrapping kernels/."""
from .control_preprocess import NODES as _CONTROL_PREPROCESS
from .controlar import NODES as _CONTROLAR
from .controlar_sampler import NODES as _CONTROLAR_SAMPLER
from .controlnet import NODES as _CONTROLNET
from .dit_loader import NODES as _DIT_LOADER
from .easycontrol import NODES as _EASYCONTROL
from .lcm_sampler import NODES as _LCM_SAMPLER
from .text_encoder import NODES as _TEXT_ENCODER
from .vae_decode import NODES as _VAE_DECODE

ALL_NODES = [*_DIT_LOADER, *_TEXT_ENCODER, *_LCM_SAMPLER, *_CONTROLNET, *_CONTROL_PREPROCESS, *_VAE_DECODE, *_EASYCONTROL,
             *_CONTROLAR, *_CONTROLAR_SAMPLER]
