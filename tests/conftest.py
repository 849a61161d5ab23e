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
