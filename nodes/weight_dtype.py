"""The `weight_dtype` choice shared by the DiT, ControlNet and T5 loaders."""
from __future__ import annotations

import torch

from ..kernels.int8 import Int8Ops, int8_backend

WEIGHT_DTYPES = {
    "default": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": None,   # int8 linear weights with per-output-channel scales (kernels/int8.py)
}
WEIGHT_DTYPE_TOOLTIP = ("Storage of the weights. 'default' lets ComfyUI pick for your device; fp16/bf16/fp8 "
                        "store narrower floats and compute in a dtype your device runs well; int8 stores "
                        "linear layers as int8 + per-channel scales (about 27% of fp32 bytes) — the route "
                        "(bitsandbytes, int8 GEMM or dequantise) is chosen for your hardware.")


def storage_choice(name: str):
    """(float storage dtype or None, operations namespace or None, note for the node's output)."""
    if name == "int8":
        return None, Int8Ops, f"int8 weights: {int8_backend()}"
    return WEIGHT_DTYPES[name], None, ""
