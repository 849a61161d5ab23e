"""8-bit linear layers: int8 weights with per-output-channel scales, usable as an `operations` namespace.

Storage is weight-only int8 (`weight` int8 [out, in], `weight_scale` float32 [out], `bias` as loaded),
about a quarter of fp32. A float checkpoint is quantised layer by layer while it loads, so the float
copy never stays resident; an int8 checkpoint (`weight` + `weight_scale`) loads as is.

The forward pass takes one of four routes (see `select_route`, `int8_backend`):
- "int8_mm": per-row dynamic activation quantisation, `torch._int_mm` (s8·s8→s32), rescale.
  Fast only where the int8 GEMM is native: CPUs with AVX-512 VNNI (or AMX), and CUDA.
- "qlinear": torch's dynamic quantized linear (`torch.ops.quantized.linear_dynamic`, fbgemm/oneDNN):
  per-tensor u8 activations against the weight packed once into the engine's blocked int8 layout.
  These engines have u8·s8 kernels for plain AVX2, so this is the int8 GEMM of CPUs without VNNI,
  where `torch._int_mm` is a scalar loop. The packed copy replaces the plain int8 weight.
- "dequant": dequantise the weight and run a float GEMM. Works everywhere.
- "bitsandbytes": bitsandbytes' LLM.int8 matmul (as `Linear8bitLt` in eval), CUDA first.
Override with the `route=` argument or the DIT_CONTROL_INT8_ROUTE environment variable.

Pure PyTorch; bitsandbytes is optional and imported only when its route is asked for.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint_io import release_free_heap
from .native_dtypes import cpu_capability, cpu_flags, cpu_native_dtypes  # noqa: F401 (the one probe; re-exported)

ROUTES = ("int8_mm", "qlinear", "dequant", "bitsandbytes")
ROUTE_ENV = "DIT_CONTROL_INT8_ROUTE"

# Symmetric int8 uses [-127, 127] so that negation never overflows and the grid is centred on 0.
QMAX = 127.0


# -- hardware detection ------------------------------------------------------------------------

def cpu_has_fast_int8() -> bool:
    """True where torch._int_mm runs a VNNI/AMX kernel rather than a scalar loop (and gives exact sums)."""
    flags = cpu_flags()
    return cpu_capability() == "AVX512" and bool({"avx512_vnni", "amx_int8"} & flags) and _int_mm_status("cpu")[0]


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


# -- torch._int_mm, checked ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _int_mm_status(device_type: str) -> Tuple[bool, str]:
    """Whether torch._int_mm is exact on this device type, checked once on a tiny problem. Some int8 GEMM
    kernels widen u8·s8 pairs into saturating 16-bit sums (oneDNN's s8·s8 GEMM below VNNI, e.g. with
    ONEDNN_MAX_CPU_ISA=AVX2), which turns all-127 rows into garbage; the route must not run there."""
    if not hasattr(torch, "_int_mm"):
        return False, f"torch {torch.__version__} has no _int_mm"
    g = torch.Generator().manual_seed(0)
    extreme = torch.full((32, 64), 127, dtype=torch.int8)
    mixed = torch.randint(-128, 128, (32, 64), generator=g, dtype=torch.int8)
    weight = torch.randint(-128, 128, (64, 32), generator=g, dtype=torch.int8)
    try:
        for a in (extreme, mixed):
            got = torch._int_mm(a.to(device_type), weight.to(device_type)).cpu()
            if not torch.equal(got, (a.long() @ weight.long()).int()):
                return False, f"torch._int_mm gives wrong sums on {device_type} (a saturating int8 kernel)"
    except Exception as e:
        return False, f"torch._int_mm fails on {device_type}: {type(e).__name__}: {str(e)[:200]}"
    return True, "torch._int_mm"


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
        if _int_mm_status("cuda")[0]:
            return "int8_mm", f"CUDA: torch._int_mm int8 GEMM ({why})"
        return "dequant", f"CUDA: {why}; {_int_mm_status('cuda')[1]}"
    if device_type != "cpu":
        return "dequant", f"{device_type}: no int8 GEMM is wired up for this device"
    cap, flags = cpu_capability(), cpu_flags()
    if cpu_has_fast_int8():
        return "int8_mm", f"CPU {cap} with VNNI: torch._int_mm int8 GEMM beats the float GEMMs"
    missing = "avx512_vnni" if cap == "AVX512" else f"AVX-512 (ATen level {cap})"
    note = "" if flags else " (no /proc/cpuinfo flags to check)"
    compute = "/".join(str(d).replace("torch.", "") for d in cpu_native_dtypes())
    # Measured on an AVX2 EPYC (XL/2, 512 px): qlinear is 1.6x faster but its per-tensor 7-bit
    # activations give 4.7% ε error against 1.5% here, so it is the opt-in fast route, not the default.
    return "dequant", (f"CPU lacks {missing}{note}, so torch._int_mm would run a scalar loop; "
                       f"weights are dequantised into a native {compute} GEMM (exact activations)")


def fast_route(device="cpu", few_rows: bool = False) -> Tuple[Optional[str], str]:
    """(route, reason): the `int8_fast` weight choice's policy, in one place — the fastest int8 route for a
    device, trading accuracy for speed where the choice exists. route None: the default route (select_route
    when the layer runs).

    Many rows (a DiT's tokens; the default): on CPUs without VNNI "qlinear" (int8 activations too), elsewhere
    the default route. Few rows (an autoregressive decode step multiplies only 2·batch rows, CFG): there the
    exact routes dequantise each weight into a float GEMM (torch._int_mm is only used above 16 rows), which
    moves more bytes than the float weights themselves, so on any CPU with an engine "qlinear" (it reads the
    packed int8 weights directly at any row count, per-tensor 7-bit activations: less exact); elsewhere, or
    when DIT_CONTROL_INT8_ROUTE is set, the default route."""
    device = torch.device(device)
    engine = qlinear_engine() if device.type == "cpu" else None
    if few_rows:
        if os.environ.get(ROUTE_ENV, "").strip().lower() not in ("", "auto") or engine is None:
            return None, select_route(device)[1]
        return "qlinear", (f"{engine} dynamic int8 linear: reads the int8 weights directly at the decode steps' "
                           f"few rows; per-tensor 7-bit activations")
    if engine is not None and not cpu_has_fast_int8():
        return "qlinear", (f"{engine} dynamic int8 linear: int8 weights and per-tensor 7-bit "
                           f"activations (u8·s8 on AVX2); faster than float, less exact")
    return select_route(device)


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
    if forced == "qlinear" and (device_type != "cpu" or qlinear_engine() is None):
        return "dequant", f"qlinear forced by {source} but it needs a CPU with fbgemm/oneDNN (have {device_type})"
    if forced == "int8_mm" and not _int_mm_status(device_type)[0]:
        return "dequant", f"int8_mm forced by {source} but unusable: {_int_mm_status(device_type)[1]}"
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
    if _int_mm_status(device_type)[0]:
        routes.append("int8_mm")
    if device_type == "cpu" and qlinear_engine() is not None:
        routes.append("qlinear")
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
    if torch.is_grad_enabled():
        w = dequantize_weight(q, scale, dtype)   # autograd may keep it: a fresh tensor
    else:
        # Into a reused buffer: a fresh 20-170 MB tensor per call costs ~10x the conversion itself
        # in page faults. F.linear is done with it before the next layer reuses it.
        w = _scratch(q.shape, dtype, q.device).copy_(q).mul_(scale[:, None].to(dtype))
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))


_SCRATCH = threading.local()


def _scratch(shape, dtype, device) -> torch.Tensor:
    """A per-thread reusable buffer viewed as `shape`; it grows to the largest layer seen."""
    n = math.prod(shape)
    key = (dtype, torch.device(device))
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def release_scratch():
    """Free this thread's dequantisation buffers (they are rebuilt on the next int8 forward)."""
    _SCRATCH.buffers = {}


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


# -- torch's quantized engines (fbgemm / oneDNN) ---------------------------------------------------

# u8 activations are quantised to 7 bits: without VNNI the engines multiply u8·s8 pairs with
# vpmaddubsw, whose int16 sums saturate at full 8-bit range (255·127·2 > 32767).
QLINEAR_REDUCE_RANGE = True


@functools.lru_cache(maxsize=None)
def qlinear_engine() -> Optional[str]:
    """The quantized engine that packs our weights ("fbgemm" or "onednn"), or None if torch has neither."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("fbgemm", "onednn"):
        if engine in engines:
            return engine
    return None


@contextlib.contextmanager
def _engine(name: str):
    """Run with torch's global quantized engine set to `name`, restoring it after."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def qlinear_pack(q: torch.Tensor, scale: torch.Tensor):
    """Our int8 weight + per-channel scales as the engine's packed linear weight (bias stays ours)."""
    with warnings.catch_warnings():
        # quantized tensors are marked deprecated; this is the one place we make one, to pack it
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(q.cpu(), scale.cpu().double(), zero, 0)
    with _engine(qlinear_engine()):
        return torch.ops.quantized.linear_prepack(qweight, None)


def qlinear_unpack(packed) -> torch.Tensor:
    """The plain int8 weight back from a packed one (the scales are unchanged)."""
    qweight, _ = torch.ops.quantized.linear_unpack(packed)
    return qweight.int_repr()


def _qlinear(x, packed, bias):
    """y = x @ W.T + bias with W packed; x is 2-D; the engine computes in fp32."""
    y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, QLINEAR_REDUCE_RANGE)
    if bias is not None:
        y.add_(bias.float())
    return y


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
        self._packed = None   # the "qlinear" route's packed weight; while set, it is the only copy

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
        self.unpack()  # new weights replace the packed ones
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            # `state_dict` is load_state_dict's own shallow copy: swapping entries leaves the caller's alone.
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = quantize_weight(w)
        s = state_dict.get(prefix + "weight_scale")
        if isinstance(s, torch.Tensor) and s.dtype != torch.float32:
            state_dict[prefix + "weight_scale"] = s.float()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self.int8_weight()

    def _apply(self, fn, recurse=True):
        """Keep scales in fp32 when the model is cast (`.to(torch.bfloat16)` casts every float buffer)."""
        if self._packed is not None and fn(torch.zeros(1, dtype=torch.int8)).device.type != "cpu":
            self.unpack()  # packed weights live on the CPU; leaving it takes the plain int8 weight along
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

    def int8_weight(self) -> torch.Tensor:
        """The plain int8 weight [out, in], unpacked if the layer is packed."""
        return self.weight if self._packed is None else qlinear_unpack(self._packed)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight this layer stands for."""
        return dequantize_weight(self.int8_weight(), self.weight_scale, dtype)

    def pack(self):
        """Pack the weight for the "qlinear" route and free the plain copy (done at its first forward)."""
        if self._packed is None:
            self._packed = qlinear_pack(self.weight, self.weight_scale)
            # an empty placeholder keeps `weight` a parameter; state_dict() unpacks the real one
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
            release_free_heap()   # the plain weight's heap block, now a hole below the packed one

    def unpack(self):
        """Back to the plain int8 weight (for saving, other routes, other devices)."""
        if self._packed is not None:
            self.weight = nn.Parameter(qlinear_unpack(self._packed), requires_grad=False)
            self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear map of the last dimension; the output has the input's dtype."""
        x2 = x.reshape(-1, self.in_features)
        route = self.route_for(x)
        if route == "qlinear":
            self.pack()
            y = _qlinear(x2, self._packed, self.bias)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        self.unpack()
        y = _KERNELS[route](x2, self.weight, self.weight_scale, self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, route={self.route or 'auto'}")


class Int8Ops:
    """An `operations=` namespace: Linear is int8, every other layer is plain torch.nn.

    `OutputLinear` (a model's last projection, read by models that have one: PixArt's final layer) stays
    float: its input is the final norm of the residual stream, where outlier channels can set the int8
    activation scale for all the others (LLM.int8's finding); the embedded micro demo model has eight such
    channels by construction, and int8 activations there moved its output by 68%. It is ~0.1% of a DiT's
    weights."""

    Linear = Int8Linear
    OutputLinear = nn.Linear
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
    """Bytes held by a module's parameters and buffers (shared tensors counted once), packed int8
    weights included at one byte per element plus the engine's int32 column offsets."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    packed = sum(m.in_features * m.out_features + 4 * m.out_features
                 for m in module.modules() if isinstance(m, Int8Linear) and m._packed is not None)
    return packed + sum(t.numel() * t.element_size() for t in tensors.values())
