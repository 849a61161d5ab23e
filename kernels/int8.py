"""8-bit linear layers: int8 weights with per-output-channel scales, usable as an `operations` namespace.

Storage is weight-only int8 (`weight` int8 [out, in], `weight_scale` float32 [out], `bias` as loaded),
about a quarter of fp32. A float checkpoint is quantised layer by layer while it loads, so the float
copy never stays resident; an int8 checkpoint (`weight` + `weight_scale`) loads as is.

The forward pass takes one of three routes (see `select_route`, `int8_backend`):
- "int8_mm": per-row dynamic activation quantisation, `torch._int_mm` (s8·s8→s32), rescale.
  Fast only where the int8 GEMM is native: CPUs with AVX-512 VNNI (or AMX), and CUDA.
- "dequant": dequantise the weight and run a float GEMM. Works everywhere.
- "bitsandbytes": bitsandbytes' LLM.int8 matmul (as `Linear8bitLt` in eval), CUDA first.
Override with the `route=` argument or the DIT_CONTROL_INT8_ROUTE environment variable.

Pure PyTorch; bitsandbytes is optional and imported only when its route is asked for.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTES = ("int8_mm", "dequant", "bitsandbytes")
ROUTE_ENV = "DIT_CONTROL_INT8_ROUTE"

# Symmetric int8 uses [-127, 127] so that negation never overflows and the grid is centred on 0.
QMAX = 127.0


# -- hardware detection ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_capability() -> str:
    """ATen's CPU kernel level ("AVX512", "AVX2", "DEFAULT", ...); ATEN_CPU_CAPABILITY can lower it."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch builds have no such query
        return "unknown"


def cpu_has_fast_int8() -> bool:
    """True where torch._int_mm runs a VNNI/AMX kernel rather than a scalar loop."""
    flags = cpu_flags()
    return cpu_capability() == "AVX512" and bool({"avx512_vnni", "amx_int8"} & flags)


def cpu_native_dtypes() -> Tuple[torch.dtype, ...]:
    """Float dtypes whose CPU GEMM is native; others are emulated and run several times slower than fp32."""
    flags = cpu_flags()
    native = [torch.float32]
    if cpu_capability() == "AVX512":
        if {"avx512_bf16", "amx_bf16"} & flags:
            native.append(torch.bfloat16)
        if {"avx512_fp16", "amx_fp16"} & flags:
            native.append(torch.float16)
    return tuple(native)


def gemm_dtype(act_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the dequant route computes in: the activations', unless the CPU only emulates it."""
    if device.type != "cpu" or act_dtype in cpu_native_dtypes():
        return act_dtype
    # Measured on an AVX2 host: bf16 GEMM ~20 GFLOP/s against ~165 for fp32, so upcasting wins by far.
    return torch.float32


# -- bitsandbytes (optional) -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _bnb():
    """The bitsandbytes module, or the reason it cannot be imported."""
    try:
        import bitsandbytes
        return bitsandbytes, ""
    except Exception as e:  # missing, or its native library fails to load
        return None, f"{type(e).__name__}: {e}"


class _DropFp16CastNotice(logging.Filter):
    """bitsandbytes logs a warning on every non-fp16 matmul; it is expected here, so keep logs readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


@functools.lru_cache(maxsize=None)
def _bnb_status(device_type: str) -> Tuple[bool, str]:
    """Whether bitsandbytes' int8 matmul runs on this device type, checked once on a tiny problem."""
    bnb, why = _bnb()
    if bnb is None:
        return False, f"bitsandbytes not importable ({why})"
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropFp16CastNotice())
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(24, 32, generator=g)
        q, s = quantize_weight(w)
        x = torch.randn(17, 32, generator=g)
        y = _bnb_linear(x.to(device_type), q.to(device_type), s.to(device_type), None).cpu()
        err = (y - F.linear(x, w)).norm() / F.linear(x, w).norm()
        if not torch.isfinite(err) or err > 0.05:
            return False, f"bitsandbytes {bnb.__version__} gives wrong results on {device_type} (rel. err {err:.3f})"
    except Exception as e:
        return False, f"bitsandbytes {bnb.__version__} fails on {device_type}: {type(e).__name__}: {str(e)[:200]}"
    return True, f"bitsandbytes {bnb.__version__}"


# -- route selection ---------------------------------------------------------------------------

