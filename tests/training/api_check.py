"""Run the shipped workflows through a real ComfyUI on trained files and score the pictures.

    python tests/training/api_check.py --out DIR [--size 256] [--caption "..."]

DIR/models (what train.py wrote) gets the pixel VAE under the shipped VAE name (vae/sd-vae-ft-ema.safetensors)
and serves as the server's model folder. The three PixArt graphs run as shipped except: the image size
(EmptyLatentImage, Fit Control Image) is --size, the prompt is the caption, and the ControlNet graph takes
Canny edges (our Canny Edge node at its defaults) of a rendered scene instead of HED soft edges — the micro
ControlNet is trained on Canny maps. Prints caption agreement / edge F1 per graph and saves the PNGs to
DIR/api_check/. Not a test (it needs trained files); the API tests of issue 15 grow from it.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

from dit_control.tests.api.api_graphs import at_size, canny_instead_of_hed, with_prompt

from dit_control.tests.training.metrics import caption_agreement, image_edge_f1
from dit_control.tests.training.pixel_vae import save_pixel_vae
from dit_control.tests.training.scenes import edge_map, heldout_scenes, render

REPO = Path(__file__).resolve().parents[2]


def shipped(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


def png_to_array(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32) / 255.0


def main(argv=None):
    from PIL import Image
    from dit_control.tests.comfy_host import ComfyServer
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--scene", type=int, default=0, help="index of the held-out scene to draw")
    args = p.parse_args(argv)
    out = Path(args.out)
    models = out / "models"
    vae = models / "vae" / "sd-vae-ft-ema.safetensors"
    if not vae.exists():
        save_pixel_vae(vae)
    scene = heldout_scenes()[args.scene]
    save = out / "api_check"
    save.mkdir(parents=True, exist_ok=True)
    report = {"caption": scene.caption, "size": args.size}
    with ComfyServer(models, base_dir=save / "comfy_base") as server:
        inputs = save / "comfy_base" / "input"
        inputs.mkdir(parents=True, exist_ok=True)
        gt = render(scene, args.size) if args.size == 256 else render(scene)
        Image.fromarray((gt * 255).round().astype(np.uint8)).save(inputs / "pixart_delta_controlnet_input.png")
        for name in ("pixart_delta_lcm_t2i", "pixart_alpha_t2i", "pixart_delta_controlnet"):
            graph = shipped(name)
            at_size(graph, args.size)
            with_prompt(graph, scene.caption)
            if name == "pixart_delta_controlnet":
                canny_instead_of_hed(graph)
            history = server.run(graph)
            if history.get("status", {}).get("status_str") != "success":
                report[name] = {"error": history.get("status")}
                continue
            data = server.images(history)[0]
            (save / f"{name}.png").write_bytes(data)
            img = png_to_array(data)
            entry = {"caption_agreement": caption_agreement(img, scene.caption) if img.shape[0] == 256 else None}
            if name == "pixart_delta_controlnet" and img.shape[0] == 256:
                entry["edge_f1"] = image_edge_f1(img, edge_map(gt))
            report[name] = entry
    (save / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
