"""Benchmark: the full-size XL/2 DiT forward at 512 px in int8 against fp32 and bf16, one run.

Same random weights (real layout) and inputs for every row. For each storage it reports the forward
time (median), the weight bytes, and the relative L2 error of ε (channels 0-3) against fp32.

Rows:
- fp32: plain fp32 weights and maths.
- bf16 (ComfyUI's way): bf16 weights run through ComfyUI's manual-cast ops in the compute dtype
  ComfyUI picks for this device (fp32 on a CPU) — what a ComfyUI user gets from weight_dtype bf16.
- bf16 arithmetic: bf16 weights and maths (fast only where the CPU has native bf16).
- int8 <route>: our Int8Linear on every linear layer, for each route that runs here.

    .venv/bin/python tests/benchmarks/bench_int.py8_dit [--repeats 3] [--size 512] [--batch 1]

Writes bench_results/int8_dit.json.
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from dit_control.kernels import int8  # noqa: E402
from dit_control.kernels.pixart.checkpoint import load_pixart  # noqa: E402
from dit_control.kernels.pixart.model import pixart_xl2_1024_ms  # noqa: E402
from dit_control.tests.benchmarks.bench_pixart_forward import comfy_policy, timed  # noqa: E402
from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.generators.make_checkpoints import random_pixart_state_dict  # noqa: E402


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--routes", default=",".join(int8.available_routes("cpu")),
                        help="int8 routes to time (int8_mm is a scalar loop without VNNI: very slow)")
    parser.add_argument("--skip", default="", help="comma list of rows to leave out, e.g. 'bf16 arithmetic'")
    args = parser.parse_args()
    torch.set_num_threads(2)

    print("making full-size random XL/2 weights ...", flush=True)
    sd = random_pixart_state_dict(pixart_xl2_1024_ms(), seed=0)
    b, lat = args.batch, args.size // 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, lat, lat, generator=gen)
    t = torch.tensor([999.0, 499.0, 259.0, 99.0][:b])
    y = torch.randn(b, 120, 4096, generator=gen)
    hw = torch.tensor([[args.size * 1.0] * 2]).repeat(b, 1)
    ar = torch.ones(b, 1)

    mc_ops, _, _ = comfy_policy("bf16")
    rows = [("fp32", lambda: load_pixart(dict(sd)), torch.float32),
            ("bf16 (ComfyUI manual cast)", lambda: load_pixart(dict(sd), operations=mc_ops, dtype=torch.bfloat16),
             torch.float32),
            ("bf16 arithmetic", lambda: load_pixart(dict(sd), dtype=torch.bfloat16), torch.bfloat16)]
    for route in args.routes.split(","):
        rows.append((f"int8 {route}", lambda r=route: load_pixart(dict(sd), operations=int8.int8_ops(r)),
                     torch.float32))
    skip = set(filter(None, args.skip.split(",")))

    results = {"size": args.size, "batch": b, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "auto_route": int8.int8_backend("cpu"), "qlinear_engine": int8.qlinear_engine(),
               "qlinear_reduce_range": int8.QLINEAR_REDUCE_RANGE, "rows": []}
    print(results["auto_route"], flush=True)
    ref = None
    for name, build, act in rows:
        if name in skip:
            continue
        gc.collect()
        model = build().eval()
        out = {}
        median, times = timed(lambda: out.__setitem__("eps", model(x.to(act), t, y.to(act), None, img_hw=hw,
                                                                   aspect_ratio=ar)[:, :4].float()),
                              args.repeats)
        nbytes = int8.weight_bytes(model)   # after the first forward: packed weights counted
        if ref is None:
            ref, fp32_bytes = out["eps"], nbytes
        row = {"storage": name, "median_s": round(median, 3), "times": [round(v, 3) for v in times],
               "weight_bytes": nbytes, "bytes_vs_fp32": round(nbytes / fp32_bytes, 3),
               "eps_rel_l2_vs_fp32": round(rel_err(out["eps"], ref), 5)}
        results["rows"].append(row)
        print(f"{name:28s} {median:7.2f} s  {nbytes / 2**30:5.2f} GiB ({row['bytes_vs_fp32']:.2f} of fp32)  "
              f"eps err {row['eps_rel_l2_vs_fp32']:.2%}   {row['times']}", flush=True)
        model = None
    by = {r["storage"]: r["median_s"] for r in results["rows"]}
    for route in args.routes.split(","):
        for peer in ("bf16 (ComfyUI manual cast)", "bf16 arithmetic"):
            if f"int8 {route}" in by and peer in by:
                ratio = by[peer] / by[f"int8 {route}"]
                results[f"speedup int8 {route} vs {peer}"] = round(ratio, 3)
                print(f"int8 {route} is {ratio:.2f}x the speed of {peer}")
    save_results("int8_dit", results)


if __name__ == "__main__":
    main()
