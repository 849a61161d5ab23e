"""What the golden tests of every family share (../shared/golden, tolerances in specs/golden.md): the error
measure, the golden's tensors and config, and one intra-op thread for their tiny layers."""
import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def relative_error(ours: torch.Tensor, golden: torch.Tensor) -> float:
    """max |ours − golden| / max |golden| (specs/golden.md's measure)."""
    golden = golden.float()
    return ((ours.float() - golden).abs().max() / golden.abs().max()).item()


def golden_io(folder: Path) -> dict:
    return load_file(str(Path(folder) / "io.safetensors"))


def golden_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


@contextlib.contextmanager
def one_intra_op_thread():
    """Tiny (64–128 wide) layers: a second intra-op thread costs more than it computes on a busy 2-core
    machine (seen 50x slower); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def golden_fixtures(family: str):
    """The module fixtures every family's golden tests start from, for `../shared/golden/<family>`:
    `one_thread` (autouse), `golden` (the folder), `io` (inputs and outputs), `config`. Use as
    `one_thread, golden, io, config = golden_fixtures("dit4sr")` at module level."""
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def one_thread():
        with one_intra_op_thread():
            yield

    @pytest.fixture(scope="module")
    def golden(shared):
        return shared / "golden" / family

    @pytest.fixture(scope="module")
    def io(golden):
        return golden_io(golden)

    @pytest.fixture(scope="module")
    def config(golden):
        return golden_config(golden)

    return one_thread, golden, io, config
