"""Benchmark: the micro PixArt-δ's measured metrics through the shipped graphs with every loader's `compute_dtype`
at `auto` and at `bf16`, in one run on one server — does bf16 maths keep what the model draws?

    .venv/bin/python tests/benchmarks/bench_micro_bf16.py [--captions 16] [--scenes 6]

The checks of tests/api/test_api_micro_model.py (its graphs, sizes, prompts and scenes): caption agreement of the
LCM graph (4 steps, cfg 1) and of the PixArt-α graph (DPM-Solver++ 20 steps, CFG 4.5) on held-out captions, and
the ControlNet graph's edge F1 at strength 0 and 1 — once with the shipped `compute_dtype: auto`, once with `bf16`
on every loader that has it (DiT / ControlNet checkpoint loader and T5), plus each graph's seconds per picture.
`bf16` is refused on a CPU without native bf16 (nothing to measure there). Not a test: ~5 min on 2 cores.

Writes bench_results/micro_bf16.json and prints the table of tests/benchmarks/README.md.
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


def with_compute(g: dict, dtype: str) -> dict:
    for node in g.values():
        if "compute_dtype" in node["inputs"]:
            node["inputs"]["compute_dtype"] = dtype
    return g


def main():
    from dit_control.tests.api import test_api_micro_model as micro
    from dit_control.tests.api.api_graphs import with_prompt
    from dit_control.tests.training.metrics import caption_agreement, image_edge_f1
    from dit_control.tests.training.scenes import heldout_scenes
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--scenes", type=int, default=6)
    args = parser.parse_args()
    captions = [s.caption for s in heldout_scenes()[:args.captions]]
    scenes = list(heldout_scenes()[16:16 + args.scenes])
    models = make_all(REPO / ".comfy_host" / "models")
    results = {}
    with ComfyServer(models, base_dir=REPO / ".comfy_host" / "bench_micro_bf16") as server:
        inputs = [(name, scene.caption_without_places, control) for name, scene, control
                  in micro.write_control_inputs(server.base_dir / "input", scenes, "micro_bf16")]

        def timed_picture(graph):
            start = time.monotonic()
            image = micro.picture(server, graph)
            return image, time.monotonic() - start

        for dtype in ("auto", "bf16"):
            row, seconds = {}, {}
            for workflow in ("pixart_delta_lcm_t2i", "pixart_alpha_t2i"):
                scores, secs = [], []
                for caption in captions:
                    g = with_compute(with_prompt(micro.at_micro_size(micro.shipped(workflow)), caption), dtype)
                    image, s = timed_picture(g)
                    scores.append(caption_agreement(image, caption))
                    secs.append(s)
                row[f"{workflow} caption agreement"] = round(float(np.mean(scores)), 3)
                seconds[workflow] = round(float(np.median(secs)), 2)
            for strength in (0.0, 1.0):
                f1, secs = [], []
                for name, caption, control in inputs:
                    g = with_compute(micro.canny_controlnet_graph(name, caption, strength=strength), dtype)
                    image, s = timed_picture(g)
                    f1.append(image_edge_f1(image, control))
                    secs.append(s)
                row[f"pixart_delta_controlnet edge F1 at {strength:g}"] = round(float(np.mean(f1)), 3)
                seconds[f"pixart_delta_controlnet {strength:g}"] = round(float(np.median(secs)), 2)
            results[dtype] = {"metrics": row, "seconds_per_picture": seconds}
            print(dtype, results[dtype])
    path = save_results("micro_bf16", {"captions": len(captions), "scenes": len(scenes), **results})
    print("\n| check | auto | bf16 |\n|---|---|---|")
    for key in results["auto"]["metrics"]:
        print(f"| {key} | {results['auto']['metrics'][key]:.3f} | {results['bf16']['metrics'][key]:.3f} |")
    for key in results["auto"]["seconds_per_picture"]:
        print(f"| s / picture, {key} | {results['auto']['seconds_per_picture'][key]:.2f} | "
              f"{results['bf16']['seconds_per_picture'][key]:.2f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
