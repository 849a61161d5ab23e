"""Benchmark: the per-step cost of EasyControl on core's FLUX.1 blocks, full width, one run.

    .venv/bin/python tests/benchmarks/bench_easycontrol_step.py [--double 2 --single 4 --size 1024 --cond 512]

ComfyUI v0.33's own `comfy.ldm.flux.model.Flux`, full width (3072, 24 heads × 128, RoPE axes 16/56/56,
MLP ratio 4, guidance embedder), fewer blocks than FLUX.1-dev's 19 + 38 (default 2 double + 4 single),
random bf16 weights (`comfy.ops.disable_weight_init`: bf16 compute on bf16 weights), batch 1 (CFG 1, as
the shipped graphs), T5-length text (512 tokens), a size×size image (4096 noise tokens at 1024²) and one
spatial condition of cond px ((cond/16)² tokens; 1024 at 512 px) with a full-width rank-128 LoRA.

The conditioned modes run exactly what the nodes install (nodes/easycontrol/model.py, imported as a
package): the BlockPatch on every block, the DIFFUSION_MODEL wrapper, an EasyControlSpec; they reach
core's Flux through `transformer_options` as a ModelPatcher hands them over, and the run is wrapped in
the spec's sampling_run() as the OUTER_SAMPLE wrapper does.

Modes:
- plain:    core's Flux, no patches (what the MODEL does without Apply EasyControl);
- uncached: Apply EasyControl with cache off (condition tokens through every block at every step);
- cached:   cache on; `warmup_s` is the bank fill (the condition stream once, timed on its own), the
            steps that follow reuse the bank.
A step is one forward of the transformer at a timestep of the 25-step schedule. Timing: all modes in one
process on the same weights, interleaved round by round (the machine is shared: its load hits every mode
alike); round 0 is not timed. Each step records wall time and the process's CPU time (all threads); the
ratios use the median CPU time (wall time on a loaded 2-core machine varied ±30 % between rounds of the
same mode), the fastest wall-clock round gives a second set of ratios as a check. Core's attention is set to PyTorch
SDPA
(`--use-pytorch-cross-attention`, the default on NVIDIA; on CPU core would pick sub-quadratic attention),
the function our block patches use, so the ratios compare like with like. Memory: each mode once more in
its own fresh subprocess (bank fill + two steps); peak RSS of that process, weights included
(`weights_rss_gb` is RSS right after building the model). Speed is quoted only as ratios against the
plain step measured in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.comfy_host import comfy_dir  # noqa: E402

WIDTH, HEADS, AXES = 3072, 24, (16, 56, 56)
FULL_DOUBLE, FULL_SINGLE = 19, 38
TEXT_TOKENS = 512
LORA_RANK = 128


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def import_comfy():
    """ComfyUI v0.33 in this process, at the END of sys.path (it must not shadow this repo's packages)."""
    sys.path.append(str(comfy_dir("0.33")))
    from comfy.cli_args import args
    args.cpu = True
    args.use_pytorch_cross_attention = True     # core's attention = SDPA, as ours (CPU default: sub-quadratic)
    import comfy.ldm.flux.math
    import comfy.ldm.flux.model
    import comfy.ops
    assert comfy.ldm.flux.math.optimized_attention.__name__ == "attention_pytorch"
    return comfy


def import_node_module():
    """nodes/easycontrol/model.py as the pack imports it (relative imports into kernels/), without
    running the packages' __init__ modules (they import every node through comfy_api)."""
    for name, folder in (("ditcontrol_bench", REPO), ("ditcontrol_bench.nodes", REPO / "nodes"),
                         ("ditcontrol_bench.nodes.easycontrol", REPO / "nodes" / "easycontrol")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    return importlib.import_module("ditcontrol_bench.nodes.easycontrol.model")


def build_flux(comfy, double: int, single: int, dtype):
    flux = comfy.ldm.flux.model.Flux(
        operations=comfy.ops.disable_weight_init, dtype=dtype, device="cpu",
        in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=WIDTH, mlp_ratio=4.0,
        num_heads=HEADS, depth=double, depth_single_blocks=single, axes_dim=list(AXES), theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in flux.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name or name.endswith("scale") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.5 / p.shape[1] ** 0.5))
    return flux.eval().requires_grad_(False)


def build_lora(comfy, double: int, single: int):
    from dit_control.kernels.flux_easycontrol.lora import EasyControlLoRAConfig, expected_shapes, load_lora
    cfg = EasyControlLoRAConfig(hidden_size=WIDTH, rank=LORA_RANK, double_blocks=double, single_blocks=single)
    gen = torch.Generator().manual_seed(1)
    sd = {k: (torch.randn(s, generator=gen) / s[1] ** 0.5).to(torch.bfloat16) for k, s in expected_shapes(cfg).items()}
    return load_lora(sd, operations=comfy.ops.manual_cast).eval().requires_grad_(False)


def reference_sigmas(steps: int, tokens: int) -> list:
    import math
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    return [math.exp(mu) / (math.exp(mu) + (1.0 / (1.0 - i * (1.0 - 1.0 / steps) / (steps - 1)) - 1.0))
            for i in range(steps)]


class Setup:
    """Core's Flux with random weights, the inputs, and per mode the transformer_options the nodes give."""

    def __init__(self, a, modes):
        torch.set_num_threads(a.threads)
        comfy = import_comfy()
        ecm = import_node_module()
        importlib.import_module("comfy.patcher_extension")   # the wrappers' registry, used below as comfy.*
        self.dtype = dtype = torch.bfloat16
        self.flux = build_flux(comfy, a.double, a.single, dtype)
        self.weights_rss = rss_gb()
        self.lat = lat = a.size // 8
        gen = torch.Generator().manual_seed(2)
        self.x = torch.randn(1, 16, lat, lat, generator=gen).to(dtype)
        self.context = torch.randn(1, TEXT_TOKENS, 4096, generator=gen).to(dtype)
        self.y = torch.randn(1, 768, generator=gen).to(dtype)
        self.guidance = torch.full((1,), 3.5)
        self.sigmas = reference_sigmas(25, (a.size // 16) ** 2)
        self.options, self.specs = {}, {}
        lora = build_lora(comfy, a.double, a.single) if set(modes) - {"plain"} else None
        cond_latent = torch.randn(1, 16, a.cond // 8, a.cond // 8, generator=gen)
        for mode in modes:
            options = {"cond_or_uncond": [0]}
            if mode != "plain":
                source = ecm.ConditionSource(torch.zeros(1, a.cond, a.cond, 3), cond_latent, lora, 1.0, "spatial",
                                             "bench")
                spec = self.specs[mode] = ecm.EasyControlSpec([source], cache=mode == "cached")
                spec.easycontrol.check_fits(self.flux)
                replace = {("double_block", i): ecm.BlockPatch("double", i) for i in range(a.double)}
                replace.update({("single_block", i): ecm.BlockPatch("single", i) for i in range(a.single)})
                options.update({"patches_replace": {"dit": replace}, ecm.SPEC_KEY: spec,
                                "wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL:
                                             {ecm.WRAPPER_KEY: [ecm.diffusion_model_wrapper]}}})
            self.options[mode] = options

    def step(self, mode: str, i: int) -> tuple:
        """-> (wall seconds, CPU seconds of this process, all threads)."""
        t = torch.full((1,), self.sigmas[i % len(self.sigmas)])
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.flux(self.x, t, self.context, self.y, self.guidance, transformer_options=dict(self.options[mode]))
        elapsed = time.perf_counter() - t0, time.process_time() - c0
        assert torch.isfinite(out).all()
        return elapsed

    def fill_bank(self) -> dict:
        """The warm-up: the condition stream once (begin() on a miss), timed on its own."""
        ec = self.specs["cached"].easycontrol
        t0, c0 = time.perf_counter(), time.process_time()
        ec.begin(self.flux, self.y, self.guidance, (self.lat, self.lat), 1, self.dtype, extra_key=("cfg", (0,)))
        return {"warmup_s": round(time.perf_counter() - t0, 3), "warmup_cpu_s": round(time.process_time() - c0, 3),
                "bank_mb": round(ec.bank.nbytes / 2 ** 20, 1)}


def memory_of_mode(a) -> dict:
    """One mode in this (fresh) process: weights RSS, then the bank fill (cached) and two steps; peak RSS."""
    setup = Setup(a, [a.mode])
    out = {"mode": a.mode, "weights_rss_gb": round(setup.weights_rss, 2)}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for spec in setup.specs.values():
            stack.enter_context(spec.easycontrol.sampling_run())
        if a.mode == "cached":
            out.update(setup.fill_bank())
        for i in range(2):
            setup.step(a.mode, i)
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    out["peak_over_weights_gb"] = round(out["peak_rss_gb"] - out["weights_rss_gb"], 2)
    return out


def timings(a) -> dict:
    """All modes in one process on the same weights, interleaved round by round (plain, cached, uncached)
    so that the load of a shared machine hits every mode alike; round 0 is not timed."""
    modes = ("plain", "cached", "uncached")
    setup = Setup(a, modes)
    times = {m: [] for m in modes}
    out = {}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for spec in setup.specs.values():
            stack.enter_context(spec.easycontrol.sampling_run())
        out.update(setup.fill_bank())
        for r in range(a.steps + 1):
            for m in modes:
                times[m].append(setup.step(m, r))
            print(f"round {r}: " + ", ".join(f"{m} {times[m][-1][0]:.2f} s wall, {times[m][-1][1]:.2f} s CPU"
                                             for m in modes), flush=True)
        bank = setup.specs["cached"].easycontrol.bank
        assert (bank.builds, bank.hits) == (1, a.steps + 1), (bank.builds, bank.hits)
    assert all(len(spec.easycontrol.bank) == 0 for spec in setup.specs.values())
    for m in modes:
        wall, cpu = [t[0] for t in times[m][1:]], [t[1] for t in times[m][1:]]
        out[m] = {"first_step_wall_s": round(times[m][0][0], 3), "step_wall_min_s": round(min(wall), 3),
                  "step_cpu_median_s": round(statistics.median(cpu), 3),
                  "wall_s": [round(t, 3) for t in wall], "cpu_s": [round(t, 3) for t in cpu]}
    return out


def block_params() -> dict:
    """Parameter counts of core's blocks (meta device) for the extrapolation."""
    comfy = import_comfy()
    with torch.device("meta"):
        one = build_meta(comfy, 1, 1)
    d = sum(p.numel() for p in one.double_blocks[0].parameters())
    s = sum(p.numel() for p in one.single_blocks[0].parameters())
    rest = sum(p.numel() for p in one.parameters()) - d - s
    return {"double": d, "single": s, "rest": rest}


def build_meta(comfy, double, single):
    return comfy.ldm.flux.model.Flux(
        operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16, device="meta",
        in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=WIDTH, mlp_ratio=4.0,
        num_heads=HEADS, depth=double, depth_single_blocks=single, axes_dim=list(AXES), theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True, txt_ids_dims=[])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--cond", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed rounds (after one untimed round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=("plain", "uncached", "cached"))
    parser.add_argument("--name", default="easycontrol_step")
    parser.add_argument("--memory-from", type=Path, default=None,
                        help="take the per-mode memory section from an earlier results file of the same "
                             "configuration instead of measuring it again (recorded in the results)")
    a = parser.parse_args()
    if a.mode:
        print(json.dumps(memory_of_mode(a)))
        return
    memory = {}
    if a.memory_from is not None:
        earlier = json.loads(a.memory_from.read_text())
        assert (earlier["blocks"], earlier["size"], earlier["cond"]) == (f"{a.double} double + {a.single} single",
                                                                         a.size, a.cond), "another configuration"
        memory = {**earlier["memory"], "measured_in": str(a.memory_from.name)}
    for mode in () if memory else ("plain", "cached", "uncached"):
        cmd = [sys.executable, __file__, "--mode", mode]
        for k in ("double", "single", "size", "cond", "threads"):
            cmd += [f"--{k}", str(getattr(a, k))]
        out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
        memory[mode] = json.loads(out.strip().splitlines()[-1])
        print("memory", memory[mode], flush=True)
    timed = timings(a)
    # ratios from CPU time (what the step costs the process; far less sensitive to other load on a shared
    # machine than wall time) and, as a check, from the fastest wall-clock round
    plain, cached, uncached = (timed[m]["step_cpu_median_s"] for m in ("plain", "cached", "uncached"))
    wall = {m: timed[m]["step_wall_min_s"] for m in ("plain", "cached", "uncached")}
    n = a.double + a.single
    params = block_params()
    full_params = FULL_DOUBLE * params["double"] + FULL_SINGLE * params["single"] + params["rest"]
    bank_per_block_mb = timed["bank_mb"] / n
    # time: the blocks dominate and a double and a single block cost about the same at this size (both
    # 12·D² multiply-adds per token plus one attention), so steps scale with the block count
    scale = (FULL_DOUBLE + FULL_SINGLE) / n
    full_bank_gb = bank_per_block_mb * (FULL_DOUBLE + FULL_SINGLE) / 1024
    summary = {
        "blocks": f"{a.double} double + {a.single} single", "size": a.size, "cond": a.cond,
        "noise_tokens": (a.size // 16) ** 2, "cond_tokens": (a.cond // 16) ** 2, "text_tokens": TEXT_TOKENS,
        "threads": a.threads, "torch": torch.__version__, "attention": "pytorch SDPA (core and ours)",
        "cached_over_plain": round(cached / plain, 3), "uncached_over_plain": round(uncached / plain, 3),
        "wall_min_cached_over_plain": round(wall["cached"] / wall["plain"], 3),
        "wall_min_uncached_over_plain": round(wall["uncached"] / wall["plain"], 3),
        "warmup_cpu_over_plain_step": round(timed["warmup_cpu_s"] / plain, 3),
        "block_params": params,
        "full_model": {
            "params": full_params, "weights_gb_bf16": round(2 * full_params / 1e9, 2),
            "weights_gb_fp8": round(full_params / 1e9, 2), "bank_gb_bf16": round(full_bank_gb, 3),
            "step_cpu_s_plain": round(plain * scale, 1), "step_cpu_s_cached": round(cached * scale, 1),
            "step_cpu_s_uncached": round(uncached * scale, 1),
            "warmup_cpu_s": round(timed["warmup_cpu_s"] * scale, 1),
        },
        "timing": timed, "memory": memory,
    }
    path = save_results(a.name, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("timing", "memory")}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
