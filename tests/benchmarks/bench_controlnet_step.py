"""Benchmark: the per-step cost of the PixArt-δ ControlNet-Transformer (13 copied blocks on a 28-block
XL/2) against the base model alone, full-size random weights, 512 px, one run.

    .venv/bin/python -m tests.benchmarks.bench_controlnet_step [--batch 2] [--repeats 2]

A step is one forward of the DiT (batch 2 = a CFG step). Expectation from block counts: 13/28 = +46%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kernels.pixart.model import PixArt, pixart_xl2_1024_ms  # noqa: E402
from kernels.pixart.controlnet import PixArtControlNet, block_config  # noqa: E402
from tests.make_checkpoints import random_pixart_state_dict  # noqa: E402


def median_time(fn, repeats):
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = pixart_xl2_1024_ms(null_caption=False)
    base = PixArt(cfg)
    base.load_state_dict(random_pixart_state_dict(cfg, seed=0))
    net = PixArtControlNet(13, block_config(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    base.eval(), net.eval()

    b, lat = args.batch, args.size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, lat, lat, generator=gen)
    c = torch.randn(1, 4, lat, lat, generator=gen)
    t = torch.full((b,), 500.0)
    y = torch.randn(b, 120, 4096, generator=gen)

    plain = median_time(lambda: base(x, t, y), args.repeats)
    controlled = median_time(lambda: base(x, t, y, control=net.branch(c, strength=1.0)), args.repeats)
    overhead = controlled / plain - 1
    print(f"base step {plain:.2f} s, with ControlNet {controlled:.2f} s: +{100 * overhead:.1f}% "
          f"(13/28 blocks = +46.4%)")
    out = REPO / "bench_results"
    out.mkdir(exist_ok=True)
    (out / "controlnet_step.json").write_text(json.dumps(
        {"size": args.size, "batch": b, "base_s": round(plain, 3), "controlnet_s": round(controlled, 3),
         "overhead_pct": round(100 * overhead, 1)}, indent=1))


if __name__ == "__main__":
    main()
