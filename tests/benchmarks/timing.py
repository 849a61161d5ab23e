"""How benchmarks time a call and read their peak memory."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` calls, after one warm-up call, under no_grad."""
    return round_robin_medians({"fn": fn}, repeats)["fn"]


def round_robin_medians(fns: dict, repeats: int) -> dict:
    """Median wall seconds per call of each fn, after one warm-up call each. The fns take turns, so a change
    of machine load during the run shifts all of them alike instead of one."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; /proc/self/clear_refs with '5' resets it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
