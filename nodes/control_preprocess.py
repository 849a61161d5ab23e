"""Control-image preprocessing for PixArt-δ: HED soft edges, Canny edges, fitting to the generation size.

The math lives in kernels/hed.py, kernels/canny.py and kernels/control_image.py; these nodes only move
ComfyUI's IMAGE layout ([B,H,W,C] float in [0,1]) to [B,C,H,W] and back.
"""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..kernels.canny import canny_edges
from ..kernels.control_image import FIT_MODES, edges_to_control_rgb, fit_control_image, resized_size
from ..kernels.hed import HED_BYTES_PER_PIXEL, HEDNetwork, hed_edges, load_hed, read_hed_file
from .input_checks import gib, log_adjusted_once, refuse_over_free_memory

CATEGORY = "DiT Control/PixArt"
ANNOTATORS = "annotators"
HEDModelType = io.Custom("HED_MODEL")


def register_annotators_folder() -> None:
    """models/annotators as a model folder with the usual weight extensions.

    An extra_model_paths.yaml entry `annotators: ...` is loaded before custom nodes and creates the
    folder with an empty extension set (= every file is listed); then only add the extensions.
    """
    default = os.path.join(folder_paths.models_dir, ANNOTATORS)
    if ANNOTATORS not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[ANNOTATORS] = ([default], set(folder_paths.supported_pt_extensions))
        return
    paths, extensions = folder_paths.folder_names_and_paths[ANNOTATORS]
    if not extensions:
        folder_paths.folder_names_and_paths[ANNOTATORS] = (paths, set(folder_paths.supported_pt_extensions))
    if default not in paths:
        folder_paths.add_model_folder_path(ANNOTATORS, default, is_default=True)


register_annotators_folder()


