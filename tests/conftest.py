"""Shared test set-up: the repo root on sys.path (kernels/ is importable on its own), paths to ../shared,
the tiny models, and the real ComfyUI servers.

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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.is_dir(), f"../shared must sit beside the checkout: {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The tiny checkpoints (made once, cached in .comfy_host/models) plus deliberately broken files."""
    from tests.make_checkpoints import (make_all, write_bad_checkpoints, write_bad_controlnets, write_damaged_weights,
                                        write_easycontrol_bad_files)
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
    from tests.comfy_host import FLOOR_HOST, host_name
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
    from tests.comfy_host import ComfyServer
    host = request.param
    base = tmp_path_factory.mktemp(f"comfy_base_{host}")
    with ComfyServer(models_dir, base_dir=base, host=host, probe=True) as server:
        yield server


@pytest.fixture(scope="session")
def object_info(comfy) -> dict:
    return comfy.get("/object_info")
