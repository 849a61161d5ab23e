"""Benchmark: DiT4SR's step cost and memory, full size (2.9 B parameters, random weights in the released layout,
F16 storage as released), one run.

    .venv/bin/python tests/benchmarks/bench_dit4sr_step.py [--repeats 1] [--parts step,upscale,memory]

- step: one model call on one 512 px tile (latent 64², batch 1, 154 text tokens like core's SD3 encoders for a
  short prompt) — our DiT4SR vs ComfyUI's native SD3.5-medium MMDiT (comfy.ldm...mmdit, random weights, same
  F16 storage and manual-cast ops) on the same tile and text. The LR stream doubles the image tokens: goal
  ≤ 2.2× the native step.
- upscale: one full model call of a ×4 upscale to 1024² (latent 128²: 9 tiles of 64, overlap 24): time per tile.
- memory: peak RSS of one model call at 1024² and at 2048² outputs (the latter stopped after its first tile
  batch: memory does not depend on the number of batches), with the model's default 1 GB tile budget.

Every part runs in its own child process (so peak RSS is its own: VmHWM, reset after building the model);
the results go to bench_results/dit4sr_step.json with the host. Timings are only compared within one run.
`--layers N` builds N blocks instead of 24 (a smoke run of the script; the results are labelled).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
from dit_control.tests.benchmarks.timing import median_seconds, peak_rss_bytes  # noqa: E402
from dit_control.tests.comfy_host import COMFY_DIR as COMFY  # noqa: E402

TEXT_TOKENS = 154


class StopAfter(Exception):
    pass


def comfy_ops():
    sys.path.insert(0, str(COMFY))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.ops
    compute = mm.unet_manual_cast(torch.float16, mm.get_torch_device()) or torch.float16
    return comfy.ops.manual_cast, compute


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")


def build_ours(layers: int):
    from dit_control.kernels.dit4sr.checkpoint import load_dit4sr
    from dit_control.kernels.dit4sr.model import DiT4SRConfig
    from dit_control.tests.generators.make_dit4sr_checkpoints import dit4sr_state_dict
    ops, compute = comfy_ops()
    cfg = DiT4SRConfig(num_layers=layers, dual_attention_layers=tuple(range(min(13, layers - 1))))
    sd = dit4sr_state_dict(cfg, seed=0)
    params = sum(v.numel() for v in sd.values())
    model, _ = load_dit4sr(sd, operations=ops, dtype=torch.float16)    # F16 storage, as the release's base
    del sd
    return model.eval(), compute, params


def build_native(layers: int):
    ops, compute = comfy_ops()
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    model = OpenAISignatureMMDITWrapper(
        in_channels=16, patch_size=2, out_channels=16, depth=24, num_blocks=layers, input_size=None,
        adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
        num_patches=384 * 384, pos_embed_max_size=384, qk_norm="rms", pos_embed_scaling_factor=None,
        x_block_self_attn_layers=list(range(min(13, layers - 1))), dtype=torch.float16, device="cpu",
        operations=ops)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            if p.is_floating_point():
                fan_in = p[0].numel() if p.ndim >= 2 else p.numel()
                p.copy_((torch.randn(p.shape, generator=gen) * (0.02 if p.ndim < 2 else fan_in ** -0.5)).to(p.dtype))
    return model.eval(), compute, sum(p.numel() for p in model.parameters())


def inputs(batch: int, lat: int, gen_seed: int = 0):
    gen = torch.Generator().manual_seed(gen_seed)
    return (torch.randn(batch, 16, lat, lat, generator=gen), torch.full((batch,), 500.0),
            torch.randn(batch, TEXT_TOKENS, 4096, generator=gen), torch.randn(batch, 2048, generator=gen))


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.child == "native":
        model, compute, params = build_native(args.layers)
        x, t, ctx, pooled = inputs(1, 64)
        reset_peak()
        s = median_seconds(lambda: model(x.to(compute), t, context=ctx.to(compute), y=pooled.to(compute)), args.repeats)
        return {"step_s": s, "peak_rss": peak_rss_bytes(), "params": params}
    model, compute, params = build_ours(args.layers)
    if args.child == "ours-step":
        x, t, ctx, pooled = inputs(1, 64)
        lr = torch.randn_like(x)
        reset_peak()
        s = median_seconds(lambda: model(x, t, ctx, pooled, lr, tiles=None, dtype=compute), args.repeats)
        return {"step_s": s, "peak_rss": peak_rss_bytes(), "params": params}
    # ours-upscale: one model call of a ×4 upscale to `out` px (CFG batch 2, as a KSampler step)
    from dit_control.kernels.dit4sr.tiling import TileSettings, tile_layout
    lat = args.out // 8
    x, t, ctx, pooled = inputs(2, lat)
    lr = torch.randn_like(x)
    tiles = TileSettings()
    layout = tile_layout(lat, lat, tiles)
    calls = {"n": 0, "tiles": 0}
    single = model.forward_single

    def counted(xt, *a, **kw):
        if args.max_batches and calls["n"] >= args.max_batches:
            raise StopAfter
        calls["n"] += 1
        calls["tiles"] += xt.shape[0] // 2
        return single(xt, *a, **kw)
    model.forward_single = counted
    reset_peak()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model(x, t, ctx, pooled, lr, tiles=tiles, dtype=compute)
        complete = True
    except StopAfter:
        complete = False
    elapsed = time.perf_counter() - t0
    return {"out_px": args.out, "tiles_total": layout.count if layout else 1, "tiles_run": calls["tiles"],
            "model_calls": calls["n"], "complete": complete, "seconds": elapsed,
            "s_per_tile": elapsed / max(calls["tiles"], 1), "peak_rss": peak_rss_bytes(), "params": params}


def run_child(name, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--layers", str(args.layers),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{name} {extra or ''}: {result}", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="step,upscale,memory")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None)
    parser.add_argument("--out", type=int, default=1024)
    parser.add_argument("--max-batches", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from dit_control.tests.benchmarks.results import save_results
    parts = args.parts.split(",")
    results = {"layers": args.layers, "smoke": args.layers != 24, "text_tokens": TEXT_TOKENS,
               "storage": "F16 (control tensors cast from F32), comfy manual_cast ops", "threads": args.threads}
    if "step" in parts:
        native, ours = run_child("native", args), run_child("ours-step", args)
        results.update(native_step_s=native["step_s"], dit4sr_step_s=ours["step_s"],
                       step_ratio=ours["step_s"] / native["step_s"], native_params=native["params"],
                       dit4sr_params=ours["params"], native_peak_rss=native["peak_rss"],
                       dit4sr_step_peak_rss=ours["peak_rss"])
        print(f"one 512 px tile: DiT4SR {ours['step_s']:.2f} s vs native SD3.5-medium {native['step_s']:.2f} s: "
              f"{results['step_ratio']:.2f}x (goal <= 2.2x)")
    if "upscale" in parts:
        r = run_child("ours-upscale", args, out=1024)
        results["upscale_1024"] = r
        print(f"x4 to 1024²: {r['tiles_run']} tiles, {r['s_per_tile']:.2f} s per tile (CFG batch 2), "
              f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
    if "memory" in parts:
        small = results.get("upscale_1024") or run_child("ours-upscale", args, out=1024, max_batches=1)
        big = run_child("ours-upscale", args, out=2048, max_batches=1)
        results["memory"] = {"1024": small["peak_rss"], "2048_first_batch": big["peak_rss"],
                             "ratio": big["peak_rss"] / small["peak_rss"]}
        print(f"peak RSS 1024²: {small['peak_rss'] / 2**30:.2f} GiB, 2048²: {big['peak_rss'] / 2**30:.2f} GiB "
              f"({results['memory']['ratio']:.3f}x; goal <= 1.1x and < 10 GB)")
    print("wrote", save_results("dit4sr_step" + ("_smoke" if results["smoke"] else ""), results))


if __name__ == "__main__":
    main()
