"""The shared reader's NaN/Inf check (kernels/checkpoint_io.py): exact counts in every float dtype, no
false alarm where a low-precision sum overflows, and every reader refuses damaged files by tensor name."""
import pytest
import safetensors.torch
import torch

from dit_control.kernels.checkpoint_io import (
    DamagedWeightsError,
    SafetensorsStream,
    check_finite,
    nonfinite_counts,
    read_state_dict,
)

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FLOATS)
def test_counts_are_exact(dtype):
    t = torch.randn(1000).to(dtype)
    assert nonfinite_counts(t) == (0, 0)
    t[3] = float("nan")
    t[10] = float("inf")
    t[11] = float("-inf")
    assert nonfinite_counts(t) == (1, 2)


def test_fp8_e4m3fn_nan_is_found():
    t = torch.randn(100).to(torch.float8_e4m3fn)    # this format has NaN but no Inf
    assert nonfinite_counts(t) == (0, 0)
    t.view(torch.uint8)[5] = 0x7F
    assert nonfinite_counts(t) == (1, 0)


def test_an_overflowing_fp16_sum_is_no_false_alarm():
    t = torch.full((100_000,), 60000.0, dtype=torch.float16)   # finite values whose fp16 sum is inf
    assert not torch.isfinite(t.sum())
    assert nonfinite_counts(t) == (0, 0)
    check_finite({"big": t}, "big.safetensors")


def test_integer_tensors_are_not_checked():
    assert nonfinite_counts(torch.arange(10)) == (0, 0)


def test_message_names_every_damaged_tensor():
    sd = {"a.weight": torch.ones(4), "b.weight": torch.tensor([float("nan"), 1.0]),
          "c.bias": torch.tensor([float("inf")])}
    with pytest.raises(DamagedWeightsError) as e:
        check_finite(sd, "model.safetensors")
    text = str(e.value)
    assert "model.safetensors is damaged: 2 tensor(s)" in text
    assert "b.weight (2,) float32: 1 NaN, 0 Inf of 2 values" in text
    assert "c.bias (1,) float32: 0 NaN, 1 Inf of 1 values" in text
    assert "a.weight" not in text


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_read_state_dict_refuses_a_damaged_file(tmp_path, suffix):
    sd = {"x.weight": torch.randn(8, 8), "y.weight": torch.randn(8)}
    sd["y.weight"][2] = float("nan")
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    with pytest.raises(DamagedWeightsError, match=r"y\.weight \(8,\) float32: 1 NaN"):
        read_state_dict(str(path))


def test_streamed_read_refuses_the_damaged_tensor(tmp_path):
    path = tmp_path / "t5.safetensors"
    sd = {"ok.weight": torch.randn(4, 4).half(), "bad.weight": torch.randn(4, 4).half()}
    sd["bad.weight"][1, 1] = float("inf")
    safetensors.torch.save_file(sd, str(path))
    stream = SafetensorsStream([str(path)])
    assert stream.read("ok.weight").shape == (4, 4)
    with pytest.raises(DamagedWeightsError, match=r"bad\.weight \(4, 4\) float16: 0 NaN, 1 Inf"):
        stream.read("bad.weight")
