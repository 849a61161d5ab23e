"""Benchmark: decoding a 1024 px latent with the full-size SD VAE (random weights, fp32) through ComfyUI,
three ways, each on a fresh server: core VAE Decode (untiled), core VAE Decode (Tiled) 512/64, and our
VAE Decode (Tiled, one pass) 512/64. Reports the wall time of the prompt and the server's peak RSS above
its idle RSS.

    .venv/bin/python tests/benchmarks/bench_vae_decode.py [--size 1024]

Writes bench_results/vae_decode.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from dit_control.tests.benchmarks.bench_lcm_vs_dpm import make_bench_models  # noqa: E402
from dit_control.tests.benchmarks.bench_pixart_delta_8gb import proc_status  # noqa: E402
from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.comfy_host import ComfyServer, execution_error  # noqa: E402

DECODERS = {
    "core VAEDecode (untiled)": {"class_type": "VAEDecode", "inputs": {}},
    "core VAEDecodeTiled 512/64": {"class_type": "VAEDecodeTiled",
                                   "inputs": {"tile_size": 512, "overlap": 64, "temporal_size": 64,
                                              "temporal_overlap": 8}},
    "ours VAEDecodeTiledOnePass 512/64": {"class_type": "DiTControl_VAEDecodeTiledOnePass",
                                          "inputs": {"tile_size": 512, "overlap": 64}},
}


def graph(decoder: dict, size: int) -> dict:
    node = {"class_type": decoder["class_type"], "inputs": {**decoder["inputs"], "samples": ["1", 0], "vae": ["2", 0]}}
    return {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
            "2": {"class_type": "VAELoader", "inputs": {"vae_name": "sd-vae-ft-ema.safetensors"}},
            "3": node,
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bench/vae"}}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    models = make_bench_models()
    results = {"size": args.size, "vae": "SD kl-f8 (sd-vae-ft-ema architecture), random, fp32", "rows": []}
    for name, decoder in DECODERS.items():
        base = REPO / ".comfy_host" / "bench_base_vae"
        with ComfyServer(models, base_dir=base) as server:
            pid = server.proc.pid
            idle = proc_status(pid, "VmRSS")
            start = time.time()
            history = server.run(graph(decoder, args.size), timeout=1800)
            seconds = time.time() - start
            if history["status"]["status_str"] != "success":
                raise SystemExit(f"{name} failed: {execution_error(history)}")
            peak = proc_status(pid, "VmHWM")
        row = {"decoder": name, "seconds": round(seconds, 1), "idle_rss_gib": round(idle, 3),
               "peak_rss_gib": round(peak, 3), "peak_above_idle_gib": round(peak - idle, 3)}
        results["rows"].append(row)
        print(row, flush=True)
    by = {r["decoder"]: r["seconds"] for r in results["rows"]}
    results["ours_vs_core_tiled_speed"] = round(by["core VAEDecodeTiled 512/64"] /
                                                by["ours VAEDecodeTiledOnePass 512/64"], 2)
    print("ours is", results["ours_vs_core_tiled_speed"], "x the speed of core's tiled decode")
    save_results("vae_decode", results)


if __name__ == "__main__":
    main()