def _image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] -> RGB [B,3,H,W] (an alpha channel is dropped, grey is repeated)."""
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE [B,H,W,C]; got shape {tuple(image.shape)}")
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    return image[..., :3].movedim(-1, 1)


def _bchw_to_image(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(1, -1).contiguous().to(mm.intermediate_device())


class HEDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_HEDLoader",
            display_name="HED Annotator Loader",
            category=CATEGORY,
            description="Loads the HED soft-edge annotator PixArt-δ's ControlNet was trained with "
                        "(ControlNetHED_Apache2). Download ControlNetHED.pth (29.4 MB) from the Hugging "
                        "Face repo lllyasviel/Annotators and put it in models/annotators/.",
            inputs=[
                io.Combo.Input("hed_name", options=folder_paths.get_filename_list(ANNOTATORS),
                               tooltip="HED weights from models/annotators: ControlNetHED.pth from "
                                       "lllyasviel/Annotators (Hugging Face)."),
            ],
            outputs=[HEDModelType.Output("hed_model", tooltip="HED annotator for HED Soft Edge (PixArt-δ).")],
        )

    @classmethod
    def execute(cls, hed_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(ANNOTATORS, hed_name)
        net = load_hed(read_hed_file(path), device="cpu")
        logging.info("dit-control: loaded HED annotator %s", hed_name)
        return io.NodeOutput(net)


class HEDSoftEdge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_HEDSoftEdge",
            display_name="HED Soft Edge (PixArt-δ)",
            category=CATEGORY,
            description="Soft edge map as PixArt-δ's ControlNet app makes it: HED on the image ×255, the "
                        "five side maps upsampled to the image size, averaged, sigmoid. White edges on "
                        "black, repeated to RGB, ready for VAE Encode. Fit the image to the generation "
                        "size first (Fit Control Image), as the app does.",
            inputs=[
                HEDModelType.Input("hed_model", tooltip="From HED Annotator Loader."),
                io.Image.Input("image", tooltip="The image to take edges from (at least 16×16)."),
            ],
            outputs=[io.Image.Output(tooltip="Soft edges in [0,1], same size as the input, 3 channels.")],
        )

    @classmethod
    def execute(cls, hed_model: HEDNetwork, image) -> io.NodeOutput:
        rgb = _image_to_bchw(image)
        device = mm.get_torch_device()
        batch, _, height, width = rgb.shape
        # one image's network activations on the device at a time; the edges of the batch pile up beside them
        refuse_over_free_memory(
            "HED Soft Edge", f"a {width}×{height} px image", HED_BYTES_PER_PIXEL * height * width, device,
            f"HED runs at full resolution, ~{HED_BYTES_PER_PIXEL} bytes of feature maps per pixel",
            "Fit the image to the generation size first (Fit Control Image), as PixArt-δ's app does.")
        progress = comfy.utils.ProgressBar(rgb.shape[0])
        out = []
        hed_model.to(device)
        try:
            for item in rgb.split(1):
                mm.throw_exception_if_processing_interrupted()
                out.append(edges_to_control_rgb(hed_edges(hed_model, item.to(device))).to(mm.intermediate_device()))
                progress.update(1)
        finally:
            hed_model.to("cpu")
        return io.NodeOutput(_bchw_to_image(torch.cat(out)))


class CannyEdge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_CannyEdge",
            display_name="Canny Edge (PixArt-δ)",
            category=CATEGORY,
            description="Canny edges as ControlNet's canny annotator makes them (OpenCV Canny on the 8-bit "
                        "RGB image), white edges on black, repeated to RGB. PixArt-δ was trained on HED "
                        "edges; Canny maps have the same polarity and also work as control.",
            inputs=[
                io.Image.Input("image", tooltip="The image to take edges from."),
                io.Int.Input("low_threshold", default=100, min=0, max=255,
                             tooltip="Gradient below which a pixel is never an edge (OpenCV scale, 0..255)."),
                io.Int.Input("high_threshold", default=200, min=0, max=255,
                             tooltip="Gradient above which a pixel is always an edge; pixels between the "
                                     "thresholds are kept when connected to a strong edge."),
            ],
            outputs=[io.Image.Output(tooltip="Edges: 1 (white) on 0 (black), same size, 3 channels.")],
        )

    @classmethod
    def execute(cls, image, low_threshold=100, high_threshold=200) -> io.NodeOutput:
        if low_threshold > high_threshold:       # OpenCV swaps them without a word
            log_adjusted_once("Canny Edge (PixArt-δ)", "low_threshold / high_threshold",
                              (low_threshold, high_threshold), (high_threshold, low_threshold),
                              "OpenCV takes the smaller as the low threshold")
        rgb = _image_to_bchw(image)
        progress = comfy.utils.ProgressBar(rgb.shape[0])
        out = []
        for item in rgb.split(1):
            mm.throw_exception_if_processing_interrupted()
            out.append(edges_to_control_rgb(canny_edges(item, low_threshold, high_threshold)))
            progress.update(1)
        return io.NodeOutput(_bchw_to_image(torch.cat(out)))


FIT_NODE = "Fit Control Image"
MAX_FIT_SIDE = 8192
# The cover resize of center_crop / pixart_app makes at most this many pixels per image: 4× the largest
# result this node gives (8192², its widgets' max; 3 GiB as float32 RGB), so a picture within 4:1 of the
# target's aspect fits at every target size, while a strip far from it (1×N px) is refused by name instead
# of being blown up into a picture that is almost all cropped away.
MAX_RESIZED_PIXELS = 4 * MAX_FIT_SIDE * MAX_FIT_SIDE


class FitControlImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_FitControlImage",
            display_name="Fit Control Image",
            category=CATEGORY,
            description="Brings a control image to the generation size. PixArt-δ's app resizes the short "
                        "side (bilinear) and centre-crops; 'center_crop' covers the target and crops, "
                        "'resize' stretches, 'pixart_app' repeats the app's rule exactly.",
            inputs=[
                io.Image.Input("image", tooltip="The control image (or an edge map)."),
                io.Int.Input("width", default=1024, min=16, max=MAX_FIT_SIDE, step=16,
                             tooltip="Generation width in pixels (the latent is width/8)."),
                io.Int.Input("height", default=1024, min=16, max=MAX_FIT_SIDE, step=16,
                             tooltip="Generation height in pixels (the latent is height/8)."),
                io.Combo.Input("mode", options=list(FIT_MODES), default="center_crop",
                               tooltip="PixArt-δ's app fits the control image to the generation size by "
                                       "resizing the short side and centre-cropping. 'center_crop': scale "
                                       "to cover width×height, keep aspect, crop the middle. 'resize': "
                                       "stretch to width×height. 'pixart_app': the app's exact rule (short "
                                       "side to min(width, height); pads black if that does not cover)."),
            ],
            outputs=[io.Image.Output(tooltip="The image at height×width.")],
        )

    @classmethod
    def execute(cls, image, width=1024, height=1024, mode="center_crop") -> io.NodeOutput:
        if image.ndim != 4:
            raise ValueError(f"expected an IMAGE [B,H,W,C]; got shape {tuple(image.shape)}")
        batch, in_h, in_w, channels = image.shape
        resized_h, resized_w = resized_size(in_h, in_w, height, width, mode)
        if resized_h * resized_w > MAX_RESIZED_PIXELS:
            raise ValueError(
                f"{FIT_NODE}: a {in_w}×{in_h} px image (aspect {max(in_w, in_h) / min(in_w, in_h):.0f}:1) fitted to "
                f"{width}×{height} by '{mode}' would first be resized to {resized_w}×{resized_h} px "
                f"({gib(resized_h * resized_w * channels * 4)}) and then cropped to {width}×{height}: over this "
                f"node's limit of {MAX_RESIZED_PIXELS // 2**20} Mi px for that step (4× its largest result, "
                f"{MAX_FIT_SIDE}×{MAX_FIT_SIDE}); refused before allocating. Crop the image near the target's "
                f"aspect first (core's ImageCrop), or use mode 'resize' (stretches it, no larger intermediate).")
        # the result batch, plus one image's resize and the antialiased resize's one-axis pass
        needed = 4 * channels * (batch * height * width + 2 * resized_h * resized_w)
        refuse_over_free_memory(FIT_NODE, f"{batch} result(s) of {width}×{height} px", needed, image.device,
                                "float32 pixels of the result batch and of one image's resize",
                                "Use a smaller batch or size.")
        out = torch.empty(batch, height, width, channels, dtype=torch.float32, device=image.device)
        for i in range(batch):         # one image at a time: only one resized intermediate is alive
            mm.throw_exception_if_processing_interrupted()
            fitted = fit_control_image(image[i:i + 1].movedim(-1, 1), height, width, mode)
            out[i] = fitted[0].movedim(0, -1)     # fitted may be a view of the input: clamp the copy only
        return io.NodeOutput(out.clamp_(0.0, 1.0).to(mm.intermediate_device()))


NODES = [HEDLoader, HEDSoftEdge, CannyEdge, FitControlImage]
