"""Benchmark: one controllability table for the pack's control methods on the same footing — the micro models
trained here (tests/training/), the same held-out scenes, the same Canny maps, the same prompts, through the
shipped graphs on a real ComfyUI server.

    .venv/bin/python tests/benchmarks/bench_controllability.py [--scenes 6]

Rows: PixArt-δ ControlNet-Transformer (`pixart_delta_controlnet`, HED swapped for our Canny Edge node as in the
micro model's API test) and ControlAR (`controlar_canny_mr`), each at strength 0 and 1. Per row: edge F1 of the
output's Canny map against the control (ControlNet++'s measure, 4 px), caption agreement against the scene's full
caption (tests/training/metrics.py), seconds per image (the prompt's wall time through the server, warm), and the
parameters of the control path (what the control adds to its base). Every graph runs at the micro models' 256 px;
the prompt is the scene's caption without its places, so the layout can only come from the control map.

Writes bench_results/controllability.json and prints the table of tests/benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.comfy_host import ComfyServer  # noqa: E402
from dit_control.tests.generators.make_checkpoints import make_all  # noqa: E402
from dit_control.tests.training.metrics import caption_agreement, image_edge_f1  # noqa: E402
from dit_control.tests.training.scenes import SIZE, heldout_scenes  # noqa: E402

STRENGTHS = (0.0, 1.0)


def pixart_graph(image: str, prompt: str, strength: float) -> dict:
    from dit_control.tests.api.test_api_micro_model import canny_controlnet_graph
    return canny_controlnet_graph(image, prompt, strength=strength)


def controlar_graph(image: str, prompt: str, strength: float) -> dict:
    """The shipped canny_MR graph at 256×256 (the micro network is trained at 384×256 and 256×256)."""
    from dit_control.tests.api.api_graphs import first_node
    from dit_control.tests.api.test_api_controlar_micro import SAMPLER, control_graph
    g = control_graph("mr", image, prompt, strength)
    g[first_node(g, "DiTControl_FitControlImage")]["inputs"].update(width=SIZE, height=SIZE)
    g[first_node(g, SAMPLER)]["inputs"].update(width=SIZE, height=SIZE)
    return g


def pixart_control_params(models: Path) -> int:
    import torch
    sd = torch.load(models / "controlnet" / "PixArt-XL-2-1024-ControlNet.pth", map_location="cpu",
                    weights_only=True)["state_dict"]
    return sum(v.numel() for k, v in sd.items() if not k.startswith("base_model."))


CONTROLAR_CONTROL = ("adapter.", "adapter_mlp.", "condition_layers.")   # DINOv2 encoder, its MLP, the injections


def controlar_control_params(models: Path) -> int:
    from safetensors.torch import load_file
    sd = load_file(str(models / "controlar" / "canny_MR.safetensors"))
    return sum(v.numel() for k, v in sd.items() if k.startswith(CONTROLAR_CONTROL))


METHODS = {
    "PixArt-δ ControlNet-Transformer": (pixart_graph, pixart_control_params),
    "ControlAR (canny_MR)": (controlar_graph, controlar_control_params),
}


def picture(server, graph: dict) -> tuple:
    """(the graph's picture, the prompt's wall time through the server)."""
    from dit_control.tests.api.test_api_micro_model import picture as micro_picture
    start = time.monotonic()
    image = micro_picture(server, graph)
    return image, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=6)
    args = parser.parse_args()
    models = make_all(REPO / ".comfy_host" / "models")
    base = REPO / ".comfy_host" / "bench_controllability"
    scenes = list(heldout_scenes()[16:16 + args.scenes])          # the micro model API test's control scenes
    rows = []
    with ComfyServer(models, base_dir=base, probe=True) as server:
        from dit_control.tests.api.test_api_micro_model import write_control_inputs
        inputs = write_control_inputs(server.base_dir / "input", scenes, "controllability")
        for method, (make_graph, params) in METHODS.items():
            picture(server, make_graph(inputs[0][0], inputs[0][1].caption_without_places, 1.0))   # warm-up
            for strength in STRENGTHS:
                f1, agree, secs = [], [], []
                for name, scene, control in inputs:
                    image, seconds = picture(server, make_graph(name, scene.caption_without_places, strength))
                    f1.append(image_edge_f1(image, control))
                    agree.append(caption_agreement(image, scene.caption))
                    secs.append(seconds)
                rows.append({"method": method, "strength": strength, "edge_f1": round(float(np.mean(f1)), 3),
                             "caption_agreement": round(float(np.mean(agree)), 3),
                             "seconds_per_image": round(float(np.median(secs)), 2),
                             "control_params": params(models)})
                print(rows[-1])
    import platform
    path = save_results("controllability", {"machine": platform.processor() or platform.machine(),
                                            "scenes": len(scenes), "size": SIZE, "rows": rows})
    print("\n| method | strength | edge F1 | caption agreement | s / image | control-path parameters |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['strength']:g} | {r['edge_f1']:.2f} | {r['caption_agreement']:.2f} | "
              f"{r['seconds_per_image']:.1f} | {r['control_params'] / 1e6:.2f} M |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
