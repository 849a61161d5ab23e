"""EasyControl-on-FLUX nodes over kernels/flux_easycontrol: the LoRA loader and Apply EasyControl
(nodes.py), the patches they install on core's FLUX model (model.py), and the condition-image nodes for
the inpainting and HED sketch LoRAs (conditions.py)."""
from .conditions import NODES as _CONDITION_NODES
from .nodes import NODES as _APPLY_NODES

NODES = [*_APPLY_NODES, *_CONDITION_NODES]  # the family's nodes, for nodes/__init__.py
