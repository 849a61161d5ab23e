"""Condition-image nodes for the EasyControl LoRAs whose maps are made from a photo (issue 28): the
inpainting condition (the photo with the hole painted black) and the HED sketch (HED soft edges made into
the black-on-white sketch the hedsketch LoRA was trained on). The math is in
kernels/flux_easycontrol/condition_image.py; these nodes only pass ComfyUI's IMAGE / MASK through it.
Depth, pose and segmentation maps come from the user's preprocessor pack, as they are."""
from __future__ import annotations

from comfy_api.latest import io

import comfy.model_management as mm

from ...kernels.flux_easycontrol.condition_image import HED_SKETCH_THRESHOLD, hed_sketch, inpainting_condition

CATEGORY = "DiT Control/EasyControl"


class EasyControlInpaintingCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_EasyControlInpaintingCondition",
            display_name="EasyControl Inpainting Condition",
            category=CATEGORY,
            description="The condition image the EasyControl inpainting LoRA takes: the photo with the region "
                        "to repaint painted pure black, as in EasyControl's own example (test_imgs/inpainting.png). "
                        "Feed it to Apply EasyControl with inpainting.safetensors; the whole picture is generated "
                        "anew from it (the reference pastes nothing back).",
            inputs=[
                io.Image.Input("image", tooltip="The photo to repaint."),
                io.Mask.Input("mask", tooltip="1 where the picture is to be repainted (Load Image Mask, or the MASK "
                                              "of Load Image's mask editor). Pixels at 0.5 or more are blacked out; "
                                              "a mask of another size is resized to the photo's."),
            ],
            outputs=[io.Image.Output(tooltip="The photo with the masked region black, same size, 3 channels.")],
        )

    @classmethod
    def execute(cls, image, mask) -> io.NodeOutput:
        return io.NodeOutput(inpainting_condition(image, mask).to(mm.intermediate_device()))


class EasyControlHEDSketch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_EasyControlHEDSketch",
            display_name="EasyControl HED Sketch",
            category=CATEGORY,
            description="Makes HED soft edges into the sketch the EasyControl hedsketch LoRA was trained on "
                        "(UniControl's MultiGen-20M 'hedsketch'): the 8-bit edge map binarised at the threshold, "
                        "inverted to black strokes on white, blurred 3×3. Link HED Soft Edge's output here.",
            inputs=[
                io.Image.Input("edges", tooltip="HED soft edges, white on black (HED Soft Edge)."),
                io.Int.Input("threshold", default=HED_SKETCH_THRESHOLD, min=0, max=255,
                             tooltip="Edge strength (0..255) above which a pixel becomes a stroke. The training "
                                     "data drew it from 110..159 per image; lower keeps fainter edges."),
            ],
            outputs=[io.Image.Output(tooltip="Black strokes on white, same size, 3 channels.")],
        )

    @classmethod
    def execute(cls, edges, threshold=HED_SKETCH_THRESHOLD) -> io.NodeOutput:
        return io.NodeOutput(hed_sketch(edges, threshold).to(mm.intermediate_device()))


NODES = [EasyControlInpaintingCondition, EasyControlHEDSketch]
