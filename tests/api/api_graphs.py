"""Graph pieces several API test modules add to a shipped workflow."""
from __future__ import annotations


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


def first_node(g: dict, class_type: str) -> str:
    """Id of the graph's first node of this class."""
    return next(k for k, v in g.items() if v["class_type"] == class_type)


def at_size(g: dict, size: int) -> dict:
    """Every EmptyLatentImage and Fit Control Image of the graph set to size × size."""
    for node in g.values():
        if node["class_type"] in ("EmptyLatentImage", "DiTControl_FitControlImage"):
            node["inputs"].update(width=size, height=size)
    return g


# The compatibility pass (the floor host, 0.3.75) runs a 1024 px shipped graph at the micro model's size: it
# checks the same nodes and code paths on the older core, and the full-size VAE decode alone is most of a
# minute a run; the graph's own size is checked on the main host.
FLOOR_PASS_SIZE = 256


def at_pass_size(comfy, g: dict, shipped_size: int) -> int:
    """The shipped graph as the host's pass runs it (see FLOOR_PASS_SIZE); returns the image size it makes."""
    from dit_control.tests.comfy_host import FLOOR_HOST
    if comfy.host != FLOOR_HOST:
        return shipped_size
    at_size(g, FLOOR_PASS_SIZE)
    return FLOOR_PASS_SIZE


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
