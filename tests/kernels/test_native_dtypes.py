"""The one CPU feature probe (kernels/native_dtypes.py) and the `compute_dtype` choice built on it: bf16 is chosen
from the running CPU's flags, refused by name on an AVX2-only CPU (forced here through DIT_CONTROL_CPU_FLAGS, the
test-only override), and what bf16 maths cost in accuracy on the golden-sized PixArt models."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dit_control.kernels import int8, native_dtypes
from dit_control.kernels.checkpoint_io import read_state_dict
from dit_control.kernels.native_dtypes import CPU_FLAGS_ENV, explicit_compute_dtype, native_bf16

AVX2_ONLY = "fpu sse4_2 avx avx2 fma f16c bmi2"           # e.g. the AMD EPYC without AVX-512 of tests/benchmarks
ZEN4 = AVX2_ONLY + " avx512f avx512bw avx512_vnni avx512_bf16"


def test_auto_keeps_the_loaders_own_choice():
    assert explicit_compute_dtype("auto", "cpu") == (None, "")
    with pytest.raises(ValueError, match=r"compute_dtype must be one of \['auto', 'bf16'\], got 'fp16'"):
        explicit_compute_dtype("fp16", "cpu")


def test_bf16_is_refused_by_name_on_an_avx2_only_cpu(monkeypatch):
    monkeypatch.setenv(CPU_FLAGS_ENV, AVX2_ONLY)
    native, why = native_bf16("cpu")
    assert not native and "lacks avx512_bf16 and amx_bf16" in why
    with pytest.raises(ValueError, match="needs native bf16 dot products .* lacks avx512_bf16 and amx_bf16.*"
                                         "compute_dtype 'auto'"):
        explicit_compute_dtype("bf16", "cpu")
    # the int8 routes read the same probe: no bf16 GEMM there, the dequant route upcasts to fp32
    assert native_dtypes.cpu_native_dtypes() == (torch.float32,) == int8.cpu_native_dtypes()
    assert int8.gemm_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32


def test_bf16_where_the_flags_have_it(monkeypatch):
    """With avx512_bf16 in the flags bf16 is native where ATen runs its AVX-512 kernels; an ATen lowered to AVX2
    (ATEN_CPU_CAPABILITY) is named as the reason otherwise."""
    monkeypatch.setenv(CPU_FLAGS_ENV, ZEN4)
    native, why = native_bf16("cpu")
    if native_dtypes.cpu_capability() == "AVX512":
        assert native and why == "CPU with avx512_bf16"
        assert explicit_compute_dtype("bf16", "cpu") == (torch.bfloat16, "compute bf16: CPU with avx512_bf16")
    else:
        assert not native and "ATen runs its" in why


def test_the_probe_reads_this_cpu_without_the_override(monkeypatch):
    monkeypatch.delenv(CPU_FLAGS_ENV, raising=False)
    flags = native_dtypes.cpu_flags()
    native, _ = native_bf16("cpu")
    assert native == (native_dtypes.cpu_capability() == "AVX512" and bool({"avx512_bf16", "amx_bf16"} & flags))


# relative L2 of bf16 maths (bf16 weights and activations) against fp32 on the golden PixArt models: measured 0.76%
# (1024-MS layout) and 0.72% (512) on an AVX-512/AMX Xeon; documented in kernels/pixart/README.md
PIXART_BF16_EPSILON = 0.015


@pytest.mark.parametrize("folder", ["pixart_ms", "pixart_512"])
def test_pixart_bf16_maths_error_on_the_golden_models(shared, folder):
    from dit_control.kernels.pixart.checkpoint import load_pixart
    cfg = json.loads((shared / "golden" / folder / "config.json").read_text())["config_original"]
    io = load_file(str(shared / "golden" / folder / "io.safetensors"))
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        sd = read_state_dict(str(shared / "golden" / folder / "weights_orig.safetensors"))
        model = load_pixart(sd, num_heads=cfg["num_heads"], sample_size=cfg["input_size"],
                            pe_interpolation=cfg["lewei_scale"], dtype=dtype).eval()
        micro = {k: io[k].to(dtype) for k in ("img_hw", "aspect_ratio") if k in io}
        with torch.no_grad():
            out = model(io["x"].to(dtype), io["t"], io["y"].to(dtype), io["mask"], **micro)
        assert out.dtype == dtype
        outs.append(out.float())
    rel = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    assert 0 < rel <= PIXART_BF16_EPSILON, rel