def _requested(route: Optional[str]) -> Tuple[Optional[str], str]:
    """The forced route and who forced it: the argument first, then the environment variable."""
    source = "route argument"
    if not route:
        route, source = os.environ.get(ROUTE_ENV, ""), ROUTE_ENV
    route = route.strip().lower()
    if route in ("", "auto"):
        return None, ""
    if route not in ROUTES:
        raise ValueError(f"unknown int8 route {route!r} (from {source}); expected one of {ROUTES} or 'auto'")
    return route, source


@functools.lru_cache(maxsize=None)
def _auto_route(device_type: str) -> Tuple[str, str]:
    """The hardware's best route and why."""
    if device_type == "cuda":
        ok, why = _bnb_status("cuda")
        if ok:
            return "bitsandbytes", f"CUDA: {why} LLM.int8 matmul"
        return "int8_mm", f"CUDA: torch._int_mm int8 GEMM ({why})"
    if device_type != "cpu":
        return "dequant", f"{device_type}: no int8 GEMM is wired up for this device"
    cap, flags = cpu_capability(), cpu_flags()
    if cpu_has_fast_int8():
        return "int8_mm", f"CPU {cap} with VNNI: torch._int_mm int8 GEMM beats the float GEMMs"
    missing = "avx512_vnni" if cap == "AVX512" else f"AVX-512 (ATen level {cap})"
    compute = "/".join(str(d).replace("torch.", "") for d in cpu_native_dtypes())
    note = "" if flags else " (no /proc/cpuinfo flags to check)"
    return "dequant", (f"CPU lacks {missing}{note}, so torch._int_mm would run a scalar loop; "
                       f"weights are dequantised into a native {compute} GEMM")


def select_route(device="cpu", route: Optional[str] = None) -> Tuple[str, str]:
    """(route, reason) for a device: `route` argument, else DIT_CONTROL_INT8_ROUTE, else the hardware's pick."""
    device_type = torch.device(device).type
    forced, source = _requested(route)
    if forced is None:
        return _auto_route(device_type)
    if forced == "bitsandbytes":
        ok, why = _bnb_status(device_type)
        if not ok:
            return "dequant", f"bitsandbytes forced by {source} but unusable: {why}"
    if forced == "int8_mm" and not hasattr(torch, "_int_mm"):
        return "dequant", f"int8_mm forced by {source} but torch {torch.__version__} has no _int_mm"
    return forced, f"forced by {source}"


def int8_backend(device=None, route: Optional[str] = None) -> str:
    """One line for the UI: the route int8 layers take on `device` (default: cuda if present) and why."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen, reason = select_route(device, route)
    return f"{chosen} — {reason}"


def available_routes(device="cpu") -> List[str]:
    """The routes that actually run on `device` (slow ones included), for tests and benchmarks."""
    device_type = torch.device(device).type
    routes = ["dequant"]
    if hasattr(torch, "_int_mm"):
        routes.append("int8_mm")
    if _bnb_status(device_type)[0]:
        routes.append("bitsandbytes")
    return routes


def int_mm_fits(m: int, k: int, n: int) -> bool:
    """Shapes torch._int_mm takes on CUDA (M > 16, K and N multiples of 8).

    The CPU kernel takes any shape, but the same limits apply everywhere so that a layer's numerics do
    not depend on the device; what they exclude (timestep / pooled-text projections, M = batch) is a
    negligible share of a DiT's FLOPs.
    """
    return m > 16 and k % 8 == 0 and n % 8 == 0 and k > 0 and n > 0


# -- the maths ---------------------------------------------------------------------------------

def quantize_weight(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], float32 scale [out]) with w ≈ q * scale."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    # An all-zero row would divide by zero; any positive scale quantises it to zeros.
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The float weight q * scale, computed in fp32 then cast (the scale would lose bits in bf16)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric int8 of a 2-D activation: (int8 [M, K], float32 scale [M, 1])."""
    # fp32 maths: in bf16, x / scale lands on a grid coarser than 1 near ±127 and rounds wrongly.
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / QMAX).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def _int8_mm_linear(x, q, scale, bias):
    """y = x @ (q*scale).T + bias through an s8·s8→s32 GEMM; x is 2-D, the result is fp32."""
    xq, x_scale = quantize_rows(x)
    y = torch._int_mm(xq, q.t()).float()      # q.t() is the column-major layout cuBLAS wants
    y.mul_(x_scale).mul_(scale.float())
    if bias is not None:
        y.add_(bias.float())
    return y


