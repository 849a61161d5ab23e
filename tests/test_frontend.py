"""The shipped UI workflows in ComfyUI's real web frontend (headless chromium, tests/frontend_page.py).

One page on the session's server: every workflows/<name>.json is loaded through the page's own
app.loadGraphData, and must load without a page error, console error or missing-node/model/media
warning, show each of its nodes with its widget values, render without overlapping nodes, and give back
through app.graphToPrompt() exactly workflows/api/<name>.json (node ids, classes, inputs). A screenshot
of each goes to output/frontend/<name>.png. One workflow is then queued from the page and must finish.
"""
import copy
import json

import pytest

from dit_control.tests.comfy_host import DEFAULT_HOST, REPO, execution_error
from dit_control.tests.frontend_page import FrontendPage
from dit_control.tests.make_checkpoints import write_example_inputs
from dit_control.tests.workflow_format import _inputs, strip_meta

WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
SCREENSHOTS = REPO / "output" / "frontend"
QUEUED = "pixart_alpha_t2i"      # the cheapest shipped graph on the tiny models (512 px), queued as shipped


def ui_file(name: str) -> dict:
    return json.loads((REPO / "workflows" / f"{name}.json").read_text())


def api_file(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def frontend(comfy):
    if comfy.host != DEFAULT_HOST:
        pytest.skip(f"the page checks are written for v{DEFAULT_HOST}'s frontend (1.48.7); {comfy.host} serves another")
    write_example_inputs(comfy.base_dir / "input")       # the ControlNet workflow's control image
    with FrontendPage(comfy) as page:
        assert page.problems() == [], "the page did not start cleanly"
        yield page


# -- checks (also used on edited copies: see check_workflow) ---------------------------------------

def expected_widgets(node: dict, object_info: dict) -> list:
    """[(widget name, value)] a UI file's node sets, from its widgets_values in declared input order
    (seed-like INTs carry a control_after_generate entry right after their value)."""
    values, out = iter(node.get("widgets_values", [])), []
    for name, _type, widget, control in _inputs(object_info[node["type"]]):
        if widget:
            out.append((name, next(values)))
            if control:
                out.append(("control_after_generate", next(values)))
    return out


def node_problems(ui: dict, canvas: list, object_info: dict) -> list[str]:
    """Every node of the file on the canvas, with the file's type, title and widget values; nothing else."""
    out, on_canvas = [], {n["id"]: n for n in canvas}
    for node in ui["nodes"]:
        nid = str(node["id"])
        here = on_canvas.get(nid)
        if here is None:
            out.append(f"node {nid} ({node['type']}) is not on the canvas")
            continue
        if (here["type"], here["title"]) != (node["type"], node["title"]):
            out.append(f"node {nid}: canvas has {here['type']} {here['title']!r}, file {node['type']} {node['title']!r}")
        if node["type"] not in object_info:
            out.append(f"node {nid}: the server has no node type {node['type']}")
            continue
        widgets = dict(map(tuple, here["widgets"]))
        for name, value in expected_widgets(node, object_info):
            if value is None:               # a widget input fed by a link
                continue
            if name not in widgets:
                out.append(f"node {nid} ({node['title']}): no widget {name!r} on the canvas")
            elif widgets[name] != value:
                out.append(f"node {nid} ({node['title']}): widget {name} is {widgets[name]!r} on the canvas, "
                           f"{value!r} in the file")
    extra = sorted(set(on_canvas) - {str(n["id"]) for n in ui["nodes"]})
    out += [f"node {i} ({on_canvas[i]['type']}) is on the canvas but not in the file" for i in extra]
    return out


def box(node: dict) -> tuple:
    """The rendered bounding box (x0, y0, x1, y1): pos is the body's top left, the title bar sits above it."""
    x, y = node["pos"]
    w, h = node["size"]
    top = y - node["title_height"]
    return (x, top, x + w, top + node["title_height"]) if node["collapsed"] else (x, top, x + w, y + h)


def overlaps(canvas: list) -> list[str]:
    out = []
    for i, a in enumerate(canvas):
        for b in canvas[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box(a), box(b)
            w, h = min(ax1, bx1) - max(ax0, bx0), min(ay1, by1) - max(ay0, by0)
            if w > 0 and h > 0:
                out.append(f"node {a['id']} ({a['title']}) overlaps node {b['id']} ({b['title']}) by "
                           f"{w:.0f} x {h:.0f} px: {[round(v) for v in box(a)]} vs {[round(v) for v in box(b)]}")
    return out


def prompt_problems(prompt: dict, api: dict) -> list[str]:
    got, want = strip_meta(prompt), strip_meta(api)
    out = [f"graphToPrompt has node {k} ({got[k]['class_type']}), the API file not" for k in sorted(set(got) - set(want))]
    out += [f"graphToPrompt lacks node {k} ({want[k]['class_type']})" for k in sorted(set(want) - set(got))]
    for k in sorted(set(got) & set(want), key=int):
        if got[k]["class_type"] != want[k]["class_type"]:
            out.append(f"node {k}: graphToPrompt class {got[k]['class_type']}, API file {want[k]['class_type']}")
        for name in sorted(set(got[k]["inputs"]) | set(want[k]["inputs"])):
            g, w = got[k]["inputs"].get(name, "<absent>"), want[k]["inputs"].get(name, "<absent>")
            if g != w:
                out.append(f"node {k} ({want[k]['class_type']}) input {name}: graphToPrompt {g!r}, API file {w!r}")
    return out


def check_workflow(page: FrontendPage, ui: dict, api: dict, object_info: dict, screenshot=None) -> list[str]:
    """Load a UI workflow in the page and list everything wrong with it (empty: all good)."""
    page.problems()                                  # whatever an earlier step left is not this graph's
    page.load(ui)
    if screenshot is not None:
        page.screenshot(screenshot)
    canvas = page.nodes()
    missing = page.missing()
    out = [f"page: {p}" for p in page.problems()]
    for kind in ("missing_nodes", "missing_nodes_hook", "missing_models", "missing_media"):
        out += [f"{kind.replace('_', ' ')}: {m}" for m in missing[kind]]
    if missing["error_overlay"]:
        out.append("the page opened its error overlay")
    out += [f"a dialog is open: {d!r}" for d in missing["dialogs"]]
    out += node_problems(ui, canvas, object_info)
    out += overlaps(canvas)
    out += prompt_problems(page.graph_to_prompt(), api)
    return out


# -- tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_renders_and_exports_its_api_twin(frontend, object_info, name):
    problems = check_workflow(frontend, ui_file(name), api_file(name), object_info,
                              screenshot=SCREENSHOTS / f"{name}.png")
    assert not problems, f"{name} in the frontend:\n  " + "\n  ".join(problems)
    assert (SCREENSHOTS / f"{name}.png").stat().st_size > 10_000


def test_the_checks_see_what_is_wrong(frontend, object_info):
    """The checks are live: an unknown node type, a missing model, an edited widget value and two nodes
    on top of each other are each reported."""
    name = "pixart_delta_controlnet"
    ui, api = ui_file(name), api_file(name)
    by_type = {n["type"]: n for n in ui["nodes"]}
    bad = copy.deepcopy(ui)
    nodes = {n["type"]: n for n in bad["nodes"]}
    nodes["DiTControl_HEDSoftEdge"]["type"] = "NoSuchNode_FrontendTest"
    nodes["VAELoader"]["widgets_values"] = ["no-such-vae.safetensors"]
    nodes["KSampler"]["widgets_values"][2] = 15                       # steps: API file says 14
    nodes["EmptyLatentImage"]["pos"] = list(by_type["KSampler"]["pos"])
    problems = check_workflow(frontend, bad, api, object_info)
    text = "\n".join(problems)
    assert "missing nodes: NoSuchNode_FrontendTest" in text, text
    assert "missing models: VAELoader.vae_name=no-such-vae.safetensors" in text, text
    assert "the page opened its error overlay" in text, text
    assert "node 12 (KSampler) input steps: graphToPrompt 15, API file 14" in text, text
    assert "node 9 (VAELoader) input vae_name: graphToPrompt 'no-such-vae.safetensors'" in text, text
    assert "overlaps node 12 (KSampler" in text, text
    # the file's own values are on the canvas, so the widget check has nothing to say here; it does when
    # the canvas differs from the file: load the shipped graph, then compare it with the edited file
    frontend.load(ui)
    edited = copy.deepcopy(ui)
    next(n for n in edited["nodes"] if n["type"] == "KSampler")["widgets_values"][2] = 15
    assert node_problems(edited, frontend.nodes(), object_info) == [
        "node 12 (KSampler (DPM-Solver++ 2M, 14 steps, CFG 4.5)): widget steps is 14 on the canvas, 15 in the file"]
    frontend.problems()                      # the unknown type's console error (registry look-up blocked)


def test_workflow_queued_from_the_page_finishes(frontend, comfy, object_info):
    ui = ui_file(QUEUED)
    assert check_workflow(frontend, ui, api_file(QUEUED), object_info) == []
    answer = frontend.queue()
    assert answer.get("node_errors") in ({}, None), answer
    history = comfy.wait(answer["prompt_id"], timeout=600)
    assert history["status"]["status_str"] == "success", execution_error(history)
    save = next(n for n in ui["nodes"] if n["type"] == "SaveImage")
    (image,) = history["outputs"][str(save["id"])]["images"]
    assert image["filename"].startswith(QUEUED) and image["subfolder"] == "dit-control", image
    # the page got the result over its websocket and shows it on the Save Image node
    shown = frontend.wait_for_output(str(save["id"]))
    assert [i["filename"] for i in shown["images"]] == [image["filename"]], shown
    frontend.settle()
    frontend.screenshot(SCREENSHOTS / f"{QUEUED}_queued.png")
    assert frontend.problems() == []
