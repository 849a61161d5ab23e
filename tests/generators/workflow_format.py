"""Convert example workflows between ComfyUI's API format (headless, /prompt) and its UI format
(drag and drop), using a server's /object_info for input order and types.

`python tests/generators/workflow_format.py` rewrites every workflows/<name>.json (UI) from workflows/api/<name>.json,
with a running throw-away server; tests check that each UI file converts back to its API graph. A shipped UI
file also carries what the API graph cannot: on each loader node `properties.models` (name, download URL and
models folder of the file it loads, tests/generators/model_files.py), which ComfyUI's frontend shows as download links
when the file is missing, and a Markdown note at the top that says in three lines what the graph does and
which files it needs. The note is a frontend-only node: the page leaves it out of the prompt, as ui_to_api does.
"""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# node types the frontend defines itself (virtual: never in /object_info, never in a prompt)
FRONTEND_ONLY = {"Note", "MarkdownNote"}
NOTE_TITLE = "About this workflow"

# line 1 of each shipped graph's note: what it does (README, "Workflows" and the family sections)
SUMMARIES = {
    "pixart_delta_lcm_t2i": "**PixArt-δ (LCM) text to image**: 1024×1024 in 4 steps at cfg 1 — SamplerCustom with "
                            "LCM Sampler + LCM Scheduler (PixArt-δ).",
    "pixart_alpha_t2i": "**PixArt-α 512 text to image**: KSampler DPM-Solver++(2M), 20 steps, CFG 4.5, the "
                        "checkpoint's learned null caption as the negative.",
    "pixart_delta_controlnet": "**PixArt-δ ControlNet-Transformer**: HED soft edges of the input picture steer a "
                               "1024×1024 image (Apply ControlNet; KSampler DPM-Solver++(2M), 14 steps, CFG 4.5).",
    "pixart_delta_lcm_t2i_int8": "**PixArt-δ in 8 bit**: int8 DiT and int8 T5 (released after encoding), 1024×1024 in "
                                 "4 LCM steps at cfg 1, one-pass tiled VAE decode.",
    "pixart_relactrl_canny": "**RelaCtrl on PixArt-α 1024-MS**: a Canny map (100 / 200) of the input picture steers a "
                             "1024×1024 image (Apply ControlNet; DPM-Solver++(2M), 20 steps, CFG 4.5).",
    "easycontrol_canny": "**EasyControl on core FLUX.1-dev**: a canny edge map steers a 1024×1024 image (Apply "
                         "EasyControl; FluxGuidance 3.5, KSampler Euler 25 steps). Other step "
                         "counts: EasyControl Scheduler + SamplerCustomAdvanced gives the reference's σ list.",
    "easycontrol_subject": "**EasyControl on core FLUX.1-dev**: the subject of a photo in a new 1024×1024 picture "
                           "(Apply EasyControl; FluxGuidance 3.5, KSampler Euler 25 steps). Other step "
                         "counts: EasyControl Scheduler + SamplerCustomAdvanced gives the reference's σ list.",
    "easycontrol_subject_canny": "**EasyControl on core FLUX.1-dev, two conditions chained**: a subject photo and a "
                                 "canny edge map, 1024×1024 (FluxGuidance 3.5, KSampler Euler 25 steps). Other step "
                         "counts: EasyControl Scheduler + SamplerCustomAdvanced gives the reference's σ list.",
    "easycontrol_ghibli": "**EasyControl Ghibli style on core FLUX.1-dev**: a photo redrawn as a Ghibli illustration, "
                          "768×768, the trigger words `Ghibli Studio style, Charming hand-drawn anime-style "
                          "illustration` in the prompt (FluxGuidance 3.5, KSampler Euler 25 steps).",
    "easycontrol_inpainting": "**EasyControl inpainting on core FLUX.1-dev**: the photo with the masked region "
                              "(white in the mask) blacked out steers a new 1024×1024 picture that fills it; nothing "
                              "is pasted back (FluxGuidance 3.5, KSampler Euler 25 steps).",
    "easycontrol_hedsketch": "**EasyControl HED sketch on core FLUX.1-dev**: HED edges of the photo made into a black-"
                             "on-white sketch steer a 1024×1024 picture (FluxGuidance 3.5, KSampler Euler 25 steps).",
    "easycontrol_depth": "**EasyControl depth on core FLUX.1-dev**: a depth map (near = bright) steers a 1024×1024 "
                         "picture. Make maps with comfyui_controlnet_aux (Depth Anything, MiDaS, Zoe) or "
                         "ComfyUI-DepthAnythingV2.",
    "easycontrol_pose": "**EasyControl pose on core FLUX.1-dev**: an OpenPose skeleton steers a 1024×1024 picture. "
                        "Make skeletons with comfyui_controlnet_aux (DWPose, OpenPose) or draw one with an "
                        "OpenPose editor pack.",
    "easycontrol_seg": "**EasyControl segmentation on core FLUX.1-dev**: an ADE20K-coloured segmentation map steers a "
                       "1024×1024 picture. Make maps with comfyui_controlnet_aux (OneFormer ADE20K, UniFormer).",
    "easycontrol_canny_img2img": "**EasyControl img2img on core FLUX.1-dev**: the photo VAE-encoded as the start "
                                 "latent (KSampler denoise 0.75) and its canny map as the condition, 1024×1024.",
    "dit4sr_upscale_x4": "**DiT4SR ×4 super-resolution on SD3.5-medium**: KSampler Euler / normal, CFG 7, 20 steps, "
                         "tiled inside the model, one-pass tiled decode, AdaIN colour fix. DiT4SR Scheduler + "
                         "SamplerCustomAdvanced gives the reference's σ list bit for bit.",
    "controlar_canny_mr": "**ControlAR on LlamaGen-XL**: a canny map steers a 768×512 image token by token (canny_MR, "
                          "CFG 4, top-k 2000, a row preview every 8 rows).",
    "controlar_hed_512": "**ControlAR on LlamaGen-XL**: HED soft edges steer a 512×512 image token by token (hed, "
                         "CFG 4, top-k 2000).",
}


