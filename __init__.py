"""dit-control: controllable diffusion transformers (PixArt-δ, EasyControl, DiT4SR, ControlAR) for ComfyUI.

ComfyUI imports this package; it registers the nodes through the V3 entry point.
kernels/ holds the model math and imports nothing from ComfyUI.
"""
from comfy_api.latest import ComfyExtension, io

from .nodes import ALL_NODES


class DiTControlExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(ALL_NODES)


async def comfy_entrypoint() -> DiTControlExtension:
    return DiTControlExtension()
