"""Loading a checked state dict into a built model (kernels/checkpoint_io.load_consuming, what every loader of
ours that hands core a MODEL uses through nodes/comfy_compat.build_patcher): one layer's converted copy at a time.

A loader that casts the whole dict before loading holds the file's tensors, the model's and a converted copy of
every tensor at once: DiT4SR's 6.6 GB fp16 file stored as fp32 on a CPU (core's default there) came to ~30 GB and
was killed on a 24 GiB machine. Peaks are the process's VmHWM (reset through /proc/self/clear_refs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dit_control.kernels.checkpoint_io import CheckpointError, load_consuming, naming_file, release_free_heap

MIB = 1 << 20


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_above_now(fn) -> float:
    """MiB the process's peak RSS rose above its RSS when `fn` started."""
    release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                       # reset VmHWM to the current RSS
    start = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - start) / 1024


def model_and_file(layers=24, width=2048):
    """A model of `layers` fp32 linears (16 MiB each at width 2048) and its fp16 file (8 MiB a layer)."""
    model = nn.Sequential(*[nn.Linear(width, width, bias=True) for _ in range(layers)])
    sd = {k: torch.randn_like(v, dtype=torch.float16) for k, v in model.state_dict().items()}
    return model, sd


def test_layer_by_layer_holds_one_converted_layer_and_loads_every_tensor():
    model, sd = model_and_file()
    expected = {k: v.float() for k, v in list(sd.items())[:2]}
    layer_mib = 2048 * 2048 * 4 / MIB
    ours = peak_above_now(lambda: load_consuming(model, sd, torch.float32))
    assert sd == {}, "the caller's dict is consumed"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())

    # the peer, in the same process: cast the whole dict, then load (what build_patcher did)
    model2, sd2 = model_and_file()
    def cast_all_then_load():
        cast = {k: v.float() for k, v in sd2.items()}
        sd2.clear()
        model2.load_state_dict(cast)
    whole = peak_above_now(cast_all_then_load)
    print(f"peak above start: layer by layer {ours:.0f} MiB, whole dict cast first {whole:.0f} MiB "
          f"(one layer {layer_mib:.0f} MiB, the model {24 * layer_mib:.0f} MiB)")
    assert ours < 3 * layer_mib, ours
    assert whole > 12 * layer_mib, whole         # the peer does hold the converted copy: the measure can fail


def test_missing_and_unexpected_keys_are_reported_and_a_layer_may_make_its_own_tensors():
    from dit_control.kernels.int8 import Int8Linear
    model = nn.Sequential(nn.Linear(8, 8), Int8Linear(8, 4))
    sd = {"0.weight": torch.randn(8, 8), "1.weight": torch.randn(4, 8), "1.bias": torch.randn(4),
          "2.weight": torch.randn(1)}
    missing, unexpected = load_consuming(model, sd, torch.float32)
    assert missing == ["0.bias"] and unexpected == ["2.weight"]          # Int8Linear made its weight_scale
    assert model[1].weight.dtype == torch.int8 and model[1].weight_scale.dtype == torch.float32


def test_naming_file_puts_the_file_name_in_front_once():
    with pytest.raises(CheckpointError, match=r"^model\.pth: 3 tensors missing$"):
        with naming_file("model.pth"):
            raise CheckpointError("3 tensors missing")
    with pytest.raises(CheckpointError, match=r"^model\.pth is empty \(0 bytes\)$"):   # already named: unchanged
        with naming_file("model.pth"):
            raise CheckpointError("model.pth is empty (0 bytes)")
    with pytest.raises(KeyError):                                                     # other errors pass through
        with naming_file("model.pth"):
            raise KeyError("x")
