"""The shipped UI workflows in ComfyUI's real web frontend (headless chromium, tests/api/frontend_page.py).

One page on the session's server, whose models folders hold every file the workflows name: every
workflows/<name>.json is loaded through the page's own app.loadGraphData, and must load without a page error,
console error or missing-node/model/media warning, show each of its nodes with its widget values (its note
with its whole text), render without overlapping nodes, and give back through app.graphToPrompt() exactly
workflows/api/<name>.json (node ids, classes, inputs). A screenshot of each goes to output/frontend/<name>.png.
One workflow is then queued from the page and must finish. For one node of each family, the Info button shows
the node's help page (nodes/web/docs) whole.

A second server of the same host with empty models folders, and its page: every shipped workflow lists each
file it loads as a missing model with our download link and folder (properties.models), without a request
leaving the page; its Missing Models panel offers each download (screenshot).
"""
import copy
import json
import re

import pytest

from dit_control.tests.api.frontend_page import FrontendPage
from dit_control.tests.comfy_host import DEFAULT_HOST, REPO, ComfyServer, execution_error
from dit_control.tests.generators.make_checkpoints import write_example_inputs
from dit_control.tests.generators.make_node_docs import DOCS
from dit_control.tests.generators.model_files import FAMILY_OF_WORKFLOW, model_inputs
from dit_control.tests.generators.workflow_format import FRONTEND_ONLY, _inputs, strip_meta

WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
SCREENSHOTS = REPO / "output" / "frontend"
QUEUED = "pixart_alpha_t2i"      # the cheapest shipped graph on the tiny models (512 px), queued as shipped
# one node of each family, in a shipped workflow that has it, whose help page the Info button must show
HELP_NODES = [("pixart_alpha_t2i", "DiTControl_PixArtDiTLoader"),
              ("easycontrol_canny", "DiTControl_ApplyEasyControl"),
              ("pixart_relactrl_canny", "DiTControl_RelaCtrlCheckpointLoader"),
              ("dit4sr_upscale_x4", "DiTControl_DiT4SRConditioning"),
              ("controlar_canny_mr", "DiTControl_ControlARSampler")]
MISSING_SHOWN = "easycontrol_canny"     # whose Missing Models panel is opened and shot


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
            out.append(f"node {nid}: canvas has {here['type']} {here['title']!r}, "
                       f"file {node['type']} {node['title']!r}")
        if node["type"] in FRONTEND_ONLY:          # a note: the frontend's own node, its one widget the text
            if [w[1] for w in here["widgets"]] != node["widgets_values"]:
                out.append(f"node {nid} ({node['title']}): the canvas shows other text than the file")
            continue
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
    out = [f"graphToPrompt has node {k} ({got[k]['class_type']}), the API file not"
           for k in sorted(set(got) - set(want))]
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
    out += [f"note cut: {n}" for n in page.notes_cut()]
    out += overlaps(canvas)
    out += prompt_problems(page.graph_to_prompt(), api)
    return out


# -- tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_renders_and_exports_its_api_twin(frontend, object_info, name):
    """Also: with every file in place, the page lists no missing model (the model links stay silent)."""
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


# -- help pages -------------------------------------------------------------------------------------

def shown_lines(markdown: str) -> list[str]:
    """Each line of a help page as the rendered page shows it: markers, emphasis, code ticks and link targets
    dropped, escapes resolved, white space collapsed (comments and blank lines left out)."""
    text = re.sub(r"<!--.*?-->", "", markdown, flags=re.S)
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(#+|-|\d+\.)\s+", "", line)
        line = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line)
        # outside code spans (odd pieces between backticks are code, shown as written): emphasis marks go,
        # escaped asterisks and '&lt;' show as themselves
        pieces = line.split("`")
        pieces[::2] = [p.replace("\\*", "\0").replace("*", "").replace("\0", "*").replace("&lt;", "<")
                       for p in pieces[::2]]
        line = " ".join("".join(pieces).split())
        if line and not line.startswith("```"):
            out.append(line)
    return out


def missing_from_panel(markdown: str, shown: dict) -> list[str]:
    """The page's lines and links that the rendered help does not show."""
    text = " ".join(shown["text"].split())
    out = [f"line {line!r}" for line in shown_lines(markdown) if line not in text]
    hrefs = {href for _text, href in shown["links"]}
    out += [f"link {url}" for url in re.findall(r"\]\(([^)]+)\)", markdown) if url not in hrefs]
    return out


