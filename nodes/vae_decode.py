"""VAE decode in one tiled pass: the low-memory decode of PixArt-δ's 1024 px images, at a third of the
cost of core's tiled decode (which decodes everything three times). Wraps kernels/tiled_decode.py."""
from __future__ import annotations

from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..kernels.tiled_decode import tiled_decode
from .input_checks import log_adjusted_once, refuse_over_free_memory

CATEGORY = "DiT Control/latent"
NODE = "VAE Decode (Tiled, one pass)"


class VAEDecodeTiledOnePass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTControl_VAEDecodeTiledOnePass",
            display_name="VAE Decode (Tiled, one pass)",
            category=CATEGORY,
            description="Decodes the latent tile by tile so that memory stays at one tile's activations. "
                        "Each pixel is decoded once (core's VAE Decode (Tiled) decodes it three times "
                        "and averages); tiles overlap and are cross-faded with linear ramps. For image "
                        "VAEs (SD, SDXL, FLUX...), not video.",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode."),
                io.Vae.Input("vae", tooltip="The VAE (e.g. sd-vae-ft-ema for PixArt)."),
                io.Int.Input("tile_size", default=512, min=128, max=4096, step=64,
                             tooltip="Tile edge in image pixels. Bigger: fewer seams' worth of context "
                                     "lost, more memory."),
                io.Int.Input("overlap", default=64, min=0, max=2048, step=32,
                             tooltip="Minimum overlap of neighbouring tiles in image pixels, cross-faded. "
                                     "At most half the tile size."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded image.")],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size=512, overlap=64) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 4:
            raise ValueError(f"VAE Decode (Tiled, one pass) takes image latents [B, C, H, W]; got shape "
                             f"{tuple(latent.shape)} (video latents: use core's VAE Decode (Tiled))")
        scale = vae.spacial_compression_decode()
        if not isinstance(scale, int):
            raise ValueError(f"this VAE's spatial compression is {scale!r}, not a plain factor; "
                             f"use core's VAE Decode (Tiled)")
        batch, _, height, width = latent.shape
        pixels = batch * height * width * scale * scale
        # the float32 image accumulates here (3 channels + a blend weight per pixel) and is handed on as a
        # clamped [B, H, W, C] copy; a tile's decode is small beside them
        refuse_over_free_memory(
            NODE, f"a {width * scale}×{height * scale} px image (batch {batch})", 4 * (3 + 1 + 3) * pixels,
            mm.intermediate_device(), "the float32 image, its blend weights and the clamped copy it hands on",
            "Decode a smaller latent or batch (e.g. one image at a time with core's Latent From Batch).")
        tile = max(tile_size // scale, 1)
        lap = min(overlap // scale, tile // 2)
        if lap < overlap // scale:
            log_adjusted_once(NODE, "overlap", overlap, lap * scale,
                              f"at most half the tile size {tile_size}")
        pbar = None

        def on_tile(done, total):
            nonlocal pbar
            if pbar is None:
                pbar = comfy.utils.ProgressBar(total)
            pbar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        # vae.decode gives [B, H, W, C] in 0..1 on ComfyUI's output device; the kernel blends [B, C, H, W]
        image = tiled_decode(latent, lambda z: vae.decode(z).movedim(-1, 1), tile=tile, overlap=lap,
                             scale=scale, on_tile=on_tile)
        return io.NodeOutput(image.movedim(1, -1).clamp(0.0, 1.0))


NODES = [VAEDecodeTiledOnePass]
