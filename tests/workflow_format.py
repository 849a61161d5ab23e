"""Convert example workflows between ComfyUI's API format (headless, /prompt) and its UI format
(drag and drop), using a server's /object_info for input order and types.

`python -m tests.workflow_format` rewrites every workflows/<name>.json (UI) from workflows/api/<name>.json,
with a running throw-away server; tests check that each UI file converts back to its API graph.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


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
            control = bool(opts.get("control_after_generate")) or (type_name == "INT" and name in ("seed", "noise_seed"))
            out.append((name, type_name, widget, control))
    return out


def api_to_ui(api: dict, object_info: dict) -> dict:
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
                            "links": [l[0] for l in links if l[1] == ids[nid] and l[2] == slot]})
        nodes.append({"id": ids[nid], "type": node["class_type"], "pos": [60 + 360 * (order % 4), 80 + 330 * (order // 4)],
                      "size": [320, 160], "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    return {"last_node_id": len(nodes), "last_link_id": link_id, "nodes": nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend's 'Export (API)' produces for a UI graph (no reroutes or groups here)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        values = iter(node.get("widgets_values", []))
        by_name = {e["name"]: e for e in node.get("inputs", [])}
        inputs = {}
        for name, type_name, widget, control in _inputs(info):
            entry = by_name.get(name)
            if widget:
                value = next(values)
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


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def main():
    sys.path.insert(0, str(REPO))
    from tests.comfy_host import ComfyServer
    from tests.make_checkpoints import make_all
    models = make_all(REPO / ".comfy_host" / "models")
    with ComfyServer(models) as server:
        object_info = server.get("/object_info")
    for api_path in sorted((REPO / "workflows" / "api").glob("*.json")):
        api = json.loads(api_path.read_text())
        ui = api_to_ui(api, object_info)
        assert ui_to_api(ui, object_info) == strip_meta(api), api_path
        (REPO / "workflows" / api_path.name).write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", api_path.name)


if __name__ == "__main__":
    main()
