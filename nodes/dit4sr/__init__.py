"""DiT4SR nodes over kernels/dit4sr: loader, conditioning and colour fix (nodes.py), and the kernel as a
ComfyUI model (model.py)."""
from .nodes import NODES as NODES  # the family's nodes, for nodes/__init__.py
