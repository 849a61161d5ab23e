"""The released files the shipped workflows load: the name a loader's dropdown shows, the models folder it sits in,
and where users download it (README, "Where the real checkpoints go" and each family's Files table;
../shared/specs and manifests). tests/generators/workflow_format.py writes them into every UI workflow — each loader
node's
`properties.models` (`name`, `url`, `directory`), which ComfyUI's frontend (1.48.7) reads when a graph opens: a
file its dropdown does not list is shown under "Missing Models" with this link and folder — and the graph's
Markdown note. tests/test_node_docs.py and tests/api/test_frontend.py check them.

`directory` is the folder key of ComfyUI's model registry (folder_paths), the name the frontend files a model
under: core's `diffusion_models`, `text_encoders`, `vae`, `controlnet`, `loras`, and this pack's `annotators` and
`controlar` (nodes/control_preprocess.py, nodes/controlar/nodes.py).
"""
from __future__ import annotations

from dataclasses import dataclass

HF = "https://huggingface.co"


@dataclass(frozen=True)
class ModelFile:
    name: str                 # as the dropdown lists it: the path under the models folder
    directory: str            # folder_paths key
    repo: str                 # Hugging Face repository
    path: str                 # the file in the repository
    beside: tuple = ()        # repository files that must sit next to it (same relative place)
    gated: bool = False       # the repository asks users to log in and accept its licence first
    unconfirmed: str = ""     # what about the release is not confirmed

    @property
    def url(self) -> str:
        return f"{HF}/{self.repo}/resolve/main/{self.path}"

    @property
    def page(self) -> str:
        return f"{HF}/{self.repo}"

    @property
    def renamed(self) -> bool:
        """The dropdown name is not the repository's file name (the file is saved under another name)."""
        return self.name.rsplit("/", 1)[-1] != self.path.rsplit("/", 1)[-1]


def _files(*files: ModelFile) -> dict:
    return {f.name: f for f in files}


T5_XXL_COMFY = ModelFile("t5xxl_fp16.safetensors", "text_encoders", "comfyanonymous/flux_text_encoders",
                         "t5xxl_fp16.safetensors")
SD_VAE = ModelFile("sd-vae-ft-ema.safetensors", "vae", "stabilityai/sd-vae-ft-ema",
                   "diffusion_pytorch_model.safetensors")
HED = ModelFile("ControlNetHED.pth", "annotators", "lllyasviel/Annotators", "ControlNetHED.pth")

PIXART = _files(
    ModelFile("PixArt-XL-2-512x512.pth", "diffusion_models", "PixArt-alpha/PixArt-alpha", "PixArt-XL-2-512x512.pth"),
    ModelFile("PixArt-LCM-XL-2-1024-MS/transformer/diffusion_pytorch_model.safetensors", "diffusion_models",
              "PixArt-alpha/PixArt-LCM-XL-2-1024-MS", "transformer/diffusion_pytorch_model.safetensors",
              beside=("transformer/config.json",)),
    ModelFile("PixArt-XL-2-1024-ControlNet.pth", "controlnet", "PixArt-alpha/PixArt-ControlNet",
              "PixArt-XL-2-1024-ControlNet.pth"),
    ModelFile("relactrl_pixart_canny_1024.pth", "controlnet", "qihoo360/RelaCtrl", "relactrl_pixart_canny_1024.pth",
              unconfirmed="the file name in the repository (the RelaCtrl code's default name is used) and whether "
                          "it carries the PixArt base"),
    T5_XXL_COMFY, SD_VAE, HED)

