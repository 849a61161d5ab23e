"""Shared test set-up: the repo root on sys.path (kernels/ is importable on its own), paths to ../shared."""
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
    from tests.make_checkpoints import make_all, write_bad_checkpoints, write_bad_controlnets
    made = make_all(REPO / ".comfy_host" / "models")
    root = tmp_path_factory.mktemp("models")
    for folder in made.iterdir():
        if folder.is_dir():
            (root / folder.name).mkdir()
            for entry in folder.iterdir():
                (root / folder.name / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    write_bad_checkpoints(root / "diffusion_models" / "broken", made)
    write_bad_controlnets(root / "controlnet" / "broken")
    return root


@pytest.fixture(scope="session")
def comfy(models_dir, tmp_path_factory):
    """One real ComfyUI server with this pack, shared by the API tests of a session."""
    from tests.comfy_host import ComfyServer
    base = tmp_path_factory.mktemp("comfy_base")
    with ComfyServer(models_dir, base_dir=base) as server:
        yield server


@pytest.fixture(scope="session")
def object_info(comfy) -> dict:
    return comfy.get("/object_info")
