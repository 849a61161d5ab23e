"""Benchmark: PixArt-δ 4-step LCM vs PixArt-α's 20-step DPM-Solver++(2M) with CFG 4.5, through a real
ComfyUI server, same full-size random XL/2 model (1024-MS architecture, diffusers layout), 512 px, one run.

    .venv/bin/python tests/benchmarks/bench_lcm_vs_dpm.py

Each graph runs once to load the models, then again with another seed: only the sampler re-runs
(the loaders and prompt encodes are cached), so the timed run is sampling time inside ComfyUI.
LCM: our LCM Scheduler + LCM Sampler in SamplerCustom, cfg 1 (one batch-1 forward per step).
DPM: core KSampler dpmpp_2m / simple, cfg 4.5 (one batch-2 forward per step).
"""
from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from dit_control.kernels.pixart.model import pixart_xl2_1024_ms  # noqa: E402
from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.comfy_host import ComfyServer, execution_error  # noqa: E402
from dit_control.tests.generators.make_checkpoints import make_all, save_pixart_diffusers  # noqa: E402

BENCH_MODELS = REPO / ".comfy_host" / "bench_models"
DIT = "PixArt-XL-2-random-1024-MS/transformer/diffusion_pytorch_model.safetensors"
T5 = "t5-4096-1layer.safetensors"


def make_bench_models() -> Path:
    """A full-size random XL/2 and a 1-layer T5 with the real 4096-wide output (captions must fit)."""
    from dit_control.tests.generators.make_checkpoints import save_tiny_t5
    made = make_all(REPO / ".comfy_host" / "models")
    dm = BENCH_MODELS / "diffusion_models"
    if not (dm / DIT).exists():
        print("writing a full-size random XL/2 (2.4 GB) ...", flush=True)
        save_pixart_diffusers(dm / Path(DIT).parent, pixart_xl2_1024_ms(null_caption=False), seed=11)
    t5 = BENCH_MODELS / "text_encoders" / T5
    if not t5.exists():
        save_tiny_t5(t5, seed=12, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=1)
    vae = BENCH_MODELS / "vae"
    if not vae.exists():
        vae.symlink_to(made / "vae", target_is_directory=True)
    return BENCH_MODELS


def base_graph(seed):
    return {
        "1": {"class_type": "DiTControl_PixArtDiTLoader", "inputs": {"dit_name": DIT, "weight_dtype": "default",
                                                                     "resolution": "auto"}},
        "2": {"class_type": "DiTControl_PixArtT5Loader", "inputs": {"t5_name": T5, "weight_dtype": "default"}},
        "3": {"class_type": "DiTControl_PixArtT5TextEncode", "inputs": {"t5": ["2", 0], "text": "a lighthouse at dusk",
                                                                        "max_length": 120, "clean_caption": True}},
        "4": {"class_type": "DiTControl_PixArtT5TextEncode", "inputs": {"t5": ["2", 0], "text": "", "max_length": 120,
                                                                        "clean_caption": True}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    }


def lcm_graph(seed):
    g = base_graph(seed)
    g["6"] = {"class_type": "DiTControl_LCMScheduler", "inputs": {"model": ["1", 0], "steps": 4, "rule": "diffusers"}}
    g["7"] = {"class_type": "DiTControl_LCMSampler", "inputs": {}}
    g["8"] = {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": seed,
                                                        "cfg": 1.0,
                                                       "positive": ["3", 0], "negative": ["4", 0], "sampler": ["7", 0],
                                                       "sigmas": ["6", 0], "latent_image": ["5", 0]}}
    g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "bench/lcm"}}
    return g


def dpm_graph(seed):
    g = base_graph(seed)
    g["8"] = {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": 20, "cfg": 4.5,
                                                  "sampler_name": "dpmpp_2m", "scheduler": "simple", "positive": ["3",
                                                                                                                  0],
                                                  "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "bench/dpm"}}
    return g


def timed_run(server, graph):
    start = time.perf_counter()
    h = server.run(graph, timeout=3600)
    if h["status"]["status_str"] != "success":
        raise SystemExit(f"failed: {execution_error(h)}")
    return time.perf_counter() - start


def main():
    models = make_bench_models()
    results = {}
    with ComfyServer(models, log_path=REPO / "bench_results" / "lcm_vs_dpm_server.log") as server:
        for name, make in (("lcm_4_steps", lcm_graph), ("dpmpp_2m_20_steps_cfg4.5", dpm_graph)):
            warm = timed_run(server, make(1))
            timed = timed_run(server, make(2))
            results[name] = {"warm_s": round(warm, 2), "sampling_s": round(timed, 2)}
            print(f"{name:28s} first run {warm:7.1f} s, sampling run {timed:7.1f} s", flush=True)
    ratio = results["dpmpp_2m_20_steps_cfg4.5"]["sampling_s"] / results["lcm_4_steps"]["sampling_s"]
    results["speedup"] = round(ratio, 2)
    print(f"LCM 4 steps is {ratio:.2f}x faster than DPM-Solver++(2M) 20 steps with CFG 4.5")
    save_results("lcm_vs_dpm", results)


if __name__ == "__main__":
    main()
