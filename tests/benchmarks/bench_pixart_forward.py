"""Benchmark: one PixArt-α XL/2 forward, our kernel vs diffusers' PixArtTransformer2DModel vs ComfyUI's
native PixArtMS, same full-size random weights, 512 px (64x64 latent, 1024 tokens), batch 2, fp32 and
bf16, all in one run. A script, not a test.

bf16 means bf16 weights, run the way each stack runs them: ours and ComfyUI's through ComfyUI's
manual-cast ops with the compute dtype ComfyUI picks for the device (fp32 on a CPU:
model_management.should_use_bf16 is False there), diffusers in bf16 arithmetic (`.to(bfloat16)`).
`--dtypes bf16-compute` times all three in bf16 arithmetic. With bf16 weights, ours is also timed as the DiT
loader's `compute_dtype bf16` builds it (bf16 storage, no per-layer cast, bf16 inputs) where the CPU has native bf16
(kernels/native_dtypes.py): the row "ours, compute_dtype bf16", against diffusers' bf16 in the same run.


    .venv/bin/python tests/benchmarks/bench_pixart_forward.py [--repeats 3] [--dtypes fp32,bf16]

Prints a table and writes bench_results/pixart_forward.json. Captions are 120 valid tokens (ComfyUI's
native model takes no mask); ours is also timed with a padded caption mask.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
from dit_control.kernels.native_dtypes import explicit_compute_dtype, native_bf16  # noqa: E402
from dit_control.kernels.pixart.checkpoint import load_pixart, original_to_diffusers  # noqa: E402
from dit_control.kernels.pixart.model import pixart_xl2_1024_ms  # noqa: E402
from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.comfy_host import COMFY_DIR as COMFY  # noqa: E402  (DIT_CONTROL_COMFY_HOST chooses the host)
from dit_control.tests.generators.make_checkpoints import random_pixart_state_dict  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-compute": torch.bfloat16}


def comfy_modules():
    sys.path.insert(0, str(COMFY))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.ops
    return comfy.ops, mm


def comfy_policy(dname):
    """(operations, weight dtype, compute dtype) as ComfyUI would run weights of this dtype here."""
    ops, mm = comfy_modules()
    weight = DTYPES[dname]
    if dname == "bf16":
        compute = mm.unet_manual_cast(weight, mm.get_torch_device()) or weight
        return (ops.manual_cast if compute != weight else ops.disable_weight_init), weight, compute
    return ops.disable_weight_init, weight, weight


def timed(fn, repeats):
    """(median wall s, wall times, median CPU s): the process's CPU time too, which on a shared machine with
    --threads 1 counts the forward's own work only (wall time also counts the time other jobs held the core)."""
    with torch.no_grad():
        fn()  # warm-up (allocator, oneDNN primitive caches)
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(times), times, statistics.median(cpu)


def build_ours(sd, dname):
    ops, weight, _ = comfy_policy(dname)
    return load_pixart(dict(sd), operations=ops, dtype=weight).eval()


def build_ours_compute_bf16(sd):
    """As the DiT loader builds it with compute_dtype bf16 (comfy_compat.storage_dtypes: bf16 storage, no cast)."""
    ops, _ = comfy_modules()
    dtype, _ = explicit_compute_dtype("bf16", "cpu")
    return load_pixart(dict(sd), operations=ops.disable_weight_init, dtype=dtype).eval()


def build_diffusers(sd, dtype, cfg):
    from diffusers import PixArtTransformer2DModel
    with torch.device("meta"):
        model = PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            norm_type="ada_norm_single", cross_attention_dim=1152, caption_channels=4096, sample_size=128,
            patch_size=2, use_additional_conditions=True, interpolation_scale=2, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_elementwise_affine=False,
            norm_eps=1e-6)
    dsd = {k: v.to(dtype) for k, v in original_to_diffusers(dict(sd)).items()}
    model.load_state_dict(dsd, strict=True, assign=True)
    # the non-persistent positional buffer is not in the state dict: rebuild it off the meta device
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    pe = model.pos_embed
    table = get_2d_sincos_pos_embed(1152, 64, base_size=pe.base_size, interpolation_scale=pe.interpolation_scale,
                                    output_type="pt")
    pe.pos_embed = table.float().unsqueeze(0)
    return model.eval()