def _inputs(info: dict) -> list:
    """[(name, type, is_widget, has_control_after_generate)] in the node's declared order."""
    out = []
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        for name in order.get(section, list(spec)):
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            type_name = "COMBO" if isinstance(kind, list) else kind
            widget = type_name in WIDGET_TYPES and not opts.get("forceInput", False)
            control = (bool(opts.get("control_after_generate"))
                       or (type_name == "INT" and name in ("seed", "noise_seed")))
            out.append((name, type_name, widget, control))
    return out


# -- layout -------------------------------------------------------------------------------------------
# The frontend (1.48.7, LGraphNode.computeSize, run on every node by app.loadGraphData) makes a node
# max(its size in the file, the size its content needs): height = 20 per slot row (max of plain inputs
# and outputs) + each widget row's height + 4 (+ 8 once) + 6; width = the largest of 140 (210 with
# widgets), the title (14px Inter) + 40, the input + output labels (12px Inter) + 45 and a widget label
# + 104. Heights are reproduced exactly below; widths come from a per-character estimate that is at or
# above what the page measured for every title and label of our workflows (tests/api/test_frontend.py
# checks the rendered graphs for overlaps). Each node gets that size in the file, so the page keeps it.
SLOT_H, WIDGET_H, TITLE_H = 20, 20, 30
MULTILINE_H = 50            # a multiline STRING (DOM textarea) widget's minimum height
IMAGE_PREVIEW_H = 220       # an image_upload combo's preview widget's minimum height (plus a button row)
GAP_X, GAP_Y = 90, 60       # between columns (room for links) and between a node and the next title bar
ORIGIN = (40, 40)           # top left of the first title bar


def _text_width(text: str, px: float) -> float:
    """An upper estimate of the width of `text` in Inter at `px` pixels (measured: within 5% above)."""
    width = 0.0
    for c in text:
        if c in "mwMW@%":
            f = 0.95
        elif c.isupper() or not c.isascii():
            f = 0.78
        elif c.isdigit():
            f = 0.65
        elif c in "iljtfr.,:;!|()[]' -_":
            f = 0.45
        else:
            f = 0.62
        width += f * px
    return width