FLUX = _files(
    ModelFile("flux1-dev.safetensors", "diffusion_models", "black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors",
              gated=True),
    ModelFile("ae.safetensors", "vae", "black-forest-labs/FLUX.1-dev", "ae.safetensors", gated=True),
    ModelFile("clip_l.safetensors", "text_encoders", "comfyanonymous/flux_text_encoders", "clip_l.safetensors"),
    T5_XXL_COMFY,
    *(ModelFile(f"{kind}.safetensors", "loras", "Xiaojiu-Z/EasyControl", f"models/{kind}.safetensors")
      for kind in ("canny", "subject", "Ghibli", "inpainting", "hedsketch", "depth", "pose", "seg")),
    HED)

SD35 = "stabilityai/stable-diffusion-3.5-medium"
DIT4SR = _files(
    ModelFile("dit4sr_q/transformer/diffusion_pytorch_model.safetensors", "diffusion_models", "acceptee/DiT4SR",
              "dit4sr_q/transformer/diffusion_pytorch_model.safetensors", beside=("dit4sr_q/transformer/config.json",)),
    *(ModelFile(name, "text_encoders", SD35, f"text_encoders/{name}", gated=True)
      for name in ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")),
    ModelFile("sd3.5_vae.safetensors", "vae", SD35, "vae/diffusion_pytorch_model.safetensors", gated=True))

CONTROLAR = _files(
    # the checkpoints link of hustvl/ControlAR's README points at this repository
    *(ModelFile(name, "controlar", "wondervictor/ControlAR", name)
      for name in ("canny_MR.safetensors", "hed.safetensors")),
    ModelFile("vq_ds16_t2i.pt", "controlar", "peizesun/llamagen_t2i", "vq_ds16_t2i.pt"),
    ModelFile("flan-t5-xl/model-00001-of-00002.safetensors", "text_encoders", "google/flan-t5-xl",
              "model-00001-of-00002.safetensors",
              beside=("model-00002-of-00002.safetensors", "model.safetensors.index.json")),
    HED)

# which family's files each shipped workflow loads (a name means the same file within one family)
FAMILY_OF_WORKFLOW = {
    "pixart_alpha_t2i": PIXART, "pixart_delta_lcm_t2i": PIXART, "pixart_delta_lcm_t2i_int8": PIXART,
    "pixart_delta_controlnet": PIXART, "pixart_relactrl_canny": PIXART,
    "easycontrol_canny": FLUX, "easycontrol_subject": FLUX, "easycontrol_subject_canny": FLUX,
    **{f"easycontrol_{kind}": FLUX for kind in ("ghibli", "inpainting", "hedsketch", "depth", "pose", "seg",
                                                "canny_img2img")},
    "dit4sr_upscale_x4": DIT4SR,
    "controlar_canny_mr": CONTROLAR, "controlar_hed_512": CONTROLAR,
}

# the folder a core loader's file input lists (what the frontend's model-to-node map says for VAELoader and
# UNETLoader; DualCLIPLoader / TripleCLIPLoader list text_encoders and have no entry there)
CORE_LOADER_FOLDERS = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("VAELoader", "vae_name"): "vae",
    ("DualCLIPLoader", "clip_name1"): "text_encoders", ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name1"): "text_encoders", ("TripleCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name3"): "text_encoders",
}

# what the frontend counts as a model file name in a combo (MODEL_FILE_EXTENSIONS of its missing-model scan)
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf")


def is_model_file(value) -> bool:
    return isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS)


def model_inputs(api_graph: dict) -> list:
    """[(node id, class, input name, file name)] of every model-file input of an API graph."""
    return [(nid, node["class_type"], name, value) for nid, node in api_graph.items()
            for name, value in node["inputs"].items() if is_model_file(value)]


def files_of(workflow: str, api_graph: dict) -> list:
    """The ModelFiles a shipped workflow loads, in graph order, each once."""
    family = FAMILY_OF_WORKFLOW[workflow]
    out = []
    for _nid, _cls, _name, value in model_inputs(api_graph):
        if value not in family:
            raise KeyError(f"{workflow}: {value} has no entry in tests/generators/model_files.py")
        if family[value] not in out:
            out.append(family[value])
    return out
