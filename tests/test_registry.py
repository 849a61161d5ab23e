"""Registry-ready: comfy-cli's `comfy node validate` passes on the pack, and [tool.comfy] Icon shows the
icon the pack draws itself (tests/generators/make_icon.py -> workflows/icon.png).

comfy-cli lives in its own venv (.comfy_host/comfy-cli-venv, made by .ci/setup, pinned there). It runs
offline: `node validate` reads pyproject.toml with comfy-cli's registry parser and scans the code with
ruff (S102 exec, S307 eval, E702 two statements on a line); it sends nothing unless tracking was agreed
to. DO_NOT_TRACK=1 and --skip-prompt keep it from asking (on a terminal it asks for tracking consent
first), HOME points at a scratch folder so no comfy-cli config is written for the user, and
RUFF_NO_CACHE keeps ruff from leaving a .ruff_cache folder in the pack.

The tool itself exits 1 only for an unreadable pyproject.toml or an empty version; for a malformed
classifier, requires-comfyui or licence it prints a warning, drops the field from what it would publish
and exits 0, and it only warns on exec/eval. We hold the pack to the stricter bar: exit 0, the tool's
success line, and not one warning or error line.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import tomllib
from PIL import Image

from dit_control.tests.generators import make_icon

REPO = Path(__file__).resolve().parents[1]
CLI_VENV = REPO / ".comfy_host" / "comfy-cli-venv"
COMFY = CLI_VENV / "bin" / "comfy"
CLI_PY = CLI_VENV / "bin" / "python"
# what the published archive holds (.comfyignore keeps tests/, .ci/ and the hosts out)
PACK_ITEMS = ("__init__.py", "nodes", "kernels", "workflows", "pyproject.toml", "README.md", ".comfyignore")
SUCCESS = "All validation checks passed successfully"
ICON_BRANCH = "main"            # the branch raw.githubusercontent.com serves the icon from


def pinned(name: str) -> str:
    """The version of `name` that .ci/setup installs into comfy-cli's venv: its lock's."""
    m = re.search(rf"^{re.escape(name)}==(\S+)", (REPO / ".ci" / "lock" / "comfy-cli.txt").read_text(), re.M)
    assert m, f"{name} is not in .ci/lock/comfy-cli.txt"
    return m.group(1)


@pytest.fixture(scope="module")
def comfy_cli() -> Path:
    assert COMFY.exists(), f"{COMFY} is missing: run `bash .ci/setup` (it makes the comfy-cli venv)"
    return COMFY


def run_validate(folder: Path, home: Path) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), DO_NOT_TRACK="1", RUFF_NO_CACHE="true", NO_COLOR="1",
               COLUMNS="400", TERM="dumb")
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([str(COMFY), "--skip-prompt", "--no-json", "node", "validate"], cwd=folder,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env)


def problems(proc: subprocess.CompletedProcess) -> list[str]:
    """Everything that keeps a validate run from being clean: the exit code, a missing success line,
    every warning or error line (the registry would drop that field) and the security scan's findings."""
    out = proc.stdout + proc.stderr
    found = [] if proc.returncode == 0 else [f"exit code {proc.returncode}"]
    if SUCCESS not in out:
        found.append("no success line")
    found += [line.strip() for line in out.splitlines()
              if re.search(r"warning|error|Traceback", line, re.I)]
    return found