def build_comfy(sd, dname):
    ops, dtype, _ = comfy_policy(dname)
    from comfy.ldm.pixart.pixartms import PixArtMS
    # pe_interpolation unset, as ComfyUI detects diffusers files: with the .pth value (2) fixed, its
    # table at 512 px differs from the original's (see specs/comfy_host.md)
    model = PixArtMS(input_size=128, pe_interpolation=None, micro_condition=True, dtype=dtype, device="cpu",
                     operations=ops)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items() if k != "pos_embed"},
                                                strict=False)
    assert not missing, missing
    return model.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--only", default="ours,diffusers,comfy")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = pixart_xl2_1024_ms()
    print("making full-size random XL/2 weights ...", flush=True)
    sd = random_pixart_state_dict(cfg, seed=0)
    sd["y_embedder.y_embedding"] = torch.randn(120, 4096) / 64

    b, lat = args.batch, args.size // 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, lat, lat, generator=gen)
    t = torch.tensor([999.0, 499.0][:b] + [259.0] * max(0, b - 2))
    y = torch.randn(b, 120, 4096, generator=gen)
    hw = torch.tensor([[args.size * 1.0, args.size * 1.0]]).repeat(b, 1)
    ar = torch.ones(b, 1)
    padded = torch.zeros(b, 120, dtype=torch.long)
    padded[:, :24] = 1

    results = {"size": args.size, "batch": b, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "rows": []}
    only = args.only.split(",")
    fp32_ours = None
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        compute = comfy_policy(dname)[2]
        xs, ys = x.to(compute), y.to(compute)
        candidates = []
        if "ours" in only:       # "ours-bf16" in --only: the compute_dtype bf16 row alone
            candidates += [("ours", lambda: build_ours(sd, dname), lambda m: m(xs, t, ys, None, img_hw=hw,
                                                                               aspect_ratio=ar)),
                           ("ours (padded caption mask)", None, lambda m: m(xs, t, ys, padded, img_hw=hw,
                                                                            aspect_ratio=ar))]
        if dname == "bf16" and native_bf16("cpu")[0] and ({"ours", "ours-bf16"} & set(only)):
            xb, yb, hwb, arb = (v.to(torch.bfloat16) for v in (x, y, hw, ar))
            candidates.append(("ours, compute_dtype bf16", lambda: build_ours_compute_bf16(sd),
                               lambda m: m(xb, t, yb, None, img_hw=hwb, aspect_ratio=arb)))
        if "diffusers" in only:
            candidates.append(("diffusers PixArtTransformer2DModel", lambda: build_diffusers(sd, dtype, cfg),
                               lambda m: m(x.to(dtype), encoder_hidden_states=y.to(dtype), timestep=t,
                                           added_cond_kwargs={"resolution": hw, "aspect_ratio": ar},
                                           return_dict=False)[0]))
        if "comfy" in only:
            candidates.append(("ComfyUI PixArtMS", lambda: build_comfy(sd, dname),
                               lambda m: m(xs, t, ys, c_size=hw.to(compute), c_ar=ar.to(compute))))
        model = None
        outputs = {}
        for name, build, run in candidates:
            if build is not None:
                model = None
                gc.collect()
                model = build()
            median, times, cpu = timed(lambda: outputs.__setitem__(name, run(model).float()), args.repeats)
            row_compute = dtype if "diffusers" in name or "compute_dtype" in name else compute
            row = {"dtype": dname, "compute": str(row_compute), "impl": name, "median_s": round(median, 3),
                   "times": [round(v, 3) for v in times], "cpu_median_s": round(cpu, 3)}
            results["rows"].append(row)
            print(f"{dname:5s} {name:40s} {median:8.3f} s   {[round(v, 2) for v in times]}   CPU {cpu:.3f} s",
                  flush=True)
        model = None
        gc.collect()
        # all implementations compute the same function (ε and variance channels)
        ref = outputs.get("diffusers PixArtTransformer2DModel")
        if dname == "fp32" and "ours" in outputs:
            fp32_ours = outputs["ours"]          # the ε error of narrower weights and maths is measured against it
        for name, out in outputs.items():
            if ref is not None and "padded" not in name:
                rel = ((out[:, :4] - ref[:, :4]).norm() / ref[:, :4].norm()).item()  # ComfyUI returns ε only
                print(f"      rel. L2 vs diffusers: {name}: {rel:.2e}")
            if fp32_ours is not None and dname != "fp32" and "padded" not in name:
                rel = ((out[:, :4] - fp32_ours[:, :4]).norm() / fp32_ours[:, :4].norm()).item()
                results[f"epsilon_vs_fp32[{dname}, {name}]"] = round(rel, 5)
                print(f"      rel. L2 vs ours in fp32: {name}: {rel:.2e}")
        by = {r["impl"]: r["median_s"] for r in results["rows"] if r["dtype"] == dname}
        peers = [by[k] for k in ("diffusers PixArtTransformer2DModel", "ComfyUI PixArtMS") if k in by]
        if "ours" in by and peers:
            ratio = by["ours"] / min(peers)
            results[f"ratio_{dname}"] = round(ratio, 3)
            print(f"{dname}: ours / faster peer = {ratio:.3f}")
        if "ours, compute_dtype bf16" in by and "diffusers PixArtTransformer2DModel" in by:
            ratio = by["ours, compute_dtype bf16"] / by["diffusers PixArtTransformer2DModel"]
            cpu = {r["impl"]: r["cpu_median_s"] for r in results["rows"] if r["dtype"] == dname}
            cpu_ratio = cpu["ours, compute_dtype bf16"] / cpu["diffusers PixArtTransformer2DModel"]
            results[f"ratio_{dname}_compute_bf16_vs_diffusers"] = round(ratio, 3)
            results[f"cpu_ratio_{dname}_compute_bf16_vs_diffusers"] = round(cpu_ratio, 3)
            print(f"{dname}: ours with compute_dtype bf16 / diffusers bf16 = {ratio:.3f} (wall), "
                  f"{cpu_ratio:.3f} (CPU time)")
    save_results("pixart_forward", results)


if __name__ == "__main__":
    main()
