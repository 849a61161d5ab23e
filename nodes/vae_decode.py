"""VAE decode in one tiled pass: the low-memory decode of PixArt-δ's 1024 px images, at a third of the
cost of core's tiled decode (which decodes everything three times). Wraps kernels/tiled_decode.py."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..kernels.tiled_decode import tiled_decode

CATEGORY = "DiT Control/latent"


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
        tile = max(tile_size // scale, 1)
        lap = min(overlap // scale, tile // 2)
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