def report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def test_comfy_cli_is_the_pinned_version(comfy_cli, tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), DO_NOT_TRACK="1")
    out = subprocess.run([str(comfy_cli), "--skip-prompt", "--no-json", "--version"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == pinned("comfy-cli"), report(out)
    ruff = subprocess.run([str(CLI_PY), "-m", "ruff", "--version"], capture_output=True, text=True, timeout=60)
    assert ruff.stdout.split() == ["ruff", pinned("ruff")], ruff.stdout + ruff.stderr


def test_the_pack_passes_comfy_node_validate(comfy_cli, tmp_path):
    proc = run_validate(REPO, tmp_path / "home")
    assert not problems(proc), report(proc)
    assert not (REPO / ".ruff_cache").exists()


def scratch_pack(dest: Path) -> Path:
    dest.mkdir()
    for item in PACK_ITEMS:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / item)
    return dest


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


# (break applied to a scratch copy of the pack, whether comfy-cli itself must exit non-zero, a text
# the output must show)
BREAKS = {
    "unchanged": (None, False, None),
    "version-empty": (lambda d: _replace(d / "pyproject.toml", 'version = "0.1.0"', 'version = ""'),
                      True, "project version is empty"),
    "toml-syntax": (lambda d: _replace(d / "pyproject.toml", "[tool.comfy]\n", "[tool.comfy\n"),
                    True, "Could not parse"),
    "requires-comfyui": (lambda d: _replace(d / "pyproject.toml", 'requires-comfyui = ">=0.3.75"',
                                            'requires-comfyui = ">=0.3"'),
                         False, "Invalid requires-comfyui format"),
    "accelerator-classifier": (lambda d: _replace(d / "pyproject.toml", '"Environment :: GPU :: NVIDIA CUDA"',
                                                  '"Environment :: GPU :: CUDA"'),
                               False, "Invalid Environment classifier"),
    "exec-in-code": (lambda d: (d / "nodes" / "scratch_exec.py").write_text("def run(code):\n    exec(code)\n"),
                     False, "S102"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_validate_fails_a_broken_scratch_copy(comfy_cli, tmp_path, name):
    breaker, tool_fails, shows = BREAKS[name]
    pack = scratch_pack(tmp_path / "dit-control")
    if breaker is not None:
        breaker(pack)
    proc = run_validate(pack, tmp_path / "home")
    found = problems(proc)
    if breaker is None:
        assert not found, report(proc)       # the copy itself is clean: what fails below is the break
        return
    assert found, f"{name}: validate found nothing\n{report(proc)}"
    assert (proc.returncode != 0) == tool_fails, report(proc)
    assert shows in proc.stdout + proc.stderr, report(proc)


def test_icon_is_what_the_script_draws():
    assert make_icon.ICON_PATH.is_file(), \
        f"run `.venv/bin/python tests/generators/make_icon.py` to draw {make_icon.ICON_REL}"
    with Image.open(make_icon.ICON_PATH) as im:
        assert im.format == "PNG" and im.mode == "RGBA", (im.format, im.mode)
        # the registry: square, at most 400 x 400 px
        assert im.size == (make_icon.SIZE, make_icon.SIZE) and make_icon.SIZE <= 400, im.size
        committed = np.asarray(im).copy()
    drawn = make_icon.draw()
    diff = np.argwhere(np.any(committed != drawn, axis=-1))
    assert diff.size == 0, (f"{len(diff)} pixels differ from tests/generators/make_icon.py's drawing (first at "
                            f"y, x = {tuple(int(v) for v in diff[0])}): re-run "
                            f"`.venv/bin/python tests/generators/make_icon.py`")
    # deterministic bytes, and no stray chunk (time stamp, text) in what the script writes
    a, b = make_icon.png_bytes(drawn), make_icon.png_bytes(make_icon.draw())
    assert a == b
    chunks, pos = [], 8
    while pos < len(a):
        n = int.from_bytes(a[pos:pos + 4], "big")
        chunks.append(a[pos + 4:pos + 8].decode())
        pos += 12 + n
    assert set(chunks) == {"IHDR", "IDAT", "IEND"}, chunks
    # transparent outside the rounded tile, opaque inside
    assert drawn[0, 0, 3] == 0 and drawn[-1, -1, 3] == 0 and drawn[200, 200, 3] == 255


def test_icon_field_points_at_the_committed_icon(comfy_cli, tmp_path):
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    icon = meta["tool"]["comfy"]["Icon"]
    url = urlparse(icon)
    assert (url.scheme, url.netloc) == ("https", "raw.githubusercontent.com"), icon
    owner, repo, branch, *rel = url.path.lstrip("/").split("/")
    repository = urlparse(meta["project"]["urls"]["Repository"])
    assert (repository.netloc, repository.path.strip("/")) == ("github.com", f"{owner}/{repo}"), (icon, repository)
    assert branch == ICON_BRANCH and "/".join(rel) == make_icon.ICON_REL, icon
    assert (REPO / make_icon.ICON_REL).is_file()
    # what comfy-cli would send the registry, and that the icon ships in the archive (.comfyignore)
    probe = ("from comfy_cli.registry.config_parser import extract_node_configuration as e\n"
             "from comfy_cli.file_utils import _load_comfyignore_spec as s\n"
             "import sys\n"
             "print(e('pyproject.toml').tool_comfy.icon)\n"
             "spec = s()\n"
             "print(*[spec.match_file(p) for p in sys.argv[1:]])\n")
    out = subprocess.run([str(CLI_PY), "-c", probe, make_icon.ICON_REL, "tests/generators/make_icon.py"], cwd=REPO,
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, HOME=str(tmp_path), DO_NOT_TRACK="1"))
    assert out.returncode == 0, out.stderr
    sent, ignored = out.stdout.splitlines()
    assert sent == icon
    assert ignored.split() == ["False", "True"], "the icon must ship; tests/ must not"
