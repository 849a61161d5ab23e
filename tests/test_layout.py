"""Dependencies in kernels/ point one way (README, "How it is built"): the shared modules at the top of
kernels/ import no model family, no family subpackage imports another family, and nothing in kernels/
imports ComfyUI. Checked over the import statements themselves (ast), so a lazy import inside a function
counts too."""
import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes",
                "latent_preview", "server", "execution"}


def families(kernels: Path = KERNELS) -> set:
    return {p.name for p in kernels.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def imported_kernel_parts(source: str, package: tuple) -> list:
    """For each import in `source` (a module of package `package`, e.g. ("kernels", "pixart")): the
    imported module path as a tuple of names, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [tuple(a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = base + (tuple(node.module.split(".")) if node.module else ())
                # `from . import x` / `from .. import pixart` name modules in the `names` part
                found += [mod + (a.name,) for a in node.names] if not node.module else [mod]
            else:
                found.append(tuple(node.module.split(".")))
    return found


def violations(path_parts: tuple, source: str, known_families: set) -> list:
    """What a module at kernels/<path_parts> imports that breaks the direction rules."""
    package = ("kernels",) + path_parts[:-1]
    own_family = path_parts[0] if len(path_parts) > 1 else None
    bad = []
    for mod in imported_kernel_parts(source, package):
        if mod[0] in HOST_MODULES:
            bad.append(f"imports ComfyUI ({'.'.join(mod)})")
        elif mod[0] == "kernels" and len(mod) > 1 and mod[1] in known_families and mod[1] != own_family:
            where = "a shared module" if own_family is None else f"family {own_family}"
            bad.append(f"{where} imports family {mod[1]} ({'.'.join(mod)})")
    return bad


def test_kernels_import_in_one_direction():
    known = families()
    assert "pixart" in known
    problems = []
    for path in sorted(KERNELS.rglob("*.py")):
        parts = path.relative_to(KERNELS).parts
        problems += [f"kernels/{'/'.join(parts)}: {v}" for v in violations(parts, path.read_text(), known)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("parts,source,expected", [
    (("int8.py",), "from .pixart.model import PixArt", "a shared module imports family pixart"),
    (("int8.py",), "from . import pixart", "a shared module imports family pixart"),
    (("t5.py",), "def f():\n    import kernels.controlar.gpt\n", "a shared module imports family controlar"),
    (("controlar", "gpt.py"), "from ..pixart.model import PixArt", "family controlar imports family pixart"),
    (("pixart", "lcm.py"), "import comfy.samplers", "imports ComfyUI"),
])
def test_the_check_catches_each_kind_of_violation(parts, source, expected):
    found = violations(parts, source, {"pixart", "controlar"})
    assert any(expected in v for v in found), found


@pytest.mark.parametrize("parts,source", [
    (("pixart", "controlnet.py"), "from ..checkpoint_io import check_strict\nfrom .model import PixArt"),
    (("controlar", "gpt.py"), "from .. import t5\nfrom ..t5 import T5Encoder"),
])
def test_allowed_imports_pass(parts, source):
    assert violations(parts, source, {"pixart", "controlar"}) == []
