"""Help pages and model links, without a server (the frontend side is tests/api/test_frontend.py).

- Every node the pack registers has its help page, nodes/web/docs/<node id>.md, in the folder `__init__.py`
  exports as WEB_DIRECTORY; its inputs and outputs block is what tests/generators/make_node_docs.py writes from the
  node's
  schema now; its hand-written parts are there (title = the node's display name, what it does, Files,
  Example, Limits); a loader's page names the files the shipped workflows load with it, with their links.
- Every model file a shipped UI workflow loads is in its loader node's `properties.models` under the name the
  dropdown shows (the widget's value), with the folder that dropdown lists (read from the schema for the
  pack's loaders) and the file's download URL (tests/generators/model_files.py); each graph has the generator's note.

The schemas are read once, in a subprocess importing the pack as ComfyUI does (tests/generators/node_schemas.py).
"""
import json
import re

import pytest

import dit_control
from dit_control.tests.comfy_host import REPO
from dit_control.tests.generators.make_node_docs import BEGIN, DOCS, END, SECTIONS, expected_pages, io_block, with_block
from dit_control.tests.generators.model_files import (
    CORE_LOADER_FOLDERS,
    FAMILY_OF_WORKFLOW,
    HF,
    files_of,
    is_model_file,
)
from dit_control.tests.generators.node_schemas import file_folder, node_schemas
from dit_control.tests.generators.workflow_format import FRONTEND_ONLY, note_size, note_text

WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def schemas() -> dict:
    return node_schemas()


def ui_file(name: str) -> dict:
    return json.loads((REPO / "workflows" / f"{name}.json").read_text())


