"""Graph pieces several API test modules add to a shipped workflow."""
from __future__ import annotations

import itertools


def add_lcm_control_latents(g: dict, *, model: str, apply_controlnet: str, empty_latent: str, control_image: str,
                            vae: str, seed: int, prefix: str) -> dict:
    """Nodes 20-25: a 4-step LCM SamplerCustom (cfg 1) on the Apply ControlNet node's conditioning, saving its
    latent (node 23), and the control latent the control network sees — the VAE encode of the (already
    latent-sized) control image — saved as node 25. The kernel-loop references of the per-step control tests
    are built from these two."""
    g["20"] = {"class_type": "DiTControl_LCMScheduler", "inputs": {"model": [model, 0], "steps": 4,
                                                                   "rule": "diffusers"}}
    g["21"] = {"class_type": "DiTControl_LCMSampler", "inputs": {}}
    g["22"] = {"class_type": "SamplerCustom", "inputs": {
        "model": [model, 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0, "positive": [apply_controlnet, 0],
        "negative": [apply_controlnet, 1], "sampler": ["21", 0], "sigmas": ["20", 0],
        "latent_image": [empty_latent, 0]}}
    g["23"] = {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0], "filename_prefix": f"{prefix}/out"}}
    g["24"] = {"class_type": "VAEEncode", "inputs": {"pixels": [control_image, 0], "vae": [vae, 0]}}
    g["25"] = {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": f"{prefix}/ctrl"}}
    return g


_SERVED = itertools.count()


def served_latent_graph(g: dict, sampler: str) -> dict:
    """A cheap prompt that shows the server still serves after an error: `g` (a PixArt graph already at a small
    size) with its VAE decode and image save replaced by SaveLatent of `sampler`'s output, and a new seed each
    call, so the sampler really runs rather than answering from ComfyUI's cache."""
    for key in [k for k, v in g.items() if v["class_type"] in ("VAELoader", "VAEDecode", "SaveImage")]:
        del g[key]
    g[sampler]["inputs"]["seed"] = 1000 + next(_SERVED)
    g["served"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": "served/ok"}}
    return g


def first_node(g: dict, class_type: str) -> str:
    """Id of the graph's first node of this class."""
    return next(k for k, v in g.items() if v["class_type"] == class_type)


def at_size(g: dict, size: int) -> dict:
    """Every EmptyLatentImage and Fit Control Image of the graph set to size × size."""
    for node in g.values():
        if node["class_type"] in ("EmptyLatentImage", "DiTControl_FitControlImage"):
            node["inputs"].update(width=size, height=size)
    return g


# What a shipped 1024 px PixArt graph's API run renders at: the full-size VAE decode (and, in the control graphs,
# the HED map and the control image's encode) costs one to two minutes a run at 1024 px on a 2-core CPU. The LCM
# flagship runs at its 1024 px (as the main job does); the control graphs at 512 px on the main host; the
# compatibility pass (the floor host, 0.3.75), which checks the same nodes and code paths on the older core, at
# the micro model's 256 px.
FLOOR_PASS_SIZE = 256


def at_pass_size(comfy, g: dict, shipped_size: int, main_host_size: int | None = None) -> int:
    """The shipped graph at the size this host's pass runs it (see FLOOR_PASS_SIZE); returns that size."""
    from dit_control.tests.comfy_host import FLOOR_HOST
    size = FLOOR_PASS_SIZE if comfy.host == FLOOR_HOST else (main_host_size or shipped_size)
    if size != shipped_size:
        at_size(g, size)
    return size


def with_prompt(g: dict, caption: str) -> dict:
    """The positive prompt (the PixArt encode node with a non-empty text in the shipped graph) set to `caption`."""
    (positive,) = [k for k, v in g.items()
                   if v["class_type"] == "DiTControl_PixArtT5TextEncode" and v["inputs"]["text"]]
    g[positive]["inputs"]["text"] = caption
    return g


def canny_instead_of_hed(g: dict) -> dict:
    """The HED loader and HED Soft Edge node replaced by our Canny Edge node at its defaults (100 / 200): the
    micro demo ControlNet is trained on Canny maps (no HED weights can be had here; the embedded HED file is
    random)."""
    hed, loader = first_node(g, "DiTControl_HEDSoftEdge"), first_node(g, "DiTControl_HEDLoader")
    g[hed] = {"class_type": "DiTControl_CannyEdge",
              "inputs": {"image": g[hed]["inputs"]["image"], "low_threshold": 100, "high_threshold": 200}}
    del g[loader]
    return g
