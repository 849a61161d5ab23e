"""Benchmark: ControlAR's token decode on the full-size GPT-XL + DINOv2-S (random weights, the released layout),
512×512 (1024 tokens, T = 120 caption rows), CFG 4 (batch 2), one run: fp32, bf16 (bf16 weights and maths: the
ControlAR Loader's compute_dtype bf16; only where the CPU has native bf16), int8 (exact route) and int8_fast.

    .venv/bin/python tests/benchmarks/bench_controlar_decode.py [--steps 24] [--smoke] [--routes fp32,bf16]

- Decode step: one image token through the kernel's `decode` + the sampler's CFG/top-k/multinomial; the median of
  --steps back-to-back steps after a warm-up, at late positions (the cache filled to 1024 tokens) and at early ones.
- Per image: control encoder + prefill (timed) + 1023 steps: EXTRAPOLATED as 1023 × the mean of the early and late
  step (attention reads the cache up to the token's position, so a step's cost grows linearly with it).
- Streaming bound: a decode step reads every weight of the layers, the final norm and the output head once (the
  batch of 2 is far too small to reuse them from cache) and the K/V cache up to its position, so step ≥ those
  bytes ÷ memory bandwidth; the bandwidth is measured in this run by a 1 GiB tensor copy (read + write bytes ÷
  time). Reported against the late step with and without the K/V bytes (the weights-only bound).
- KV cache vs recomputing the prefix: the step at 1024 tokens with the cache against one causal forward over all
  T + 1023 positions without a cache (what a cache-less decoder does for that token) — on GPT-B (12 × 768,
  same code) because a GPT-XL forward over 1143 positions takes minutes here; the ratio is what matters.
Results: bench_results/controlar_decode.json. Heavy (≈ 4 GB RAM, several minutes): not while other jobs run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from dit_control.kernels.controlar.dinov2 import Dinov2Config  # noqa: E402
from dit_control.kernels.controlar.gpt import GPT, GPTConfig  # noqa: E402
from dit_control.kernels.controlar.sampling import SamplingSettings, combine_cfg, sample_token  # noqa: E402
from dit_control.kernels.int8 import (  # noqa: E402
    Int8Linear,
    fast_route,  # noqa: E402
    int8_backend,
    quantize_model_linears,
    weight_bytes,
)
from dit_control.kernels.native_dtypes import native_bf16  # noqa: E402
from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.benchmarks.timing import median_seconds  # noqa: E402

XL = dict(dim=1280, n_layer=36, n_head=20, ffn_hidden=3584, vocab_size=16384, cls_token_num=120, caption_dim=2048,
          block_size=1024)
DINOV2_S = dict(hidden_size=384, num_layers=12, num_heads=6, mlp_hidden=1536, patch_size=14, num_positions=1370)
GPT_B = dict(XL, dim=768, n_layer=12, n_head=12, ffn_hidden=2048)
SMOKE = dict(XL, dim=256, n_layer=3, n_head=4, ffn_hidden=768, block_size=64)   # --smoke: checks the script only
# the loader choices timed, in this order (weight_dtype, compute_dtype): fp32 = (default, auto) on a CPU; bf16 =
# (default, bf16); int8 = (int8, auto); int8_fast = (int8_fast, auto); int8_fast_bf16 = (int8_fast, bf16)
ROUTES = ("fp32", "int8", "int8_fast", "int8_fast_bf16", "bf16")


def random_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """Built on the meta device, then filled: matrices N(0, 1/fan_in), norm scales 1, everything else N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.ndim >= 2:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    return model.eval().requires_grad_(False)


