"""dit-control: controllable diffusion transformers (PixArt-δ, EasyControl, DiT4SR, ControlAR) for ComfyUI.

ComfyUI imports this package; it registers the nodes through the V3 entry point.
kernels/ holds the model math and imports nothing from ComfyUI.
"""
# ComfyUI serves this folder at /extensions/<pack folder>/; the frontend's node help panel reads each node's
# page from docs/<node id>.md there (nodes/web/docs/, written by hand around a block tests/generators/make_node_docs.py
# generates from the node's schema). It holds no .js, so no frontend extension is loaded from it.
WEB_DIRECTORY = "./nodes/web"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:
    # Imported outside a ComfyUI process (pytest collects this folder as a package): no nodes to
    # register. Inside ComfyUI comfy_api always exists, so a real import error cannot hide here.
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import ALL_NODES

    class DiTControlExtension(ComfyExtension):
        async def get_node_list(self):
            return list(ALL_NODES)

    async def comfy_entrypoint() -> DiTControlExtension:
        return DiTControlExtension()
