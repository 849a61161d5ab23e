"""Where benchmarks write their results (git-ignored bench_results/)."""
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench_results"


def save_results(name: str, results: dict) -> Path:
    """Write `results` as bench_results/<name>.json (with the ComfyUI host it ran on) and return the path."""
    from dit_control.tests.comfy_host import host_name
    results = {"comfyui_host": host_name(), **results}
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(results, indent=1))
    return path