def copy_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of a large tensor copy, counting the read and the write."""
    n = int(gib * (1 << 30)) // 4
    src, dst = torch.randn(n), torch.empty(n)
    t = median_seconds(lambda: dst.copy_(src), 5)
    return 2 * n * 4 / t


def streamed_bytes(model: GPT) -> int:
    """Bytes a decode step must read: the layers, the final norm and the output head (one embedding row and the
    precomputed control tokens are negligible)."""
    return weight_bytes(model.layers) + weight_bytes(model.norm) + weight_bytes(model.output)


def decode_setup(model: GPT, n_tokens: int, with_control: bool):
    """A [cond; uncond] cache after prefill, ready for decode steps at late positions."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    caption = torch.randn(1, cfg.cls_token_num, cfg.caption_dim, generator=gen)
    mask = torch.ones(1, cfg.cls_token_num)
    mask[:, : cfg.cls_token_num // 3] = 0
    timings = {}
    control = None
    with torch.no_grad():
        if with_control:
            side = 16 * int(round(n_tokens ** 0.5))
            image = torch.rand(1, 3, side, side, generator=gen) * 2 - 1
            t0 = time.perf_counter()
            control = model.control_tokens(model.adapter_features(image, "nearest"))
            timings["control_encoder_s"] = time.perf_counter() - t0
            control = torch.cat([control, torch.zeros_like(control)], dim=1)
        prefix = model.embed_prefix(caption)
        prefix = torch.cat([prefix, model.embed_prefix(model.cls_embedding.uncond_embedding[None])])
        cache = model.new_cache(2, n_tokens, torch.cat([mask, mask]))
        t0 = time.perf_counter()
        model.prefill(prefix, cache, control, 1.0)
        timings["prefill_s"] = time.perf_counter() - t0
    return cache, control, timings


def kv_bytes(model: GPT, cache, position: int) -> int:
    """K/V bytes a decode step at sequence `position` reads: every layer's keys and values up to it."""
    k = cache.k[0]
    return 2 * model.cfg.n_layer * k.shape[0] * k.shape[1] * (position + 1) * k.shape[3] * k.element_size()


def time_steps(model, cache, control, first_token: int, steps: int, gen) -> float:
    """Median time of `steps` decode + sampling steps for image tokens first_token, first_token + 1, …"""
    settings = SamplingSettings(cfg_scale=4.0, top_k=2000)
    t = model.cfg.cls_token_num
    token = torch.zeros(2, 1, dtype=torch.long)
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            j = first_token + i
            t0 = time.perf_counter()
            logits = model.decode(token, t + j - 1, cache, control, 1.0)[:, -1]
            nxt = sample_token(combine_cfg(logits, settings.cfg_scale), settings, gen)
            token = torch.cat([nxt, nxt])
            if i:                                             # the first step is the warm-up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_decode(model: GPT, n_tokens: int, steps: int, with_control: bool = True) -> dict:
    cache, control, out = decode_setup(model, n_tokens, with_control)
    gen = torch.Generator().manual_seed(2)
    out["early_step_s"] = time_steps(model, cache, control, 1, steps, gen)
    late = n_tokens - 1 - steps
    out["step_s"] = time_steps(model, cache, control, late, steps, gen)      # late positions: the cache (nearly) full
    out["late_kv_GB"] = kv_bytes(model, cache, model.cfg.cls_token_num + n_tokens - 1) / 1e9
    mean_step = (out["early_step_s"] + out["step_s"]) / 2
    out["image_s_extrapolated"] = out.get("control_encoder_s", 0.0) + out["prefill_s"] + (n_tokens - 1) * mean_step
    return out


def time_recompute(model: GPT, n_tokens: int) -> float:
    """One causal forward over T + n_tokens − 1 positions, no cache: a cache-less decoder's cost for the last token."""
    cfg = model.cfg
    s = cfg.cls_token_num + n_tokens - 1
    h = torch.randn(2, s, cfg.dim)
    with torch.no_grad():
        return median_seconds(lambda: model.forward_hidden(h, torch.arange(s), None), 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--smoke", action="store_true", help="a tiny model, to check the script runs")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--no-kv-check", action="store_true", help="skip the KV cache vs recompute part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_tokens = 1024 if not args.smoke else 64
    big = SMOKE if args.smoke else XL
    results = {"threads": args.threads, "tokens": n_tokens, "cfg": 4.0, "batch": 2, "smoke": args.smoke,
               "per_image_note": "extrapolated: control encoder + prefill + (tokens - 1) x mean of the early "
                                 "and late median steps"}

    bandwidth = copy_bandwidth(0.05 if args.smoke else 1.0)
    results["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 2)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s", flush=True)

    config = GPTConfig(**big, control=Dinov2Config(**DINOV2_S))
    model = None
    routes = args.routes.split(",")
    for name in sorted(routes, key=ROUTES.index):
        if name in ("fp32", "bf16") or model is None:
            model = None
            model = random_model(config)                      # the same weights for every route (seed 0)
        if name.endswith("bf16"):                             # compute_dtype bf16: bf16 maths and KV cache
            native, why = native_bf16("cpu")
            results["bf16_native"] = why
            if not native:
                print(f"{name}: skipped, {why}", flush=True)
                continue
            model = model.to(torch.bfloat16)                  # int8 weights stay int8 (and their scales fp32)
        if name.startswith("int8") and not any(isinstance(m, Int8Linear) for m in model.modules()):
            # ControlAR Loader's weight_dtype int8: linear layers int8, the exact route
            quantize_model_linears(model.layers)
            quantize_model_linears(model, include=lambda n, _: n == "output")
            results["int8_route"] = int8_backend()
        if name.startswith("int8_fast"):                      # int8_fast: the same int8 weights, fast route
            route, why = fast_route("cpu", few_rows=True)
            for m in model.modules():
                if isinstance(m, Int8Linear):
                    m.route = route
            results["int8_fast_route"] = f"{route or 'default'}: {why}"
        r = time_decode(model, n_tokens, args.steps)
        streamed = streamed_bytes(model)
        r["streamed_weight_GB"] = round(streamed / 1e9, 3)
        r["weight_bound_s"] = streamed / bandwidth
        r["bound_s"] = (streamed + r["late_kv_GB"] * 1e9) / bandwidth
        r["step_over_bound"] = round(r["step_s"] / r["bound_s"], 2)
        r["step_over_weight_bound"] = round(r["step_s"] / r["weight_bound_s"], 2)
        results[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        print(f"{name}: late step {r['step_s'] * 1000:.1f} ms, early {r['early_step_s'] * 1000:.1f} ms; bound "
              f"{r['bound_s'] * 1000:.1f} ms = ({r['streamed_weight_GB']} GB weights + {r['late_kv_GB']:.3f} GB K/V) "
              f"/ bandwidth: ×{r['step_over_bound']} (weights only: ×{r['step_over_weight_bound']}); image ≈ "
              f"{r['image_s_extrapolated']:.0f} s (extrapolated)", flush=True)
    for name in routes:
        if name != "fp32" and name in results and "fp32" in results:
            results[f"{name}_speedup_vs_fp32"] = round(results["fp32"]["step_s"] / results[name]["step_s"], 2)
            print(f"{name}: {results[f'{name}_speedup_vs_fp32']}x faster than fp32 (late step)", flush=True)
    model = None
    if args.no_kv_check:
        print(save_results("controlar_decode" + ("_smoke" if args.smoke else ""), results))
        return

    reduced = GPTConfig(**(SMOKE if args.smoke else GPT_B))
    model = random_model(reduced)
    cached = time_decode(model, n_tokens, args.steps, with_control=False)["step_s"]
    recompute = time_recompute(model, n_tokens)
    results["kv_cache"] = {"model": "smoke" if args.smoke else "GPT-B (12 x 768)", "cached_step_s": round(cached, 4),
                           "recompute_step_s": round(recompute, 4), "speedup": round(recompute / cached, 1)}
    print(f"KV cache at {n_tokens} tokens ({results['kv_cache']['model']}): cached step {cached * 1000:.1f} ms, "
          f"recomputing the prefix {recompute * 1000:.0f} ms: ×{recompute / cached:.0f}", flush=True)
    print(save_results("controlar_decode" + ("_smoke" if args.smoke else ""), results))


if __name__ == "__main__":
    main()
