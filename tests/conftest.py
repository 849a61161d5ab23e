"""Shared test set-up: the pack imported as ComfyUI imports it, paths to ../shared, the tiny models, and the
real ComfyUI servers.

Imports: the repository is the package `dit_control` (`.ci/setup` links it into the venv); tests import
`dit_control.kernels...` and `dit_control.tests...`, never a top-level `kernels` — Hugging Face ships a
package of that name which transformers, diffusers and bitsandbytes import. The repository root is never
on sys.path: `python -m pytest` run from it puts it there, so it is taken off before any test imports.

Hosts: every test that talks to a server runs on the host DIT_CONTROL_COMFY_HOST names (default v0.33,
the release users run). Tests marked `both_hosts` — each shipped workflow through the API, the exactness
checks through the server, the bad-input checks — run again on the floor host, 0.3.75: the compatibility
pass. One server per host per session (pytest groups the tests by host).
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# `python -m pytest` prepends the working directory ('' or its path); from the repository root that would
# make our kernels/ shadow Hugging Face's `kernels` for every later import in this process
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

try:
    import dit_control
except ImportError as exc:
    raise ImportError("the package dit_control is not importable: run `bash .ci/setup`, which links this "
                      "checkout into .venv as dit_control") from exc
if Path(dit_control.__file__).resolve().parent != REPO:
    raise ImportError(f"dit_control is {Path(dit_control.__file__).resolve().parent}, not this checkout {REPO}: "
                      "run `bash .ci/setup` here")


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.is_dir(), f"../shared must sit beside the checkout: {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The tiny checkpoints (made once, cached in .comfy_host/models) plus deliberately broken files."""
    from dit_control.tests.generators.make_checkpoints import (
        make_all,
        write_bad_checkpoints,
        write_bad_controlnets,
        write_damaged_weights,
        write_easycontrol_bad_files,
    )
    made = make_all(REPO / ".comfy_host" / "models")
    root = tmp_path_factory.mktemp("models")
    for folder in made.iterdir():
        if folder.is_dir():
            (root / folder.name).mkdir()
            for entry in folder.iterdir():
                (root / folder.name / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    write_bad_checkpoints(root / "diffusion_models" / "broken", made)
    write_bad_controlnets(root / "controlnet" / "broken")
    write_damaged_weights(root, made)
    write_easycontrol_bad_files(root / "loras" / "broken", made)
    return root


def pytest_configure(config):
    config.addinivalue_line("markers", "both_hosts: also run on the floor host (0.3.75): the compatibility pass")


def server_hosts(both: bool) -> list:
    from dit_control.tests.comfy_host import FLOOR_HOST, host_name
    hosts = [host_name()]
    if both and FLOOR_HOST not in hosts:
        hosts.append(FLOOR_HOST)
    return hosts


def pytest_generate_tests(metafunc):
    if "comfy" in metafunc.fixturenames:
        hosts = server_hosts(metafunc.definition.get_closest_marker("both_hosts") is not None)
        metafunc.parametrize("comfy", hosts, indirect=True, scope="session", ids=[f"comfy{h}" for h in hosts])


@pytest.fixture(scope="session")
def comfy(request, models_dir, tmp_path_factory):
    """One real ComfyUI server with this pack (and the test-only probe pack) per host, shared by the API
    tests of a session."""
    from dit_control.tests.comfy_host import ComfyServer
    host = request.param
    base = tmp_path_factory.mktemp(f"comfy_base_{host}")
    with ComfyServer(models_dir, base_dir=base, host=host, probe=True) as server:
        yield server


@pytest.fixture(scope="session")
def object_info(comfy) -> dict:
    return comfy.get("/object_info")