def api_file(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


def file_inputs(schemas: dict) -> dict:
    """{(node id, input name): models folder} of every file dropdown of the pack's nodes."""
    out = {}
    for node_id, info in schemas.items():
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                folder = file_folder(spec[1].get("options", [])) if spec[0] == "COMBO" else None
                if folder is not None:
                    out[(node_id, name)] = folder
    return out


# -- help pages -------------------------------------------------------------------------------------

def test_web_directory_holds_the_help_pages():
    """ComfyUI serves WEB_DIRECTORY (relative to the pack) at /extensions/<pack>/; the help is docs/ in it."""
    web = (REPO / dit_control.WEB_DIRECTORY).resolve()
    assert web == REPO / "nodes" / "web", web
    assert DOCS == web / "docs" and DOCS.is_dir()


def test_every_registered_node_has_a_help_page(schemas):
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert sorted(set(schemas) - pages) == [], \
        "registered nodes without a help page (run tests/generators/make_node_docs.py)"
    assert sorted(pages - set(schemas)) == [], "help pages of nodes the pack does not register"


def test_generated_blocks_are_current(schemas):
    stale = [p.name for p, text in expected_pages(schemas).items() if not p.exists() or p.read_text() != text]
    assert stale == [], \
        f"inputs/outputs out of date with the schemas: run python tests/generators/make_node_docs.py ({stale})"


def test_the_block_follows_the_schema(schemas):
    """A changed tooltip changes the block, so a stale page is seen; a page without its markers is refused."""
    info = json.loads(json.dumps(schemas["DiTControl_CannyEdge"]))
    page = (DOCS / "DiTControl_CannyEdge.md").read_text()
    info["input"]["required"]["low_threshold"][1]["tooltip"] = "A tooltip changed in the node."
    assert "A tooltip changed in the node." in io_block(info)
    assert with_block(page, info, DOCS / "x.md") != page
    with pytest.raises(ValueError, match="one generated block"):
        with_block(page.replace(END, ""), info, DOCS / "x.md")


def test_pages_carry_their_hand_written_parts(schemas):
    problems = []
    for node_id, info in schemas.items():
        page = (DOCS / f"{node_id}.md").read_text()
        head, _, tail = page.partition(BEGIN)
        title, _, what = head.partition("\n")
        if title != f"# {info['display_name']}":
            problems.append(f"{node_id}: title {title!r}, the node shows {info['display_name']!r}")
        if len(what.split()) < 15:
            problems.append(f"{node_id}: no 'what it does' paragraph above the inputs")
        hand = tail.partition(END)[2]
        at = [hand.find(f"\n{s}\n") for s in SECTIONS]
        if -1 in at or at != sorted(at):
            problems.append(f"{node_id}: sections {SECTIONS} expected in this order after the generated block")
        else:
            bodies = [hand[a:b] for a, b in zip(at, at[1:] + [len(hand)])]
            problems += [f"{node_id}: {s} is empty" for s, body in zip(SECTIONS, bodies)
                         if len(body.split()) < 1 + len(s.split())]
        if "TODO" in page:
            problems.append(f"{node_id}: TODO left on the page")
    assert problems == [], "\n".join(problems)


def test_loader_pages_name_their_shipped_files_with_links(schemas):
    """Each file a shipped workflow loads through one of the pack's loaders is on that loader's page: its name,
    its folder and its download URL."""
    problems = []
    for name in WORKFLOWS:
        family = FAMILY_OF_WORKFLOW[name]
        for node in api_file(name).values():
            if node["class_type"] not in schemas:
                continue
            page = (DOCS / f"{node['class_type']}.md").read_text()
            for value in filter(is_model_file, node["inputs"].values()):
                f = family[value]
                problems += [f"{node['class_type']}: {what} of {value} ({name}) is not on its page"
                             for what, text in (("the name", value), ("the folder", f"models/{f.directory}/"),
                                                ("the URL", f.url)) if text not in page]
    assert problems == [], "\n".join(sorted(set(problems)))


# -- model links in the shipped workflows -----------------------------------------------------------

@pytest.mark.parametrize("name", WORKFLOWS)
def test_loaders_carry_links_for_the_files_their_dropdowns_expect(schemas, name):
    """properties.models of each node: one entry per model file it loads, named as the widget value (what the
    dropdown lists once the user's file is in place), in the folder that dropdown reads, with the download URL
    of that file; the URL's file name is the dropdown name's unless the note tells to save it renamed."""
    folders = file_inputs(schemas)
    api, ui = api_file(name), ui_file(name)
    family = FAMILY_OF_WORKFLOW[name]
    problems = []
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        api_node = api[str(node["id"])]
        wanted = [(k, v) for k, v in api_node["inputs"].items() if is_model_file(v)]
        links = node["properties"].get("models", [])
        if [e["name"] for e in links] != [v for _k, v in wanted]:
            problems.append(f"node {node['id']} ({node['type']}): links for {[e['name'] for e in links]}, "
                            f"its files are {[v for _k, v in wanted]}")
            continue
        for (widget, value), entry in zip(wanted, links):
            folder = folders.get((node["type"], widget), CORE_LOADER_FOLDERS.get((node["type"], widget)))
            if entry["directory"] != folder:
                problems.append(f"node {node['id']} {node['type']}.{widget}: folder {entry['directory']!r}, "
                                f"its dropdown lists {folder!r}")
            match = re.fullmatch(re.escape(HF) + r"/[\w.-]+/[\w.-]+/resolve/main/(\S+)", entry["url"])
            if match is None or entry["url"] != family[value].url:
                problems.append(f"node {node['id']}: {value} links {entry['url']}, expected {family[value].url}")
            elif match.group(1).rsplit("/", 1)[-1] != value.rsplit("/", 1)[-1] and \
                    f"as `{value}`" not in note_text(name, api):
                problems.append(f"node {node['id']}: {value} downloads as {match.group(1)}, the note does not say "
                                "to rename it")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_each_graph_has_the_generators_note(name):
    """One Markdown note on top: three paragraphs (what, files and folders, where from), as the generator
    writes it, above every other node."""
    ui, api = ui_file(name), api_file(name)
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1, f"{name}: {len(notes)} notes"
    (note,) = notes
    text = note["widgets_values"][0]
    assert text == note_text(name, api), \
        f"{name}: the note is not the generator's (python tests/generators/workflow_format.py)"
    assert len(text.split("\n\n")) == 3
    for f in files_of(name, api):
        assert f"`{f.name}`" in text and f"`models/{f.directory}/`" in text, f"{name}: {f.name} not in the note"
    assert note["size"] == note_size(text, note["size"][0])
    bottom = note["pos"][1] + note["size"][1]
    assert all(n["pos"][1] - 30 > bottom for n in ui["nodes"] if n is not note), f"{name}: a node under the note"
