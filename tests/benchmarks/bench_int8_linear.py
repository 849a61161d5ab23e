"""Micro-benchmark of kernels/int8.py against float F.linear on the PixArt-XL linear shapes (a script).

    .venv/bin/python tests/benchmarks/bench_int8_linear.py [--m 1024 2048] [--max-repeats 5] [--only dequant]

Times fp32 and bf16 F.linear, every int8 route with fp32 and bf16 activations, and bitsandbytes'
own Linear8bitLt in eval() when it imports. Each time is the median of back-to-back calls after one
warm-up (isolated small calls read falsely slow on this machine kind); slow methods get fewer
repeats so the run stays within a few minutes. Ratios are speed-ups (>1 = faster) measured in this
run, the only kind worth quoting on a shared, noisy machine.
"""
import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_control.kernels import int8

# (K, N) of PixArt-XL/2's token-wise linears: attn proj / q / cross-attn proj, fused qkv, MLP fc1, MLP fc2.
SHAPES = [(1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152)]


def bench(fn, max_repeats: int, budget_s: float) -> float:
    """Median seconds of back-to-back calls after a warm-up; stops early once `budget_s` is spent."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bnb_module(linear: nn.Linear):
    """bitsandbytes' Linear8bitLt holding `linear`, in eval() (train mode silently dequantises)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:
        print(f"# bitsandbytes Linear8bitLt skipped: {type(e).__name__}: {e}")
        return None
    m = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True,
                            has_fp16_weights=False, threshold=0.0)
    m.load_state_dict(linear.state_dict())
    return m.to("cpu").eval()   # .to(device) is what quantises the weight


def methods(linear: nn.Linear):
    """name -> (callable taking an activation, activation dtype)."""
    w32, b32 = linear.weight.detach(), linear.bias.detach()
    w16, b16 = w32.bfloat16(), b32.bfloat16()
    out = {
        "fp32 F.linear": (lambda x: F.linear(x, w32, b32), torch.float32),
        "bf16 F.linear": (lambda x: F.linear(x, w16, b16), torch.bfloat16),
    }
    for route in int8.available_routes("cpu"):
        layer = int8.Int8Linear.from_linear(linear, route=route)
        for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            out[f"int8 {route}, {tag} act"] = (layer, dt)
    bnb = bnb_module(linear)
    if bnb is not None:
        for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            out[f"bnb Linear8bitLt eval, {tag} act"] = (bnb, dt)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[1024, 2048], help="token counts (rows)")
    p.add_argument("--max-repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=4.0, help="seconds per method before stopping at 3 repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="time only methods whose name contains one of these (the two F.linear rows always run)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = int8.cpu_flags()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, ATen CPU level {int8.cpu_capability()}, "
          f"avx512_vnni={'avx512_vnni' in flags} avx512_bf16={'avx512_bf16' in flags} "
          f"amx={'amx_int8' in flags}")
    print(f"# int8_backend(): {int8.int8_backend('cpu')}")
    if os.environ.get(int8.ROUTE_ENV):
        print(f"# note: {int8.ROUTE_ENV}={os.environ[int8.ROUTE_ENV]} is set; each route is pinned here anyway")
    print()
    print("| M×K→N | method | ms | GOP/s | × bf16 | × fp32 | rel. err vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for m in args.m:
            for k, n in SHAPES:
                linear = nn.Linear(k, n)
                x = torch.randn(m, k)
                ref = F.linear(x, linear.weight, linear.bias)
                ops = 2 * m * k * n
                rows = []
                for name, (fn, dt) in methods(linear).items():
                    if args.only and "F.linear" not in name and not any(o in name for o in args.only):
                        continue
                    xd = x.to(dt)
                    err = ((fn(xd).float() - ref).norm() / ref.norm()).item()
                    t = bench(lambda: fn(xd), args.max_repeats, args.budget)
                    rows.append((name, t, err))
                t_bf16 = dict((r[0], r[1]) for r in rows)["bf16 F.linear"]
                t_fp32 = dict((r[0], r[1]) for r in rows)["fp32 F.linear"]
                for name, t, err in rows:
                    print(f"| {m}×{k}→{n} | {name} | {t * 1e3:.1f} | {ops / t / 1e9:.0f} | "
                          f"{t_bf16 / t:.2f} | {t_fp32 / t:.2f} | {err * 100:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
