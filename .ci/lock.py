"""The locked test environment: every package .ci/setup installs from PyPI, at exact versions with hashes.

    .venv/bin/python .ci/lock.py refresh   re-resolve every lock from its inputs (today's newest that fit)
    .venv/bin/python .ci/lock.py check     warn where a host's requirements.txt and the lock disagree

Locks (committed; .ci/setup installs them with `pip install --require-hashes`, so a new release elsewhere
cannot change what CI runs):
- lock/venv.txt          .venv: torch, ComfyUI v0.33's requirements, the pack's dependencies (pyproject.toml)
                         and the test-only packages (lock/venv.in)
- lock/v0.3.75-site.txt  the overlay of the floor host (.comfy_host/v0.3.75/site): the packages 0.3.75 pins
                         to other versions than v0.33 (its frontend, templates, docs), with what they need
- lock/comfy-cli.txt     comfy-cli's own venv (lock/comfy-cli.in)

Each lock is pip's own resolution (`pip install --dry-run --ignore-installed --report`) for this machine's
Python and platform (CPython 3.11, Linux x86_64: the machines CI and the developers run), recording the
sha256 of the very file pip chose. Users who install the pack into their own ComfyUI are not bound by
any of this: they get pyproject.toml's loose ranges.
"""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

try:
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
except ImportError:                                       # a bare interpreter: pip's vendored copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / ".ci" / "lock"
HOSTS = ROOT / ".comfy_host"
V033_REQS = HOSTS / "v0.33.0" / "comfyui" / "requirements.txt"
V0375_REQS = HOSTS / "v0.3.75" / "comfyui" / "requirements.txt"
HOST_TORCH = ("torch", "torchvision", "torchaudio")     # a host lists them unpinned; venv.in pins them


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments, blanks and pip options dropped)."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line)
    return lines


def pyproject_dependencies() -> list[str]:
    """The pack's dependencies with every optional extra: CI tests each route, bitsandbytes' included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [line for group in project.get("optional-dependencies", {}).values() for line in group]
    return project["dependencies"] + extras


def v0375_pinned() -> list[str]:
    """0.3.75's `==` pins: the packages its overlay folder holds (its other lines are v0.33's too)."""
    return [line for line in requirement_lines(V0375_REQS) if "==" in line]


def venv_inputs() -> list[str]:
    host = [line for line in requirement_lines(V033_REQS) if name_of(line) not in HOST_TORCH]
    return host + pyproject_dependencies() + requirement_lines(LOCK_DIR / "venv.in")


def name_of(line: str) -> str:
    return canonicalize_name(Requirement(line).name)


# -- refresh ----------------------------------------------------------------------------------------------
def resolve(requirements: list[str], constraints: list[str] = ()) -> list[tuple[str, str, str]]:
    """pip's resolution of `requirements` from scratch: (name, version, sha256) of every package it would
    install, sorted by name."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs, cons, report = Path(tmp, "in.txt"), Path(tmp, "constraints.txt"), Path(tmp, "report.json")
        reqs.write_text("\n".join(requirements) + "\n")
        cons.write_text("\n".join(constraints) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "-q", "--dry-run",
                        "--ignore-installed", "--report", str(report), "-r", str(reqs), "-c", str(cons)],
                       check=True)
        installs = json.loads(report.read_text())["install"]
    pins = []
    for item in installs:
        meta, info = item["metadata"], item["download_info"]
        digest = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        if digest is None:
            raise SystemExit(f"lock: pip resolved {meta['name']} from {info['url']} without a sha256; "
                             "a lock needs a released file")
        pins.append((canonicalize_name(meta["name"]), meta["version"], digest))
    return sorted(pins)


def write_lock(path: Path, pins: list, inputs: str) -> None:
    head = [f"# {path.name}: generated by `.venv/bin/python .ci/lock.py refresh`; do not edit by hand.",
            f"# Inputs: {inputs}.",
            f"# Resolved {datetime.date.today().isoformat()} for CPython {platform.python_version()} on "
            f"{platform.system()} {platform.machine()}; .ci/setup installs it with --require-hashes."]
    body = [f"{name}=={version} \\\n    --hash=sha256:{digest}" for name, version, digest in pins]
    path.write_text("\n".join(head + body) + "\n")
    print(f"[lock] {path.relative_to(ROOT)}: {len(pins)} packages")


def refresh() -> None:
    for reqs in (V033_REQS, V0375_REQS):
        if not reqs.is_file():
            raise SystemExit(f"lock: {reqs} is missing: run `bash .ci/setup` once first (it unpacks the hosts)")
    venv = resolve(venv_inputs())
    write_lock(LOCK_DIR / "venv.txt", venv,
               "ComfyUI v0.33's requirements.txt (its torch lines aside), pyproject.toml's dependencies, "
               "lock/venv.in")
    # the overlay resolves against the venv's torch, as the server that puts it in front of .venv sees it
    torch_pins = [f"{n}=={v}" for n, v, _ in venv if n in HOST_TORCH]
    write_lock(LOCK_DIR / "v0.3.75-site.txt", resolve(v0375_pinned(), torch_pins),
               "ComfyUI 0.3.75's == pins (its frontend, templates and docs)")
    write_lock(LOCK_DIR / "comfy-cli.txt", resolve(requirement_lines(LOCK_DIR / "comfy-cli.in")),
               "lock/comfy-cli.in")
    check()


# -- check ------------------------------------------------------------------------------------------------
def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(" ")[0].split("==")
            pins[canonicalize_name(name)] = version
    return pins


def disagreements(wanted: list[str], pins: dict[str, str], where: str) -> list[str]:
    """Each requirement of `wanted` (for this platform) that the lock `pins` leaves out or pins outside it."""
    env = default_environment()
    found = []
    for line in wanted:
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            found.append(f"{where}: cannot read {line!r} ({exc})")
            continue
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            found.append(f"{where} asks for {line!r}; the lock has no {name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            found.append(f"{where} asks for {line!r}; the lock has {name}=={pins[name]}")
    return found


def check() -> int:
    venv = read_lock(LOCK_DIR / "venv.txt")
    site = read_lock(LOCK_DIR / "v0.3.75-site.txt")
    problems = disagreements(requirement_lines(V033_REQS), venv, "ComfyUI v0.33 requirements.txt")
    problems += disagreements(pyproject_dependencies() + requirement_lines(LOCK_DIR / "venv.in"), venv,
                              "pyproject.toml / lock/venv.in")
    if V0375_REQS.is_file():
        # the floor's pins live in its overlay; its other lines are served by .venv
        problems += disagreements(v0375_pinned(), site, "ComfyUI 0.3.75 requirements.txt (pinned)")
        problems += disagreements([line for line in requirement_lines(V0375_REQS) if "==" not in line], venv,
                                  "ComfyUI 0.3.75 requirements.txt")
    problems += disagreements(requirement_lines(LOCK_DIR / "comfy-cli.in"), read_lock(LOCK_DIR / "comfy-cli.txt"),
                              "lock/comfy-cli.in")
    for problem in problems:
        print(f"[setup] WARNING: the lock disagrees: {problem} (refresh it: .venv/bin/python .ci/lock.py "
              "refresh, tests/README.md, 'Set-up and the lock')", file=sys.stderr)
    return len(problems)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "refresh":
        refresh()
    elif command == "check":
        check()                      # warnings only: set-up goes on
    else:
        raise SystemExit(__doc__)
