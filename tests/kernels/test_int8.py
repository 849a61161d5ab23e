"""kernels/int8.py: accuracy of each route, memory, float/int8 state-dict loading, shape fallbacks."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_control.kernels import int8
from dit_control.kernels.int8 import Int8Linear, Int8Ops, int8_ops, quantize_model_linears, weight_bytes

ROUTES = int8.available_routes("cpu")
DTYPES = [torch.float32, torch.bfloat16]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


class TinyNet(nn.Module):
    """Every layer kind a model builds from `operations`, as in kernels/pixart/model.py."""

    def __init__(self, operations=nn, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.conv = operations.Conv2d(4, 64, kernel_size=2, stride=2, **kw)
        self.emb = operations.Embedding(10, 64, **kw)
        self.norm = operations.LayerNorm(64, elementwise_affine=False, eps=1e-6, **kw)
        self.fc1 = operations.Linear(64, 256, **kw)
        self.fc2 = operations.Linear(256, 64, bias=False, **kw)
        self.head = operations.Linear(64, 24, **kw)

    def forward(self, img, label):
        x = self.conv(img).flatten(2).transpose(1, 2) + self.emb(label)[:, None]   # [B, N, 64]
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 12, 12, generator=g).to(dtype), torch.tensor([3, 7])


@pytest.fixture(autouse=True)
def _no_env_route(monkeypatch):
    monkeypatch.delenv(int8.ROUTE_ENV, raising=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", ROUTES)
def test_route_accuracy_vs_fp32(route, dtype):
    torch.manual_seed(0)
    ref_layer = nn.Linear(256, 320)            # default init: kaiming-uniform weights
    layer = Int8Linear.from_linear(ref_layer, route=route)
    x = torch.randn(64, 256)
    assert layer.route_for(x) == route
    with torch.no_grad():
        y = layer(x.to(dtype))
        ref = F.linear(x, ref_layer.weight, ref_layer.bias)   # fp32 all the way, unrounded input
    assert y.dtype == dtype and y.shape == ref.shape
    # qlinear quantises activations per tensor to 7 bits (u8 with reduce_range): ~1.8% per layer
    assert rel_err(y, ref) <= (0.025 if route == "qlinear" else 0.01)


def test_qlinear_packs_once_frees_the_plain_weight_and_round_trips():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(256, 320), route="qlinear")
    plain = layer.weight.clone()
    before = weight_bytes(layer)
    with torch.no_grad():
        y1 = layer(torch.randn(40, 256))
    assert layer._packed is not None and layer.weight.numel() == 0       # one copy: the packed one
    assert before <= weight_bytes(layer) <= before + 4 * 320
    sd = layer.state_dict()
    assert torch.equal(sd["weight"], plain) and torch.equal(layer.int8_weight(), plain)
    fresh = Int8Linear(256, 320, route="qlinear")
    fresh.load_state_dict(sd)
    x = torch.randn(40, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
        layer.route = "dequant"                                           # another route unpacks
        assert torch.isfinite(layer(x)).all() and layer._packed is None and torch.equal(layer.weight, plain)
    assert y1.shape == (40, 320)


def test_dequant_scratch_buffer_gives_each_layer_its_own_weight():
    torch.manual_seed(0)
    big, small = nn.Linear(64, 128), nn.Linear(128, 32)
    qbig, qsmall = (Int8Linear.from_linear(m, route="dequant") for m in (big, small))
    x = torch.randn(8, 64)
    with torch.no_grad():
        a = qsmall(qbig(x))           # both reuse one buffer, in turn
        b = small(big(x))
        again = qbig(x)
    assert rel_err(a, b) <= 0.01 and rel_err(again, big(x).detach()) <= 0.01
    int8.release_scratch()


def test_int8_weights_are_under_30_percent_of_fp32():
    stack = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    fp32_bytes = weight_bytes(stack)
    swapped = quantize_model_linears(stack)
    assert swapped == ["0", "1", "2", "3"]
    assert all(isinstance(m, Int8Linear) for m in stack)
    assert weight_bytes(stack) <= 0.30 * fp32_bytes


@pytest.mark.parametrize("ckpt_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_float_state_dict_loads_into_meta_int8_model(ckpt_dtype):
    torch.manual_seed(0)
    ref = TinyNet()
    sd = {k: v.to(ckpt_dtype) for k, v in ref.state_dict().items()}
    model = TinyNet(operations=Int8Ops, device="meta")
    result = model.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    for name in ("fc1", "fc2", "head"):
        layer = getattr(model, name)
        assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert sd["fc1.weight"].dtype == ckpt_dtype          # the caller's dict is left as it was
    assert model.conv.weight.dtype == ckpt_dtype         # non-Linear layers stay plain torch.nn
    img, label = _inputs()
    with torch.no_grad():
        ref_out = ref(img, label)
        out = model.float()(img, label)
    assert rel_err(out, ref_out) <= 0.02  # three int8 layers in a row, plus the checkpoint's own rounding


def test_int8_state_dict_round_trips_bit_for_bit():
    torch.manual_seed(0)
    model = TinyNet(operations=Int8Ops)
    model.load_state_dict(TinyNet().state_dict())        # float -> int8 into a materialised model
    sd = model.state_dict()
    assert sd["fc1.weight"].dtype == torch.int8 and "fc1.weight_scale" in sd and "fc2.bias" not in sd
    img, label = _inputs()
    with torch.no_grad():
        out = model(img, label)
        meta_built = TinyNet(operations=Int8Ops, device="meta")
        meta_built.load_state_dict(sd, strict=True, assign=True)
        materialised = TinyNet(operations=Int8Ops)
        materialised.load_state_dict(sd, strict=True)
        for other in (meta_built, materialised):
            assert torch.equal(other.fc1.weight, model.fc1.weight)
            assert torch.equal(other(img, label), out)


def test_int8_weight_without_scale_is_a_strict_error():
    sd = TinyNet(operations=Int8Ops).state_dict()
    del sd["head.weight_scale"]
    with pytest.raises(RuntimeError, match="head.weight_scale"):
        TinyNet(operations=Int8Ops, device="meta").load_state_dict(sd, strict=True, assign=True)


@pytest.mark.parametrize("m, k, n, expect", [
    (1, 64, 64, "dequant"),       # M <= 16: torch._int_mm on CUDA rejects it
    (3, 64, 64, "dequant"),
    (16, 64, 64, "dequant"),
    (17, 64, 64, "int8_mm"),
    (32, 37, 64, "dequant"),      # K not a multiple of 8
    (32, 64, 30, "dequant"),      # N not a multiple of 8
])
def test_int8_mm_falls_back_on_unfit_shapes(m, k, n, expect):
    torch.manual_seed(0)
    ref_layer = nn.Linear(k, n)
    layer = Int8Linear.from_linear(ref_layer, route="int8_mm")
    x = torch.randn(m, k)
    # where torch._int_mm is not exact (a saturating int8 kernel), forcing int8_mm falls back to dequant
    assert layer.route_for(x) == (expect if "int8_mm" in int8.available_routes("cpu") else "dequant")
    with torch.no_grad():
        assert rel_err(layer(x), ref_layer(x)) <= 0.01


@pytest.mark.parametrize("route", ROUTES)
def test_3d_input(route):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 96), route=route)
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        y = layer(x)
        flat = layer(x.reshape(40, 64))
    assert y.shape == (2, 20, 96)
    assert torch.equal(y.reshape(40, 96), flat)


def test_route_override_and_backend_text(monkeypatch):
    layer = Int8Linear(64, 64)
    x = torch.randn(32, 64)
    monkeypatch.setenv(int8.ROUTE_ENV, "int8_mm")
    if "int8_mm" in int8.available_routes("cpu"):
        assert layer.route_for(x) == "int8_mm"
        assert int8.int8_backend("cpu").startswith("int8_mm — forced by " + int8.ROUTE_ENV)
    else:                                    # torch._int_mm gives wrong sums on this CPU: refused by name
        assert layer.route_for(x) == "dequant"
        assert "wrong sums" in int8.int8_backend("cpu")
    assert Int8Linear(64, 64, route="dequant").route_for(x) == "dequant"   # the argument beats the env var
    assert int8_ops("dequant").Linear(64, 64).route_for(x) == "dequant"
    monkeypatch.setenv(int8.ROUTE_ENV, "auto")
    auto, reason = int8.select_route("cpu")
    assert auto == ("int8_mm" if int8.cpu_has_fast_int8() else "dequant") and reason
    fast, why = int8.fast_route("cpu")
    assert fast == ("qlinear" if not int8.cpu_has_fast_int8() and int8.qlinear_engine() else auto) and why
    # few rows (a decode step): qlinear on any CPU with an engine, as the ControlAR loader's int8_fast asks
    few, why = int8.fast_route("cpu", few_rows=True)
    assert few == ("qlinear" if int8.qlinear_engine() else None) and why
    monkeypatch.setenv(int8.ROUTE_ENV, "dequant")          # a forced route wins: the default (None) route
    assert int8.fast_route("cpu", few_rows=True) == (None, int8.select_route("cpu")[1])
    monkeypatch.setenv(int8.ROUTE_ENV, "int4")
    with pytest.raises(ValueError, match="int4"):
        layer(x)
    with pytest.raises(ValueError):
        Int8Linear(8, 8, route="fp8")


def test_casting_the_model_keeps_int8_weights_and_fp32_scales():
    model = TinyNet(operations=Int8Ops)
    model.load_state_dict(TinyNet().state_dict())
    scale = model.fc1.weight_scale.clone()
    model.to(torch.bfloat16)
    assert model.fc1.weight.dtype == torch.int8 and model.fc1.bias.dtype == torch.bfloat16
    assert model.fc1.weight_scale.dtype == torch.float32 and torch.equal(model.fc1.weight_scale, scale)
    img, label = _inputs(torch.bfloat16)
    with torch.no_grad():
        assert model(img, label).dtype == torch.bfloat16


def test_ops_namespace_and_partial_swap():
    assert Int8Ops.Linear is Int8Linear
    assert (Int8Ops.Conv2d, Int8Ops.Embedding, Int8Ops.LayerNorm, Int8Ops.GroupNorm) == \
           (nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
    model = TinyNet()
    swapped = quantize_model_linears(model, include=lambda name, layer: name != "head")
    assert swapped == ["fc1", "fc2"] and type(model.head) is nn.Linear
    assert "weight_scale" in dict(model.fc1.named_buffers())
