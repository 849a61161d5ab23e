"""The pack's node schemas, read without a server: `/object_info`'s entry of every node the pack registers.

A fresh interpreter imports the pack the way ComfyUI does (the host's tree on its path, `--cpu`) and asks each
node class for `GET_NODE_INFO_V1()`, the dict core's `/object_info` serves. Its models folders are empty except
for one marker file per folder, `__models_<folder>__.safetensors`, so a file dropdown lists exactly the marker
of the folder it reads: the schema itself says which models folder each loader input takes (tests/
make_node_docs.py writes it into the help pages; tests/test_node_docs.py checks the shipped model links
against it). A subprocess, so that ComfyUI's modules and global folder registry never enter the test process.
"""
from __future__ import annotations

import json
import subprocess
import sys

from dit_control.tests.comfy_host import DEFAULT_HOST, PYTHON, comfy_dir

MARKER = "__models_{}__.safetensors"

_SCRIPT = r"""
import json, os, shutil, sys, tempfile
sys.path.append(sys.argv[1])                 # ComfyUI at the end of the path: it never shadows a package
from comfy.cli_args import args
args.cpu = True                              # before model_management is imported: no CUDA probing
args.base_directory = tempfile.mkdtemp(prefix="node_schemas_")
import folder_paths
from dit_control.nodes import ALL_NODES     # registers the pack's own folders (annotators, controlar)
marker = sys.argv[2]
for folder, (paths, extensions) in folder_paths.folder_names_and_paths.items():
    if ".safetensors" in extensions and paths:
        os.makedirs(paths[0], exist_ok=True)
        open(os.path.join(paths[0], marker.format(folder)), "wb").close()
infos = {}
for cls in ALL_NODES:
    info = cls.GET_NODE_INFO_V1()
    infos[info["name"]] = info
print("NODE_SCHEMAS " + json.dumps(infos))
shutil.rmtree(args.base_directory, ignore_errors=True)
"""


def node_schemas(host: str = DEFAULT_HOST, timeout: float = 300) -> dict:
    """{node id: its /object_info entry}, in ALL_NODES order, file dropdowns listing only their folder's marker."""
    run = subprocess.run([str(PYTHON), "-c", _SCRIPT, str(comfy_dir(host)), MARKER], capture_output=True,
                         text=True, timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("NODE_SCHEMAS ")]
    if run.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"reading the node schemas failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(lines[0][len("NODE_SCHEMAS "):])


def file_folder(options: list) -> str | None:
    """The models folder a file dropdown reads (from its marker option), or None for any other combo."""
    for option in options:
        if isinstance(option, str) and option.startswith("__models_") and option.endswith("__.safetensors"):
            return option[len("__models_"):-len("__.safetensors")]
    return None


if __name__ == "__main__":
    json.dump(node_schemas(), sys.stdout, indent=1)