@pytest.mark.parametrize("workflow,node_type", HELP_NODES)
def test_info_button_shows_the_nodes_help_page(frontend, object_info, workflow, node_type):
    """Select the node, click Info: the right side panel shows nodes/web/docs/<node>.md, every line and link of
    it, fetched from /extensions/dit-control/docs/ (after the frontend's one probe for a per-locale page)."""
    ui = ui_file(workflow)
    frontend.problems()
    frontend.load(ui)
    node = next(n for n in ui["nodes"] if n["type"] == node_type)
    markdown = (DOCS / f"{node_type}.md").read_text()
    shown = frontend.open_help(str(node["id"]), object_info[node_type]["display_name"])
    frontend.screenshot_page(SCREENSHOTS / f"help_{node_type}.png")
    unshown = missing_from_panel(markdown, shown)
    assert unshown == [], f"{node_type}'s help panel does not show these of its page: {unshown}"
    probe = (f"console error: Failed to load resource: the server responded with a status of 404 (Not Found) "
             f"[/extensions/dit-control/docs/{node_type}/en.md]")
    assert [p for p in frontend.problems() if p != probe] == []


def test_the_help_check_sees_a_missing_line(frontend, object_info):
    """The comparison is live: a line the page does not carry, or a link it does not have, is reported."""
    workflow, node_type = HELP_NODES[0]
    ui = ui_file(workflow)
    frontend.load(ui)
    node = next(n for n in ui["nodes"] if n["type"] == node_type)
    shown = frontend.open_help(str(node["id"]), object_info[node_type]["display_name"])
    edited = (DOCS / f"{node_type}.md").read_text() + "\nA sentence no page has.\n[a link](https://example.org/x)\n"
    assert missing_from_panel(edited, shown) == ["line 'A sentence no page has.'", "line 'a link'",
                                                 "link https://example.org/x"]
    frontend.problems()


# -- missing files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_frontend(frontend, comfy, tmp_path_factory):
    """A second server of the session's host whose models folders are empty, and a page on it (in the first
    page's browser)."""
    base = tmp_path_factory.mktemp("comfy_base_no_models")
    with ComfyServer(tmp_path_factory.mktemp("no_models"), base_dir=base, host=comfy.host) as server:
        write_example_inputs(base / "input")
        with FrontendPage(server, beside=frontend) as page:
            assert page.problems() == [], "the page did not start cleanly"
            yield page


def size_probe_refused(problem: str, urls: set) -> bool:
    """A console error of the page's CSP refusing the HEAD the missing-model list sends for one of `urls`
    (its file-size look-up): refused in the page, never sent."""
    return (problem.startswith("console error: ") and "Content Security Policy" in problem
            and re.search(r"\[/assets/missingModelDownload-\w+\.js\]$", problem) is not None
            and any(f"'{u}'" in problem or f" {u}." in problem for u in urls))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_missing_files_are_listed_with_our_links(bare_frontend, name):
    """Every model file input of the graph is a missing model carrying the name, folder and URL of
    tests/generators/model_files.py (the frontend took them from the loader's properties.models); offline: no request
    leaves the page, the only errors are the CSP's refusals of the list's size look-ups of those URLs."""
    family = FAMILY_OF_WORKFLOW[name]
    inputs = model_inputs(api_file(name))
    bare_frontend.problems()
    bare_frontend.load(ui_file(name))
    got = sorted((m["node_type"], m["widget"], m["name"], m["directory"], m["url"])
                 for m in bare_frontend.missing()["missing_model_links"])
    expected = sorted((cls, widget, value, family[value].directory, family[value].url)
                      for _nid, cls, widget, value in inputs)
    assert got == expected, f"{name}: the page lists other missing models or links than the workflow's files"
    urls = {family[value].url for *_rest, value in inputs}
    unexpected = [p for p in bare_frontend.problems() if not size_probe_refused(p, urls)]
    assert unexpected == [], f"{name}: {unexpected}"


def test_missing_models_panel_offers_each_download(bare_frontend):
    """What a user sees: the error overlay's 'see errors' opens the Missing Models list with a Download button
    for each file of the graph (not clicked: nothing is downloaded)."""
    bare_frontend.load(ui_file(MISSING_SHOWN))
    offered = bare_frontend.open_missing_models()
    bare_frontend.screenshot_page(SCREENSHOTS / f"missing_models_{MISSING_SHOWN}.png")
    assert sorted(offered) == sorted({value for *_rest, value in model_inputs(api_file(MISSING_SHOWN))})
    # the errors panel looks its node packs up in the registry: refused by the CSP too, never sent
    urls = {FAMILY_OF_WORKFLOW[MISSING_SHOWN][v].url for *_rest, v in model_inputs(api_file(MISSING_SHOWN))}
    assert [p for p in bare_frontend.problems() if not size_probe_refused(p, urls)
            and not ("Content Security Policy" in p and "https://api.comfy.org/" in p)] == []
