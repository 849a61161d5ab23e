"""Benchmark: the per-step cost of PixArt's two controls against the base model alone — the PixArt-δ
ControlNet-Transformer (13 copied blocks on the 28-block XL/2) and RelaCtrl (11 RGLC blocks with the
release's expert counts) — full-size random weights, one run, 512 and 1024 px.

    .venv/bin/python tests/benchmarks/bench_pixart_control_step.py [--sizes 512 1024] [--batch 2] [--repeats 3]

A step is one forward of the DiT (batch 2 = a CFG step), fp32, after one warm-up forward each, the three taking turns.
The issue's
goal: RelaCtrl's overhead ≤ 1/3 of the ControlNet-Transformer's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from dit_control.kernels.pixart.controlnet import PixArtControlNet, block_config  # noqa: E402
from dit_control.kernels.pixart.model import PixArt, pixart_xl2_1024_ms  # noqa: E402
from dit_control.kernels.pixart.relactrl import RelaCtrl, RelaCtrlConfig  # noqa: E402
from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.benchmarks.timing import round_robin_medians  # noqa: E402
from dit_control.tests.generators.make_checkpoints import random_pixart_state_dict  # noqa: E402
from dit_control.tests.generators.make_relactrl_checkpoints import RELACTRL_EXPERTS  # noqa: E402


def randomised(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module.eval()


def millions(module):
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = pixart_xl2_1024_ms(null_caption=False)
    base = PixArt(cfg)
    base.load_state_dict(random_pixart_state_dict(cfg, seed=0))
    base.eval()
    d = cfg.hidden_size
    controlnet = randomised(PixArtControlNet(13, block_config(d, cfg.num_heads, cfg.mlp_ratio)))
    relactrl = randomised(RelaCtrl(RelaCtrlConfig(hidden_size=d,
                                                  expert_widths=tuple((d // g,) * g for g in RELACTRL_EXPERTS))))
    results = {"batch": args.batch, "dtype": "fp32", "threads": torch.get_num_threads(),
               "params_m": {"base": millions(base), "controlnet": millions(controlnet),
                            "relactrl": millions(relactrl)},
               "sizes": {}}
    for size in args.sizes:
        b, lat = args.batch, size // 8
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, 4, lat, lat, generator=gen)
        c = torch.randn(1, 4, lat, lat, generator=gen)
        t = torch.full((b,), 500.0)
        y = torch.randn(b, 120, 4096, generator=gen)
        med = round_robin_medians({
            "base": lambda: base(x, t, y),
            "controlnet": lambda: base(x, t, y, control=controlnet.branch(c, strength=1.0)),
            "relactrl": lambda: base(x, t, y, control=relactrl.branch(c, strength=1.0, seed=0, step=0)),
        }, args.repeats)
        plain, with_cn, with_rc = med["base"], med["controlnet"], med["relactrl"]
        cn_over, rc_over = with_cn / plain - 1, with_rc / plain - 1
        row = {"base_s": round(plain, 3), "controlnet_s": round(with_cn, 3), "relactrl_s": round(with_rc, 3),
               "controlnet_overhead_pct": round(100 * cn_over, 1), "relactrl_overhead_pct": round(100 * rc_over, 1),
               "relactrl_over_controlnet_overhead": round(rc_over / cn_over, 3)}
        results["sizes"][str(size)] = row
        print(f"{size} px: base {plain:.2f} s, +ControlNet {with_cn:.2f} s (+{100 * cn_over:.1f}%), "
              f"+RelaCtrl {with_rc:.2f} s (+{100 * rc_over:.1f}%): RelaCtrl's overhead = "
              f"{rc_over / cn_over:.2f}x the ControlNet's (goal <= 0.33)", flush=True)
    print("parameters (M):", results["params_m"])
    print("wrote", save_results("pixart_control_step", results))


if __name__ == "__main__":
    main()
