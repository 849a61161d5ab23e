"""The main job: a headless run of the flagship workflow through a real ComfyUI server, on the embedded
default checkpoints (the micro demo PixArt-δ trained here, tests/training/, installed with the other
embedded files by tests/generators/make_checkpoints.py).

    .venv/bin/python tests/demo.py [workflow name]     -> output/<workflow>.png

The graph runs as shipped, at its 1024 px: the micro model, trained at 256 px, still draws there (PixArt-MS's
stretched positions; README, "The micro demo model", measures it at 256, 512 and 1024).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from dit_control.tests.comfy_host import ComfyServer, execution_error, load_api_graph  # noqa: E402
from dit_control.tests.generators.make_checkpoints import make_all  # noqa: E402

FLAGSHIP = "pixart_delta_lcm_t2i"


def main(name: str = FLAGSHIP) -> Path:
    models = make_all(REPO / ".comfy_host" / "models")
    graph = load_api_graph(REPO / "workflows" / "api" / f"{name}.json")
    out_dir = REPO / "output"
    out_dir.mkdir(exist_ok=True)
    base = REPO / ".comfy_host" / "demo_base"
    with ComfyServer(models, base_dir=base, log_path=out_dir / "comfyui_demo.log") as server:
        print(f"ComfyUI at {server.url}; running workflows/api/{name}.json", flush=True)
        start = time.time()
        history = server.run(graph)
        if history["status"]["status_str"] != "success":
            err = execution_error(history) or {}
            raise SystemExit(f"workflow failed in {err.get('node_type')}: {err.get('exception_message')}")
        images = server.images(history)
    target = out_dir / f"{name}.png"
    target.write_bytes(images[0])
    print(f"wrote {target} ({len(images[0])} bytes) in {time.time() - start:.1f} s")
    return target


if __name__ == "__main__":
    main(*sys.argv[1:])
