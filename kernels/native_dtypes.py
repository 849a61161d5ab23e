"""Which float dtypes the running device multiplies natively: one probe of the CPU's features, shared by the
int8 routes (kernels/int8.py) and the loaders' `compute_dtype` choice (nodes/weight_dtype.py).

Emulated bf16 or fp16 GEMMs run several times slower than fp32 (measured on an AVX2 EPYC: bf16 ~20 GFLOP/s
against ~165 fp32), native ones 2.5x faster (AVX-512 bf16 on Zen 4: ~415 GFLOP/s). So every fast path is
chosen from the running CPU's flags, never from a guess.

DIT_CONTROL_CPU_FLAGS (tests only) replaces the /proc/cpuinfo flags with its space-separated list, so that a
test can pretend to run on an AVX2-only CPU (e.g. "avx2 fma"); it changes what is chosen, not what the CPU runs.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

CPU_FLAGS_ENV = "DIT_CONTROL_CPU_FLAGS"
# x86 flags that give native bf16 dot products: AVX-512 BF16 (vdpbf16ps) or AMX tiles
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")


@functools.lru_cache(maxsize=None)
def _proc_cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS), or the test override."""
    forced = os.environ.get(CPU_FLAGS_ENV)
    if forced is not None:
        return frozenset(forced.split())
    return _proc_cpu_flags()


def cpu_capability() -> str:
    """ATen's CPU kernel level ("AVX512", "AVX2", "DEFAULT", ...); ATEN_CPU_CAPABILITY can lower it."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch builds have no such query
        return "unknown"


def cpu_native_dtypes() -> Tuple[torch.dtype, ...]:
    """Float dtypes whose CPU GEMM is native; others are emulated and run several times slower than fp32."""
    native = [torch.float32]
    if native_bf16("cpu")[0]:
        native.append(torch.bfloat16)
    if cpu_capability() == "AVX512" and set(FP16_CPU_FLAGS) & cpu_flags():
        native.append(torch.float16)
    return tuple(native)


def native_bf16(device) -> Tuple[bool, str]:
    """(whether `device` computes bf16 dot products natively, the evidence in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device)
        return ok, f"{name}: {'native bf16' if ok else 'no native bf16 (needs compute capability 8.0+)'}"
    if device.type != "cpu":
        return False, f"{device.type}: no bf16 check is wired up for this device"
    flags, cap = cpu_flags(), cpu_capability()
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if have and cap == "AVX512":
        return True, f"CPU with {' + '.join(have)}"
    if have:
        return False, f"CPU has {' + '.join(have)} but ATen runs its {cap} kernels (ATEN_CPU_CAPABILITY?)"
    source = " (no /proc/cpuinfo flags to check)" if not flags else ""
    return False, f"CPU lacks {' and '.join(BF16_CPU_FLAGS)}{source}: bf16 is emulated there"


COMPUTE_DTYPES = ("auto", "bf16")


def explicit_compute_dtype(name: str, device) -> Tuple[Optional[torch.dtype], str]:
    """(dtype, note) of a loader's `compute_dtype` choice on `device`: (None, "") for 'auto' (the loader's own
    pick, unchanged); bf16 only where it is native, else a ValueError naming what is missing."""
    if name == "auto":
        return None, ""
    if name != "bf16":
        raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {name!r}")
    native, why = native_bf16(device)
    if not native:
        raise ValueError(f"compute_dtype 'bf16' needs native bf16 dot products on the device that runs the model "
                         f"({torch.device(device).type}): {why}. Use compute_dtype 'auto' (fp32 maths on a CPU); "
                         f"weight_dtype bf16 still halves the memory.")
    return torch.bfloat16, f"compute bf16: {why}"
