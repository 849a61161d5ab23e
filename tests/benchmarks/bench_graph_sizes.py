"""Benchmark: every shipped graph at its users' sizes, through a real ComfyUI server — does it complete in
bounded memory, refuse clearly, or fail raw?

    .venv/bin/python tests/benchmarks/bench_graph_sizes.py [--workflows a,b] [--sizes 1,2,4] [--steps 1] [--with-dit4sr]

Each workflow in workflows/api/ runs on a fresh server (the embedded checkpoints of
tests/generators/make_checkpoints.make_all:
micro PixArt, tiny FLUX / ControlAR / DiT4SR networks, full-size random VAEs and HED) at its shipped size, at 2× and
at 4× the pixels (sides × √2 and × 2, rounded to multiples of 64) and, where it fits a loaded picture to its size
(Fit Control Image), at its shipped size with a 24 MP photo (6000×4000) as that picture. Everything runs as
shipped except: 1 sampling step (LCM scheduler and KSampler), the text-encoder stand-ins of the API tests for
the FLUX / SD3 graphs (tests/host_probe: real-size CLIP / T5 are too heavy here) and the size itself
(EmptyLatentImage, EmptySD3LatentImage, ModelSamplingFlux, Fit Control Image, ControlAR Sampler; DiT4SR: its
input photo). --sizes picks the pixel factors; rows of earlier runs stay in the results file, so a long
measurement can be made in parts. Peak RSS is the server's VmHWM over that one run
(reset before it through /proc/<pid>/clear_refs). A row is "completed", "refused" (a pack error naming the size,
before the memory is spent) or "failed raw" (anything else, the server killed included). dit4sr_upscale_x4 only
with --with-dit4sr (its own benchmark is bench_dit4sr_step.py).

Writes bench_results/graph_sizes.json and prints the table of tests/benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.comfy_host import ComfyServer, PromptRejected, execution_error, load_api_graph  # noqa: E402
from dit_control.tests.generators.make_checkpoints import make_all, write_easycontrol_inputs, write_example_inputs  # noqa: E402
from dit_control.tests.generators.make_controlar_checkpoints import write_controlar_inputs  # noqa: E402
from dit_control.tests.generators.make_dit4sr_checkpoints import write_dit4sr_inputs  # noqa: E402

WORKFLOWS = REPO / "workflows" / "api"
GIB = 2**30
PHOTO = (6000, 4000)          # a 24 MP camera photo
# the pack's refusals begin with the node that refused (nodes/input_checks.py and the nodes' own checks)
OUR_PREFIXES = ("PixArt DiT", "Apply EasyControl", "Apply ControlNet (", "Fit Control Image", "HED Soft Edge",
                "VAE Decode (Tiled", "ControlAR Sampler", "DiT4SR")
SIZE_NODES = ("EmptyLatentImage", "EmptySD3LatentImage", "ModelSamplingFlux", "DiTControl_FitControlImage",
              "DiTControl_ControlARSampler")


def ids(g: dict, class_type: str) -> list:
    return sorted((k for k, n in g.items() if n["class_type"] == class_type), key=int)


# -- graphs ----------------------------------------------------------------------------------------

def prepared(name: str, steps: int) -> dict:
    """The shipped graph with the API tests' text-encoder stand-ins and `steps` sampling steps."""
    g = load_api_graph(WORKFLOWS / f"{name}.json")
    for loader in ids(g, "DualCLIPLoader") + ids(g, "TripleCLIPLoader"):
        stand_in = "DiTControlProbe_FluxConditioningStandIn" if g[loader]["class_type"] == "DualCLIPLoader" \
            else "DiTControlProbe_SD3ConditioningStandIn"
        tokens = 256 if "Flux" in stand_in else 154
        del g[loader]
        for k in ids(g, "CLIPTextEncode"):
            g[k] = {"class_type": stand_in, "inputs": {"text": g[k]["inputs"]["text"], "tokens": tokens}}
    for k in ids(g, "KSampler") + ids(g, "DiTControl_LCMScheduler"):
        g[k]["inputs"]["steps"] = steps
    return g


def shipped_size(g: dict):
    """(width, height) the graph makes, or None (DiT4SR: set by its input photo)."""
    for class_type in SIZE_NODES:
        for k in ids(g, class_type):
            return g[k]["inputs"]["width"], g[k]["inputs"]["height"]
    return None


def scaled(size: tuple, pixels: float) -> tuple:
    """Sides × √pixels, rounded to multiples of 64 (every model here takes those)."""
    return tuple(max(64, int(round(s * math.sqrt(pixels) / 64)) * 64) for s in size)


