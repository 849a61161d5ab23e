"""EasyControl-on-FLUX nodes over kernels/flux_easycontrol: the LoRA loader and Apply EasyControl
(nodes.py), and the patches they install on core's FLUX model (model.py)."""
from .nodes import NODES as NODES  # the family's nodes, for nodes/__init__.py
