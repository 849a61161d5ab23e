"""ControlAR nodes over kernels/controlar: types, loaders, text encode and VQ decode (nodes.py), and the
sampler (sampler.py)."""
from .nodes import NODES as _NODES
from .sampler import NODES as _SAMPLER

NODES = [*_NODES, *_SAMPLER]
