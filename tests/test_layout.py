"""Dependencies in kernels/ and nodes/ point one way (README, "How it is built"): the shared modules at the top
of kernels/ import no model family, no family subpackage imports another family, and nothing in kernels/
imports ComfyUI. nodes/ is laid out the same way and follows the same rules, across both trees: a shared
node module imports no family (of nodes/ or of kernels/), and a node family imports only its own kernel
family. Checked over the import statements themselves (ast), so a lazy import inside a function counts too.

Names say which family: no two classes in kernels/ and nodes/ share a name (a `RMSNorm` in three families with three
contracts and three weight names read as one thing). Family-specific names, or one shared module where the contract
is the same."""
import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
NODES = KERNELS.parent / "nodes"
# a node family's subpackage -> the kernel family it wraps, where the names differ
NODE_FAMILY_KERNELS = {"easycontrol": "flux_easycontrol"}
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes",
                "latent_preview", "server", "execution"}


def families(tree: Path = KERNELS) -> set:
    return {p.name for p in tree.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


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


def node_violations(path_parts: tuple, source: str, node_families: set, kernel_families: set) -> list:
    """What a module at nodes/<path_parts> imports that breaks the direction rules: a shared node module
    imports no family of nodes/ or kernels/; a node family imports no other node family and no kernel
    family but its own."""
    package = ("nodes",) + path_parts[:-1]
    own_family = path_parts[0] if len(path_parts) > 1 else None
    own_kernels = NODE_FAMILY_KERNELS.get(own_family, own_family)
    where = "a shared node module" if own_family is None else f"node family {own_family}"
    bad = []
    for mod in imported_kernel_parts(source, package):
        if len(mod) < 2:
            continue
        if mod[0] == "nodes" and mod[1] in node_families and mod[1] != own_family:
            bad.append(f"{where} imports node family {mod[1]} ({'.'.join(mod)})")
        elif mod[0] == "kernels" and mod[1] in kernel_families and mod[1] != own_kernels:
            bad.append(f"{where} imports kernel family {mod[1]} ({'.'.join(mod)})")
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


def test_nodes_mirror_kernels_and_import_in_one_direction():
    node_families, kernel_families = families(NODES), families()
    assert {"pixart", "easycontrol", "dit4sr", "controlar"} <= node_families, node_families
    unmatched = {NODE_FAMILY_KERNELS.get(f, f) for f in node_families} - kernel_families
    assert not unmatched, f"node families without a kernel family of the same name: {sorted(unmatched)}"
    problems = []
    for path in sorted(NODES.rglob("*.py")):
        parts = path.relative_to(NODES).parts
        if parts == ("__init__.py",):
            continue   # the registry: it gathers every family's NODES, which is its one job
        problems += [f"nodes/{'/'.join(parts)}: {v}"
                     for v in node_violations(parts, path.read_text(), node_families, kernel_families)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("parts,source,expected", [
    (("t5_encoder.py",), "from .pixart.model import CAPTION_MASK_KEY",
     "a shared node module imports node family pixart"),
    (("vae_decode.py",), "from ..kernels.pixart.model import PixArt",
     "a shared node module imports kernel family pixart"),
    (("controlar", "nodes.py"), "from ..pixart.text_encode import X",
     "node family controlar imports node family pixart"),
    (("controlar", "nodes.py"), "from ...kernels.pixart import model",
     "node family controlar imports kernel family pixart"),
    (("easycontrol", "nodes.py"), "from ...kernels.dit4sr.model import DiT4SR",
     "node family easycontrol imports kernel family dit4sr"),
])
def test_the_nodes_check_catches_each_kind_of_violation(parts, source, expected):
    found = node_violations(parts, source, {"pixart", "controlar", "easycontrol"},
                            {"pixart", "controlar", "flux_easycontrol", "dit4sr"})
    assert any(expected in v for v in found), found


@pytest.mark.parametrize("parts,source", [
    (("easycontrol", "model.py"), "from ...kernels.flux_easycontrol import blocks\nfrom ..finite_guard import x"),
    (("controlar", "nodes.py"), "from ..t5_encoder import PixArtT5Type\nfrom ...kernels.int8 import int8_ops"),
    (("weight_dtype.py",), "from ..kernels.int8 import int8_ops"),
])
def test_allowed_node_imports_pass(parts, source):
    assert node_violations(parts, source, {"pixart", "controlar", "easycontrol"},
                           {"pixart", "controlar", "flux_easycontrol", "dit4sr"}) == []


def duplicate_class_names(sources: dict) -> dict:
    """{class name: [files]} for each name that more than one class in `sources` ({file: source}) is given;
    nested classes count too."""
    defined: dict = {}
    for file, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                defined.setdefault(node.name, []).append(file)
    return {name: files for name, files in defined.items() if len(files) > 1}


def test_no_two_classes_share_a_name():
    root = KERNELS.parent
    sources = {path.relative_to(root).as_posix(): path.read_text()
               for tree in (KERNELS, NODES) for path in sorted(tree.rglob("*.py"))}
    duplicates = duplicate_class_names(sources)
    assert not duplicates, "classes that share a name (give each a name that says its family):\n" + "\n".join(
        f"  {name}: {', '.join(files)}" for name, files in sorted(duplicates.items()))


def test_the_name_check_catches_a_shared_name():
    sources = {"kernels/a/model.py": "class RMSNorm:\n    pass\nclass AModel:\n    pass\n",
               "kernels/b/model.py": "class Outer:\n    class RMSNorm:\n        pass\n"}
    assert duplicate_class_names(sources) == {"RMSNorm": ["kernels/a/model.py", "kernels/b/model.py"]}