def _dequant_linear(x, q, scale, bias):
    """y = x @ (q*scale).T + bias with the weight dequantised for a float GEMM; x is 2-D."""
    dtype = gemm_dtype(x.dtype, x.device)
    w = dequantize_weight(q, scale, dtype)
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))


def _bnb_linear(x, q, scale, bias):
    """bitsandbytes' LLM.int8 matmul on our storage (CB = q, SCB = row absmax = 127·scale); x is 2-D."""
    bnb, _ = _bnb()
    state = bnb.MatmulLtState()
    state.CB, state.SCB = q, (scale.float() * QMAX)
    state.has_fp16_weights = False   # use CB/SCB as given, never re-quantise
    state.is_training = False        # training mode on CPU dequantises to a float GEMM instead
    state.threshold = 0.0            # no outlier decomposition: random / DiT weights show none
    return bnb.matmul(x, q, state=state, bias=None if bias is None else bias.to(x.dtype))


_KERNELS = {"int8_mm": _int8_mm_linear, "dequant": _dequant_linear, "bitsandbytes": _bnb_linear}


# -- modules -----------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and per-output-channel fp32 scales; loads float or int8 state dicts."""

    route: Optional[str] = None  # class default, set by `int8_ops(route)`; None = env var / hardware

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 route: Optional[str] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if route is not None:
            _requested(route)  # reject typos at build time, not at the first forward
            self.route = route
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, route: Optional[str] = None) -> "Int8Linear":
        """An Int8Linear holding `linear`'s quantised weight and its bias."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta", route=route)
        q, s = quantize_weight(w)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = s
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Quantise a float `weight` on the way in; pass an int8 `weight` + `weight_scale` pair through."""
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            # `state_dict` is load_state_dict's own shallow copy: swapping entries leaves the caller's alone.
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = quantize_weight(w)
        s = state_dict.get(prefix + "weight_scale")
        if isinstance(s, torch.Tensor) and s.dtype != torch.float32:
            state_dict[prefix + "weight_scale"] = s.float()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        """Keep scales in fp32 when the model is cast (`.to(torch.bfloat16)` casts every float buffer)."""
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            # _apply stored fn(scale) as a new tensor, so the untouched fp32 original is still here.
            self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        return self

    def route_for(self, x: torch.Tensor) -> str:
        """The route this input takes: the layer's route, falling back to dequant where shapes don't fit."""
        route, _ = select_route(x.device, self.route)
        m = x.numel() // max(x.shape[-1], 1)
        if route == "int8_mm" and not int_mm_fits(m, self.in_features, self.out_features):
            return "dequant"
        return route

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight this layer stands for."""
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear map of the last dimension; the output has the input's dtype."""
        x2 = x.reshape(-1, self.in_features)
        y = _KERNELS[self.route_for(x)](x2, self.weight, self.weight_scale, self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, route={self.route or 'auto'}")


class Int8Ops:
    """An `operations=` namespace: Linear is int8, every other layer is plain torch.nn."""

    Linear = Int8Linear
    Conv2d = nn.Conv2d
    Embedding = nn.Embedding
    LayerNorm = nn.LayerNorm
    GroupNorm = nn.GroupNorm


@functools.lru_cache(maxsize=None)
def int8_ops(route: Optional[str] = None) -> type:
    """An Int8Ops namespace whose Linear layers are pinned to `route` (None: env var / hardware)."""
    if route is None:
        return Int8Ops
    _requested(route)
    linear = type(f"Int8Linear_{route}", (Int8Linear,), {"route": route, "__doc__": Int8Linear.__doc__})
    return type(f"Int8Ops_{route}", (Int8Ops,), {"Linear": linear})


def quantize_model_linears(module: nn.Module, route: Optional[str] = None,
                           include: Optional[Callable[[str, nn.Linear], bool]] = None) -> List[str]:
    """Swap every nn.Linear inside `module` (or those `include(name, layer)` accepts) for Int8Linear.

    Works in place on a model already loaded in float and returns the swapped layers' names; each float
    weight is released as its layer is replaced. The root module itself is never swapped.
    """
    swapped = []
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if include is not None and not include(name, child):
                continue
            setattr(parent, child_name, Int8Linear.from_linear(child, route=route))
            swapped.append(name)
    return swapped


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
