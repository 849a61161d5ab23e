"""The `weight_dtype` and `compute_dtype` choices shared by the DiT, ControlNet, T5, DiT4SR and ControlAR loaders,
and the operations namespace a loader builds its layers from (`operations_for`)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from comfy_api.latest import io

import comfy.ops

from ..kernels.int8 import fast_route, int8_backend, int8_ops
from ..kernels.native_dtypes import COMPUTE_DTYPES, explicit_compute_dtype

WEIGHT_DTYPES = {
    "default": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": None,        # int8 linear weights, per-output-channel scales, the most exact int8 route here
    "int8_fast": None,   # same storage, the fastest int8 route here (int8 activations on AVX2 CPUs)
}
WEIGHT_DTYPE_TOOLTIP = ("Storage of the weights. 'default' lets ComfyUI pick for your device; fp16/bf16/fp8 "
                        "store narrower floats and compute in a dtype your device runs well. int8 stores "
                        "linear layers as int8 + per-channel scales (about 25% of fp32 bytes) and runs the "
                        "most exact int8 route for your hardware (bitsandbytes on CUDA, int8 GEMM with VNNI, "
                        "else dequantise into a float GEMM). int8_fast also quantises activations where that "
                        "is faster (CPUs without VNNI: ~1.5x the speed of bf16, a few % more error).")


class StorageChoice(NamedTuple):
    """What a `weight_dtype` choice means for a loader (unpacks as the 3-tuple it replaces)."""
    dtype: Optional[torch.dtype]     # float storage dtype; None: the file's / ComfyUI's pick, or int8
    int8_ops: Optional[object]       # the int8 operations namespace; None for float storage
    note: str                        # for the node's output, "" for float storage


def storage_choice(name: str) -> StorageChoice:
    """The storage a `weight_dtype` choice asks for (int8: the route the hardware runs best)."""
    if name == "int8":
        return StorageChoice(None, int8_ops(), f"int8 weights: {int8_backend()}")
    if name == "int8_fast":
        route, why = fast_route("cuda" if torch.cuda.is_available() else "cpu")
        return StorageChoice(None, int8_ops(route), f"int8 weights: {route} — {why}")
    return StorageChoice(WEIGHT_DTYPES[name], None, "")


def operations_for(casts: bool, int8_ops=None):
    """The layers a loader builds: the int8 choice's namespace when there is one; else core's layers that
    skip init (weights are assigned from the file) and, where the stored dtype differs from the compute
    dtype (`casts`), cast the weights per call."""
    if int8_ops is not None:
        return int8_ops
    return comfy.ops.manual_cast if casts else comfy.ops.disable_weight_init


COMPUTE_DTYPE_TOOLTIP = ("The dtype the maths run in. 'auto' keeps ComfyUI's choice for your device (on a CPU: fp32, "
                         "casting bf16/fp16/fp8 weights per layer). 'bf16' computes in bf16 where the device has "
                         "native bf16 dot products (CPUs with AVX-512 BF16 or AMX, e.g. AMD Zen 4, Intel Sapphire "
                         "Rapids; NVIDIA Ampere and newer): 2-4x the speed of fp32 maths on such a CPU, ~1-2% "
                         "relative error against fp32. With weight_dtype 'default' the weights are then stored in "
                         "bf16 too. Refused, naming the missing CPU feature, where bf16 would only be emulated "
                         "(several times slower than fp32).")


class ComputeChoice(NamedTuple):
    """What a `compute_dtype` choice means for a loader."""
    dtype: Optional[torch.dtype]     # None: 'auto', the loader's / ComfyUI's own pick (today's behaviour)
    note: str                        # what was chosen and why, for the node's description; "" for 'auto'


def compute_choice(name: str, device) -> ComputeChoice:
    """The compute dtype a `compute_dtype` choice asks for on `device` (kernels/native_dtypes.py: bf16 only where
    it is native, else a ValueError naming the missing feature). Call it before reading any weight."""
    return ComputeChoice(*explicit_compute_dtype(name, device))


def compute_dtype_input(note: str = "") -> io.Combo.Input:
    """The loaders' optional `compute_dtype` widget (`auto` by default, so older workflow JSON keeps working);
    `note`: what the choice means for this loader, after the shared tooltip."""
    return io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="auto", optional=True,
                          tooltip=COMPUTE_DTYPE_TOOLTIP + note)


def weight_dtype_input(note: str = "") -> io.Combo.Input:
    """The loaders' `weight_dtype` widget (`default`: ComfyUI's pick); `note`: what it means for this loader."""
    return io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                          tooltip=WEIGHT_DTYPE_TOOLTIP + note)