def at_size(g: dict, size: tuple) -> dict:
    for class_type in SIZE_NODES:
        for k in ids(g, class_type):
            g[k]["inputs"].update(width=size[0], height=size[1])
    return g


def with_input(g: dict, image: str) -> dict:
    for k in ids(g, "LoadImage"):
        g[k]["inputs"]["image"] = image
    return g


def write_inputs(input_dir: Path):
    from PIL import Image, ImageDraw
    write_example_inputs(input_dir)
    write_easycontrol_inputs(input_dir)
    write_controlar_inputs(input_dir)
    write_dit4sr_inputs(input_dir)
    photo = Image.new("RGB", PHOTO, (120, 150, 180))
    d = ImageDraw.Draw(photo)
    d.rectangle([0, PHOTO[1] * 2 // 3, PHOTO[0], PHOTO[1]], fill=(70, 110, 60))
    d.ellipse([PHOTO[0] // 3, PHOTO[1] // 4, PHOTO[0] * 2 // 3, PHOTO[1] * 3 // 4], fill=(200, 60, 50))
    photo.save(input_dir / "bench_photo_24mp.png")
    dit4sr = Image.open(input_dir / "dit4sr_input.png")
    for pixels in (2, 4):
        side = tuple(int(round(s * math.sqrt(pixels))) for s in dit4sr.size)
        dit4sr.resize(side, Image.BICUBIC).save(input_dir / f"dit4sr_input_{pixels}x.png")


def runs_of(name: str, steps: int, pixel_factors=(1, 2, 4)) -> list:
    """[(label, graph)] of one workflow: its shipped size times each pixel factor, and, where the graph fits a
    loaded picture to its size (Fit Control Image), a 24 MP photo as that picture at the shipped size."""
    base = prepared(name, steps)
    size = shipped_size(base)
    runs = []
    if size is None:                                           # DiT4SR: the input photo sets the size
        (load,) = ids(base, "LoadImage")
        shipped_input = base[load]["inputs"]["image"]
        for pixels in pixel_factors:
            label = "shipped" if pixels == 1 else f"{pixels}x pixels"
            image = shipped_input if pixels == 1 else shipped_input.replace(".png", f"_{pixels}x.png")
            runs.append((f"{label} input", with_input(json.loads(json.dumps(base)), image)))
        return runs
    for pixels in pixel_factors:
        s = scaled(size, pixels) if pixels != 1 else size
        label = "shipped" if pixels == 1 else f"{pixels}x pixels"
        runs.append((f"{label} {s[0]}×{s[1]}", at_size(json.loads(json.dumps(base)), s)))
    if 1 in pixel_factors and ids(base, "DiTControl_FitControlImage"):
        runs.append((f"24 MP photo in, {size[0]}×{size[1]} out",
                     with_input(json.loads(json.dumps(base)), "bench_photo_24mp.png")))
    return runs


# -- measuring ---------------------------------------------------------------------------------------

def status_field(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split(field + ":")[1].split()[0]) * 1024


def reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")              # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Fallback where VmHWM cannot be reset: the largest RSS seen every 0.1 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, status_field(self.pid, "VmRSS"))
            except (OSError, IndexError):
                return
            self.stop.wait(0.1)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return int(f.read().split("MemAvailable:")[1].split()[0]) * 1024


def wait_for_memory(need_gib: float, timeout: float = 900.0):
    """Shared machine: wait until `need_gib` are available (another heavy run may be going)."""
    deadline = time.time() + timeout
    while mem_available() < need_gib * GIB and time.time() < deadline:
        time.sleep(5)


def classify(history) -> tuple:
    """("completed" | "refused" | "failed raw", what was said)."""
    if history["status"]["status_str"] == "success":
        return "completed", ""
    err = execution_error(history) or {}
    message = (err.get("exception_message") or "").strip()
    kind = err.get("exception_type", "")
    if kind.endswith("ValueError") and message.startswith(OUR_PREFIXES):
        return "refused", message
    return "failed raw", f"{kind}: {message}"


def oom_kill_of(pid: int) -> str:
    """What the kernel log says if the OOM killer took `pid` (its RSS then): on a shared machine another
    process can exhaust the memory and the server, which volunteers (oom_score_adj 1000), goes first."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    for line in reversed(log.splitlines()):
        if f"Killed process {pid} " in line and "anon-rss:" in line:
            rss = int(line.split("anon-rss:")[1].split("kB")[0]) * 1024
            return f"OOM-killed by the kernel with {rss / GIB:.1f} GiB resident"
    return ""


def run_workflow(models: Path, name: str, steps: int, out_dir: Path, pixel_factors=(1, 2, 4)) -> list:
    base = REPO / ".comfy_host" / f"bench_base_sizes_{name}"
    server = ComfyServer(models, base_dir=base, log_path=out_dir / f"graph_sizes_{name}.log", probe=True).start()
    rows = []
    try:
        write_inputs(server.base_dir / "input")
        pid = server.proc.pid
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("1000")           # if a size does not fit in this machine's RAM, the server is what goes
        for label, g in runs_of(name, steps, pixel_factors):
            wait_for_memory(8)
            row = {"workflow": name, "run": label}
            sampler = RssSampler(pid)
            exact = reset_peak(pid)
            sampler.start()
            start = time.time()
            try:
                row["result"], row["said"] = classify(server.run(g, timeout=3600))
            except PromptRejected as e:
                row["result"], row["said"] = "refused", f"/prompt: {json.dumps(e.body)[:300]}"
            except Exception as e:        # the server died (killed for memory) or timed out
                row["result"], row["said"] = "failed raw", f"{type(e).__name__}: {str(e)[:300]}"
            row["seconds"] = round(time.time() - start, 1)
            sampler.stop.set()
            sampler.join()
            alive = server.proc is not None and server.proc.poll() is None
            if not alive:
                row["said"] = (oom_kill_of(pid) or "the server died") + f"; {row['said']}"
            peak = status_field(pid, "VmHWM") if alive and exact else sampler.peak
            row["peak_rss_gib"] = round(peak / GIB, 2)
            row["peak_exact"] = exact and alive
            print({k: (v[:160] if isinstance(v, str) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
            if not alive:
                server.stop()
                server = ComfyServer(models, base_dir=base, log_path=out_dir / f"graph_sizes_{name}.log",
                                     probe=True).start()
                pid = server.proc.pid
    finally:
        server.stop()
    return rows


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{name}, {os.cpu_count()} vCPUs, {round(ram / GIB)} GiB"


def cell(row) -> str:
    """One run as tests/benchmarks/README.md shows it: result, peak RSS, wall time (what a refusal said is in
    the json)."""
    if row is None:
        return "not run"
    what = {"completed": "✅", "refused": "refused", "failed raw": "**failed raw**"}[row["result"]]
    return f"{what} {row['peak_rss_gib']:.2f} GiB, {row['seconds']:.0f} s"


def table(rows: list) -> str:
    """workflow × (shipped, 2×, 4× the pixels, 24 MP photo in): result, peak RSS of the server, time."""
    columns = ("shipped", "2x pixels", "4x pixels", "24 MP photo")
    lines = ["| workflow (shipped size) | shipped | 2× pixels | 4× pixels | 24 MP photo in |",
             "|---|---|---|---|---|"]
    for name in sorted({r["workflow"] for r in rows}):
        mine = [r for r in rows if r["workflow"] == name]
        by = {c: next((r for r in mine if r["run"].startswith(c)), None) for c in columns}
        size = by["shipped"]["run"].removeprefix("shipped").strip() if by["shipped"] else ""
        photo = cell(by["24 MP photo"]) if by["24 MP photo"] else "—"
        lines.append(f"| `{name}` {size} | {cell(by['shipped'])} | {cell(by['2x pixels'])} | "
                     f"{cell(by['4x pixels'])} | {photo} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workflows", default="", help="comma-separated names (default: every shipped one)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--with-dit4sr", action="store_true")
    parser.add_argument("--sizes", default="1,2,4", help="pixel factors of the shipped size")
    parser.add_argument("--name", default="graph_sizes",
                        help="results file: bench_results/<name>.json (rows of earlier runs are kept, a rerun "
                             "replaces its own)")
    args = parser.parse_args()
    factors = tuple(int(f) for f in args.sizes.split(","))
    names = [n for n in args.workflows.split(",") if n] or sorted(
        p.stem for p in WORKFLOWS.glob("*.json") if args.with_dit4sr or not p.stem.startswith("dit4sr"))
    models = make_all(REPO / ".comfy_host" / "models")
    out_dir = REPO / "bench_results"
    out_dir.mkdir(exist_ok=True)
    earlier = out_dir / f"{args.name}.json"
    kept = json.loads(earlier.read_text())["rows"] if earlier.exists() else []
    results = {"machine": machine(), "steps": args.steps, "rows": kept}
    print(results["machine"], flush=True)
    for name in names:
        rows = run_workflow(models, name, args.steps, out_dir, factors)
        done = {(r["workflow"], r["run"]) for r in rows}
        results["rows"] = [r for r in results["rows"] if (r["workflow"], r["run"]) not in done] + rows
        results["rows"].sort(key=lambda r: (r["workflow"], r["run"][:1] != "s", r["run"]))
        save_results(args.name, results)
    print(table(results["rows"]))


if __name__ == "__main__":
    main()