def _node_size(info: dict, title: str) -> list:
    """[width, height] (height without the title bar) that the frontend will not need to grow."""
    spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    plain_inputs, widget_rows, widget_labels = [], [], []
    for name, type_name, widget, control in _inputs(info):
        if not widget:
            plain_inputs.append(name)
            continue
        opts = spec[name][1] if len(spec[name]) > 1 else {}
        widget_labels.append(name)
        widget_rows.append(MULTILINE_H if type_name == "STRING" and opts.get("multiline") else WIDGET_H)
        if control:
            widget_rows.append(WIDGET_H)
            widget_labels.append("control after generate")
        if opts.get("image_upload"):
            widget_rows += [WIDGET_H, IMAGE_PREVIEW_H]     # "choose file to upload" button, preview
    outputs = list(info.get("output_name") or info["output"])
    height = SLOT_H * max(len(plain_inputs), len(outputs), 1) + 6
    if widget_rows:
        height += sum(h + 4 for h in widget_rows) + 8

    def label(names):
        return max((_text_width(n, 12) for n in names), default=0)

    width = max(210 if widget_rows else 140, _text_width(title, 14) + 40,
                label(plain_inputs) + label(outputs) + 45, label(widget_labels) + 104 if widget_rows else 0)
    return [int(-(-width // 10) * 10), height]


def _columns(api: dict) -> list:
    """Node ids in columns by graph depth: a node with no linked input is in column 0, any other node one
    column right of its deepest source; API order within a column."""
    depth = {}

    def walk(nid, seen=()):
        if nid not in depth:
            if nid in seen:
                raise ValueError(f"cycle through node {nid}")
            sources = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((walk(s, seen + (nid,)) for s in sources), default=-1)
        return depth[nid]

    for nid in api:
        walk(nid)
    return [[nid for nid in api if depth[nid] == d] for d in range(max(depth.values(), default=-1) + 1)]


def layout(api: dict, object_info: dict, top: int = ORIGIN[1]) -> dict:
    """{node id: (pos, size)}: columns by depth, sources left, nodes stacked top-down in each column from `top`
    (the top of the first title bar)."""
    sizes = {nid: _node_size(object_info[node["class_type"]], _title(node, object_info[node["class_type"]]))
             for nid, node in api.items()}
    placed, x = {}, ORIGIN[0]
    for column in _columns(api):
        y = top
        for nid in column:
            placed[nid] = ([x, y + TITLE_H], sizes[nid])
            y += TITLE_H + sizes[nid][1] + GAP_Y
        x += max(sizes[nid][0] for nid in column) + GAP_X
    return placed


# -- the note -----------------------------------------------------------------------------------------
# A MarkdownNote's text is a DOM editor that wraps its paragraphs to the node's width and scrolls what does not
# fit (frontend 1.48.7, measured at zoom 1: 10 px Inter, 12 px lines, 10 px between paragraphs, no padding;
# code spans in a monospace font). The note gets the graph's width (at least NOTE_MIN_W, at most NOTE_MAX_W) and
# the height its wrapped text needs by _text_width's upper estimate at 11 px, with 13 px lines and 10 px of
# room around, so the text shows whole (tests/api/test_frontend.py checks that it does not scroll).
NOTE_MIN_W, NOTE_MAX_W = 720, 1000
NOTE_FONT_PX, NOTE_LINE_H, NOTE_PARA_GAP, NOTE_PAD = 11, 13, 10, 10


def _plain(markdown: str) -> str:
    """The text a paragraph of our notes shows: bold and code marks dropped, links as their text."""
    import re
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown).replace("**", "").replace("`", "")


def note_text(workflow: str, api: dict) -> str:
    """Three paragraphs: what the graph does, the files it loads and their folders, where missing ones come from."""
    from dit_control.tests.generators.model_files import files_of
    files = files_of(workflow, api)

    def phrase(f):
        beside = " and ".join(f"`{b.rsplit('/', 1)[-1]}`" for b in f.beside)
        return f"`{f.name}`" + (f" with {beside} beside it" if beside else "") + f" → `models/{f.directory}/`"

    repos = []
    for f in files:
        entry = f"[{f.repo}]({f.page})" + (" (gated: log in there and accept its licence)" if f.gated else "")
        if entry not in repos:
            repos.append(entry)
    renamed = "".join(f" Save `{f.path.rsplit('/', 1)[-1]}` of {f.repo} as `{f.name}`." for f in files if f.renamed)
    return "\n\n".join([
        SUMMARIES[workflow],
        "**Files**: " + "; ".join(phrase(f) for f in files) + ".",
        "A missing file is listed with its download link when the graph opens. From " + ", ".join(repos) + "."
        + renamed + " Select a loader and open Info for more.",
    ])


def note_size(text: str, width: int) -> list:
    """[width, height] of a MarkdownNote whose wrapped paragraphs all show (height without the title bar)."""
    inner = width - 2 * NOTE_PAD
    lines = [max(1, -(-int(_text_width(_plain(p), NOTE_FONT_PX)) // inner)) for p in text.split("\n\n")]
    return [width, 2 * NOTE_PAD + NOTE_LINE_H * sum(lines) + NOTE_PARA_GAP * (len(lines) - 1)]



def _title(node: dict, info: dict) -> str:
    return node.get("_meta", {}).get("title", info.get("display_name", node["class_type"]))


def api_to_ui(api: dict, object_info: dict, workflow: str | None = None) -> dict:
    """The UI graph of an API graph. For a shipped workflow (its name given): with model links on the loaders
    and the note on top."""
    nodes, links = [], []
    ids = {nid: i + 1 for i, nid in enumerate(api)}
    outgoing = {}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                outgoing.setdefault((value[0], value[1]), []).append((nid, name))
    link_id = 0
    link_of = {}
    for (src, slot), targets in sorted(outgoing.items(), key=lambda kv: (ids[kv[0][0]], kv[0][1])):
        for dst, name in targets:
            link_id += 1
            link_of[(dst, name)] = link_id
            out_type = object_info[api[src]["class_type"]]["output"][slot]
            links.append([link_id, ids[src], slot, ids[dst], None, out_type, name])
    note, top = None, ORIGIN[1]
    if workflow is not None:
        from dit_control.tests.generators.model_files import FAMILY_OF_WORKFLOW, is_model_file
        family = FAMILY_OF_WORKFLOW[workflow]
        text = note_text(workflow, api)
        placed = layout(api, object_info)
        right = max(pos[0] + size[0] for pos, size in placed.values())
        size = note_size(text, min(NOTE_MAX_W, max(NOTE_MIN_W, right - ORIGIN[0])))
        note = {"id": len(api) + 1, "type": "MarkdownNote", "pos": [ORIGIN[0], ORIGIN[1] + TITLE_H], "size": size,
                "flags": {}, "order": len(api), "mode": 0, "inputs": [], "outputs": [], "title": NOTE_TITLE,
                "properties": {}, "widgets_values": [text]}
        top = ORIGIN[1] + TITLE_H + size[1] + GAP_Y          # the graph below the note
    placed = layout(api, object_info, top)
    for order, (nid, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, type_name, widget, control in _inputs(info):
            value = node["inputs"].get(name)
            if isinstance(value, list):
                entry = {"name": name, "type": type_name, "link": link_of[(nid, name)]}
                if widget:
                    entry["widget"] = {"name": name}
                inputs.append(entry)
                if widget:
                    widgets.append(None)
                    if control:       # the control entry stays, as ui_to_api and the frontend expect
                        widgets.append("fixed")
            elif widget:
                widgets.append(value)
                if control:
                    widgets.append("fixed")
            else:
                inputs.append({"name": name, "type": type_name, "link": None})
        for link in links:
            if link[3] == ids[nid]:
                link[4] = next(i for i, e in enumerate(inputs) if e["name"] == link[6])
        outputs = []
        for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"])):
            outputs.append({"name": out_name, "type": out_type, "slot_index": slot,
                            "links": [lk[0] for lk in links if lk[1] == ids[nid] and lk[2] == slot]})
        pos, size = placed[nid]
        properties = {"Node name for S&R": node["class_type"]}
        if workflow is not None:
            # the frontend offers these links for a file its dropdown lacks (matched by name and folder)
            models = [family[v] for v in node["inputs"].values() if is_model_file(v)]
            if models:
                properties["models"] = [{"name": f.name, "url": f.url, "directory": f.directory} for f in models]
        nodes.append({"id": ids[nid], "type": node["class_type"], "pos": pos,
                      "size": size, "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "title": _title(node, info), "properties": properties, "widgets_values": widgets})
    if note is not None:
        nodes.append(note)
    return {"last_node_id": len(nodes), "last_link_id": link_id, "nodes": nodes,
            "links": [lk[:6] for lk in links], "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0,
                                                                                                                     0]}},
            "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend's 'Export (API)' produces for a UI graph (no reroutes or groups here). A workflow saved
    before a node gained an optional widget has no value for it: the frontend shows and exports the widget's
    default, and so does this."""
    links = {lk[0]: lk for lk in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:        # the page never puts a note into the prompt
            continue
        info = object_info[node["type"]]
        values = iter(node.get("widgets_values", []))
        by_name = {e["name"]: e for e in node.get("inputs", [])}
        optional = info["input"].get("optional", {})
        inputs = {}
        for name, _type_name, widget, control in _inputs(info):
            entry = by_name.get(name)
            if widget:
                value = next(values, _NO_VALUE)
                if value is _NO_VALUE:
                    if name not in optional:
                        raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
                    value = _widget_default(optional[name])
                if control:
                    next(values)
                if entry is not None and entry.get("link") is not None:
                    link = links[entry["link"]]
                    inputs[name] = [str(link[1]), link[2]]
                else:
                    inputs[name] = value
            elif entry is not None and entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[name] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


_NO_VALUE = object()


def _widget_default(spec: list):
    """The value the frontend gives a widget the saved workflow has no value for: its default, else a combo's first
    option."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    options = kind if isinstance(kind, list) else opts.get("options", [])
    if not options:
        raise ValueError(f"no default for a widget of type {kind!r}")
    return options[0]


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def main():
    from dit_control.tests.comfy_host import ComfyServer
    from dit_control.tests.generators.make_checkpoints import make_all
    models = make_all(REPO / ".comfy_host" / "models")
    with ComfyServer(models) as server:
        object_info = server.get("/object_info")
    for api_path in sorted((REPO / "workflows" / "api").glob("*.json")):
        api = json.loads(api_path.read_text())
        ui = api_to_ui(api, object_info, workflow=api_path.stem)
        assert ui_to_api(ui, object_info) == strip_meta(api), api_path
        (REPO / "workflows" / api_path.name).write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", api_path.name)


if __name__ == "__main__":
    main()
