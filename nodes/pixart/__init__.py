"""PixArt-α/δ and RelaCtrl nodes over kernels/pixart: the DiT as a ComfyUI model (model.py), its loader,
T5 text encode and null caption, the LCM sampler, and the CONTROL_NET for core Apply ControlNet
(controlnet.py, with RelaCtrl as a second control kind in relactrl.py)."""
from .controlnet import NODES as _CONTROLNET
from .lcm_sampler import NODES as _LCM_SAMPLER
from .loader import NODES as _LOADER
from .relactrl import NODES as _RELACTRL
from .text_encode import NODES as _TEXT_ENCODE

NODES = [*_LOADER, *_TEXT_ENCODE, *_LCM_SAMPLER, *_CONTROLNET, *_RELACTRL]
