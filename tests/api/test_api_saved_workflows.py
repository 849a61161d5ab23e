"""Saved workflows keep loading after nodes/ was laid out by family (issue 26): a UI workflow names its nodes
by node_id and carries its widget values in schema order, so the move must leave both untouched.

Checked on the server's own /object_info: every shipped UI workflow converts back to its API twin, and a UI
workflow saved before the move (a copy of workflows/pixart_relactrl_canny.json from the commit before it,
tests/api/data/) still converts to the shipped graph and runs. That one touches most of the moved modules:
the PixArt loader (through RelaCtrl's bundled base), the shared T5 loader and PixArt's encode and null
caption, the ControlNet class (CONTROL_NET for core Apply ControlNet) and control preprocessing."""
from __future__ import annotations

import json

import pytest

from dit_control.tests.api.api_graphs import at_size
from dit_control.tests.comfy_host import REPO, execution_error
from dit_control.tests.generators.make_checkpoints import write_example_inputs
from dit_control.tests.generators.workflow_format import FRONTEND_ONLY, strip_meta, ui_to_api

SHIPPED = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))
SAVED_BEFORE_MOVE = REPO / "tests" / "api" / "data" / "pixart_relactrl_canny_saved_before_nodes_move.json"


def test_every_shipped_workflow_is_found():
    assert len(SHIPPED) >= 11, SHIPPED
    missing_ui = [name for name in SHIPPED if not (REPO / "workflows" / f"{name}.json").exists()]
    assert not missing_ui, f"API graphs without their UI workflow: {missing_ui}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_ui_workflow_loads_as_its_api_graph(object_info, name):
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    unknown = sorted({n["type"] for n in ui["nodes"]} - set(object_info) - FRONTEND_ONLY)
    assert not unknown, f"{name}: node types the server does not register: {unknown}"
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    assert ui_to_api(ui, object_info) == strip_meta(api)


def test_workflow_saved_before_the_move_loads_and_runs(comfy, object_info):
    saved = json.loads(SAVED_BEFORE_MOVE.read_text())
    graph = ui_to_api(saved, object_info)
    shipped = json.loads((REPO / "workflows" / "api" / "pixart_relactrl_canny.json").read_text())
    assert graph == strip_meta(shipped), "the saved workflow no longer converts to the shipped graph"
    write_example_inputs(comfy.base_dir / "input")     # the graph's input picture
    graph = at_size(graph, 256)     # the embedded micro model's size: the run checks loading, not quality
    graph["11"]["inputs"]["steps"] = 2
    history = comfy.run(graph)
    assert history["status"]["status_str"] == "success", execution_error(history)
    (image,) = comfy.images(history)
    assert image[:8] == b"\x89PNG\r\n\x1a\n", "SaveImage did not write a PNG"
