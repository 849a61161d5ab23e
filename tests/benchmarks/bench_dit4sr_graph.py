"""Benchmark: peak memory of the whole shipped DiT4SR graph against the output size, and its LR encode against
core's plain VAE encode of the whole upscaled image.

    .venv/bin/python tests/benchmarks/bench_dit4sr_graph.py [--sizes 1024,2048,4096] [--complete 1024]
        [--transformer full|tiny] [--runs ours,peer] [--parts graph,fullsize]

- graph, ours: workflows/api/dit4sr_upscale_x4.json through a fresh ComfyUI server per run (its own process, so
  its peak RSS — VmHWM — is the prompt's): a square input of size/4 px at ×4, KSampler 1 step, the full-size
  2.9 B DiT4SR (random weights in the released layout and dtypes, F16 base + F32 control tensors, streamed
  once to .comfy_host/bench_models_dit4sr/: 6.6 GB; `--transformer tiny`: the test model, a smoke run), the
  random full-size SD3 VAE made at set-up and the API tests' SD3 conditioning stand-in (tests/host_probe: real
  CLIP-L/G + T5-XXL are not what is measured), weight_dtype fp16 (`--weight-dtype`: F16 storage computing in
  fp32, the transformer benchmark's; the shipped 'default' stores fp32 on a CPU, as core does for SD3: 11.8 GB
  of weights, and the load holds the file's 6.6 GB beside them). Sizes in `--complete` run to the saved image
  (encode, sampling, tiled decode, colour fix, save); the others stop after their first denoising tile batch (a
  bench-only node interrupts the sampler before its second model call: every batch has the same size, so the
  same peak).
- graph, peer: the same graph with DiT4SR Conditioning's LR encode swapped for core's plain `vae.encode` of the
  whole upscaled image (a bench-only node patches it in that server): the node as it was. The encode does not
  depend on the transformer, so the peer runs the tiny one and stops before sampling.
  Both report `lr_encode_added_gib`: the peak during DiT4SR Conditioning (the LR preparation + encode) above the
  RSS the server had when it started, from the node's log lines by a watcher thread that restarts the peak
  there; `peak_rss_gib` is the whole prompt's.
- fullsize: in a child process, the tensors the graph holds at full size after sampling (the one-pass tiled
  decode's blend with a stand-in decoder, the colour fix, core SaveImage's 8-bit copy) at each size, AdaIN and
  wavelet: bytes per output pixel, the figure behind DiT4SR Conditioning's size limit (kernels/dit4sr/sizes.py).

The peer's server runs under an address-space cap (idle size + `--peer-cap-gib`), so an encode that asks for
more fails with the allocator's error instead of taking this shared machine's memory; ours runs uncapped by
default (`--cap-gib`: the loader maps and copies the 6.6 GB file, so address space is no measure of it), and
each run waits until the machine has the memory it needs available. Writes bench_results/dit4sr_graph.json with
the machine (lscpu model name); the fullsize part bench_results/dit4sr_graph_full_size_tensors.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.comfy_host import ComfyServer, execution_error, load_api_graph  # noqa: E402

GIB = 2 ** 30
BENCH_MODELS = REPO / ".comfy_host" / "bench_models_dit4sr"
GRAPH = REPO / "workflows" / "api" / "dit4sr_upscale_x4.json"

# A bench-only node pack, written into each server's custom_nodes: it only exists in these servers.
BENCH_PACK = '''
import sys
import comfy.model_management


def _dit4sr_node_module():
    for name, module in list(sys.modules.items()):
        if name.endswith(".nodes.dit4sr.nodes") and hasattr(module, "encode_lr_image"):
            return module
    raise RuntimeError("the dit-control pack's nodes.dit4sr.nodes module is not loaded")


class StopAfterModelCalls:
    """Interrupts sampling before model call `calls` + 1 (one call = one batch of tiles; 0: before any)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "calls": ("INT", {"default": 1, "min": 0})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "bench"

    def run(self, model, calls):
        net = model.model.diffusion_model
        single = type(net).forward_single
        count = {"n": 0}

        def limited(*args, **kwargs):
            if count["n"] >= calls:
                print(f"dit4sr-bench: stopping after {calls} model call(s)", flush=True)
                raise comfy.model_management.InterruptProcessingException()
            count["n"] += 1
            out = single(net, *args, **kwargs)
            print(f"dit4sr-bench: model call {count['n']} done ({args[0].shape[0]} tile samples)", flush=True)
            return out
        net.forward_single = limited
        return (model,)


class PlainEncode:
    """Makes DiT4SR Conditioning encode the LR image as it did before: core's vae.encode of the whole image."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",)}}
    RETURN_TYPES = ("VAE",)
    FUNCTION = "run"
    CATEGORY = "bench"

    def run(self, vae):
        _dit4sr_node_module().encode_lr_image = lambda vae, up, tile_px: vae.encode(up)
        return (vae,)


NODE_CLASS_MAPPINGS = {"DiT4SRBench_StopAfterModelCalls": StopAfterModelCalls,
                       "DiT4SRBench_PlainEncode": PlainEncode}
'''


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    cores = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("CPU(s)")), "?")
    mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) / 2 ** 20
    return f"{model}, {cores} CPUs, {mem:.0f} GiB RAM"


def mem_available_gib() -> float:
    return int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) / 2 ** 20


def proc_gib(pid: int, field: str) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split(field + ":")[1].split()[0]) / 2 ** 20


def make_models(transformer: str) -> tuple:
    """(models dir, dit_name): the bench transformer folder plus the set-up's SD3 VAE."""
    from dit_control.kernels.dit4sr.model import DiT4SRConfig
    from dit_control.tests.generators.make_checkpoints import make_all
    from dit_control.tests.generators.make_dit4sr_checkpoints import (
        SD3_VAE_NAME,
        TINY_DIT4SR,
        diffusers_config,
        stream_dit4sr_safetensors,
    )
    made = make_all(REPO / ".comfy_host" / "models")
    folder = BENCH_MODELS / "diffusion_models" / f"dit4sr_{transformer}" / "transformer"
    weights = folder / "diffusion_pytorch_model.safetensors"
    cfg = DiT4SRConfig() if transformer == "full" else DiT4SRConfig(**TINY_DIT4SR)
    if not (folder / "config.json").exists():
        print(f"writing {weights} ...", flush=True)
        stream_dit4sr_safetensors(weights, cfg, seed=7)
        (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
    vae = BENCH_MODELS / "vae" / SD3_VAE_NAME
    if not vae.exists():
        vae.parent.mkdir(parents=True, exist_ok=True)
        vae.symlink_to(made / "vae" / SD3_VAE_NAME)
    return BENCH_MODELS, f"dit4sr_{transformer}/transformer/diffusion_pytorch_model.safetensors"


def bench_graph(dit_name: str, image: str, stop_after_calls: int, plain_encode: bool, weight_dtype: str) -> dict:
    """The shipped graph with the API tests' SD3 conditioning stand-in, 1 step, the bench nodes as asked."""
    g = load_api_graph(GRAPH)
    by_class = {n["class_type"]: k for k, n in g.items()}
    del g[by_class["TripleCLIPLoader"]]
    for k, n in list(g.items()):
        if n["class_type"] == "CLIPTextEncode":
            g[k] = {"class_type": "DiTControlProbe_SD3ConditioningStandIn",
                    "inputs": {"text": n["inputs"]["text"], "tokens": 154}}
    g[by_class["DiTControl_DiT4SRLoader"]]["inputs"].update(dit_name=dit_name, weight_dtype=weight_dtype)
    g[by_class["LoadImage"]]["inputs"]["image"] = image
    sampler = g[by_class["KSampler"]]["inputs"]
    sampler["steps"] = 1
    if stop_after_calls is not None:
        g["90"] = {"class_type": "DiT4SRBench_StopAfterModelCalls",
                   "inputs": {"model": sampler["model"], "calls": stop_after_calls}}
        sampler["model"] = ["90", 0]
    if plain_encode:
        cond = g[by_class["DiTControl_DiT4SRConditioning"]]["inputs"]
        g["91"] = {"class_type": "DiT4SRBench_PlainEncode", "inputs": {"vae": cond["vae"]}}
        cond["vae"] = ["91", 0]
    return g


class Watcher(threading.Thread):
    """Polls the server's log and memory. When DiT4SR Conditioning starts it notes the RSS and the peak so far
    and restarts the peak (clear_refs 5), so that the peak read when the node's log says the LR image is encoded
    is that node's own; the run's overall peak is the larger of the two peaks."""
    START, END = "DiT4SR input ", "LR image prepared and encoded in"
    MARKERS = {"sampling": "| 0/1 [", "first_call": "dit4sr-bench: model call 1"}

    def __init__(self, server: ComfyServer, period: float = 0.25):
        super().__init__(daemon=True)
        self.server, self.period, self.stop, self.start_time = server, period, threading.Event(), time.monotonic()
        self.seen, self.offset, self.peak_before_encode = {}, server.log_path.stat().st_size, 0.0

    def run(self):
        while not self.stop.wait(self.period):
            self.poll()

    def status(self, field: str) -> float:
        return proc_gib(self.server.proc.pid, field)

    def note(self, name: str, **extra):
        self.seen[name] = {"s": round(time.monotonic() - self.start_time, 1), "rss_gib": round(self.status("VmRSS"), 3),
                           "peak_gib_so_far": round(self.status("VmHWM"), 3), **extra}

    def poll(self):
        try:
            with open(self.server.log_path, "rb") as f:
                f.seek(self.offset)
                text = f.read().decode(errors="replace")
            if "encode_start" not in self.seen and self.START in text:
                self.note("encode_start")
                self.peak_before_encode = self.seen["encode_start"]["peak_gib_so_far"]
                Path(f"/proc/{self.server.proc.pid}/clear_refs").write_text("5")
            if "encode_start" in self.seen and "encode_end" not in self.seen and self.END in text:
                self.note("encode_end")
            for name, marker in self.MARKERS.items():
                if name not in self.seen and marker in text:
                    self.note(name)
        except (OSError, IndexError):
            return

    def overall_peak(self) -> float:
        return max(self.peak_before_encode, self.status("VmHWM"))

    def encode_added(self):
        start, end = self.seen.get("encode_start"), self.seen.get("encode_end")
        return round(end["peak_gib_so_far"] - start["rss_gib"], 3) if start and end else None


def run_case(models: Path, dit_name: str, size: int, stop_after_calls, peer: bool, cap_gib: float,
             need_gib: float, weight_dtype: str = "fp16") -> dict:
    """One prompt on a fresh server. stop_after_calls: None runs to the saved image, N stops before model
    call N + 1 (0: before sampling)."""
    from PIL import Image
    waited = time.monotonic()
    while mem_available_gib() < need_gib:
        if time.monotonic() - waited > 3600:
            raise SystemExit(f"the machine never had {need_gib:.0f} GiB available for the run")
        print(f"waiting for {need_gib:.0f} GiB available (now {mem_available_gib():.1f})", flush=True)
        time.sleep(30)
    base = Path(tempfile.mkdtemp(prefix="dit4sr_graph_bench_"))
    (base / "custom_nodes" / "dit4sr_bench").mkdir(parents=True)
    (base / "custom_nodes" / "dit4sr_bench" / "__init__.py").write_text(BENCH_PACK)
    (base / "input").mkdir()
    image = f"bench_{size // 4}.png"
    # a photo-like input: a smooth gradient (content changes neither memory nor time)
    Image.linear_gradient("L").resize((size // 4, size // 4)).convert("RGB").save(base / "input" / image)
    row = {"output": f"{size}x{size}", "input": f"{size // 4}x{size // 4}", "transformer": dit_name.split("/")[0],
           "weight_dtype": weight_dtype,
           "encode": "core plain" if peer else "ours tiled",
           "until": {None: "saved image", 0: "sampling"}.get(stop_after_calls, f"{stop_after_calls} model call(s)")}
    try:
        with ComfyServer(models, base_dir=base, probe=True) as server:
            pid = server.proc.pid
            idle_rss, idle_vm = proc_gib(pid, "VmRSS"), proc_gib(pid, "VmSize")
            if cap_gib:
                cap = int((idle_vm + cap_gib) * GIB)
                resource.prlimit(pid, resource.RLIMIT_AS, (cap, cap))
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            watcher = Watcher(server)
            watcher.start()
            start = time.monotonic()
            history = server.run(bench_graph(dit_name, image, stop_after_calls, peer, weight_dtype), timeout=7200)
            seconds = time.monotonic() - start
            watcher.stop.set()
            watcher.join()
            watcher.poll()
            err = execution_error(history)
            stopped = "dit4sr-bench: stopping after" in server.log_tail(400)
            row.update(idle_rss_gib=round(idle_rss, 3), peak_rss_gib=round(watcher.overall_peak(), 3),
                       seconds=round(seconds, 1), phases=watcher.seen, cap_gib_over_idle=cap_gib or None,
                       lr_encode_added_gib=watcher.encode_added())
            if err is not None and not stopped:
                row["failed"] = f"{err['node_type']}: {err['exception_message'].strip()[:300]}"
            else:
                row["result"] = "stopped as asked" if stopped else "saved"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def full_size_child(size: int, method: str) -> dict:
    """In this (child) process: the graph's full-size tensors after sampling at size² — what the one-pass tiled
    decode node, the colour fix node and core's SaveImage allocate around the decode — with a stand-in decoder
    (nearest ×8 of 3 latent channels: no VAE working set), so that only the full-size part is measured."""
    import numpy as np
    import torch
    from PIL import Image

    from dit_control.kernels.dit4sr.colour_fix import colour_fix
    from dit_control.kernels.tiled_decode import tiled_decode
    torch.set_num_threads(2)
    Path("/proc/self/clear_refs").write_text("5")
    base = proc_gib_self("VmRSS")
    reference = torch.rand(1, size, size, 3)                                 # DiT4SR Conditioning's `upscaled`
    latent = torch.randn(1, 16, size // 8, size // 8)                        # KSampler's output
    decode = lambda z: torch.sigmoid(torch.nn.functional.interpolate(z[:, :3], scale_factor=8))   # noqa: E731
    image = tiled_decode(latent, decode, tile=64, overlap=8).movedim(1, -1).clamp(0.0, 1.0)   # the decode node
    fixed = colour_fix(image[..., :3].movedim(-1, 1), reference[..., :3].movedim(-1, 1), method).movedim(1, -1)
    pixels = np.clip(255.0 * fixed[0].cpu().numpy(), 0, 255).astype(np.uint8)   # core SaveImage
    Image.fromarray(pixels).save(Path(tempfile.gettempdir()) / f"dit4sr_bench_{size}.png", compress_level=1)
    peak = proc_gib_self("VmHWM") - base
    return {"size": size, "method": method, "peak_above_start_gib": round(peak, 3),
            "bytes_per_output_pixel": round(peak * GIB / (size * size), 1)}


def proc_gib_self(field: str) -> float:
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) / 2 ** 20


def full_size_part(sizes: list) -> list:
    import sys
    rows = []
    for size in sizes:
        for method in ("adain", "wavelet"):
            out = subprocess.run([sys.executable, __file__, "--full-size-child", str(size), "--method", method],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                raise SystemExit(f"full-size child failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-size-child", type=int, default=0)
    parser.add_argument("--method", default="adain")
    parser.add_argument("--parts", default="graph,fullsize")
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--complete", default="1024", help="sizes that run to the saved image")
    parser.add_argument("--transformer", default="full", choices=("full", "tiny"))
    parser.add_argument("--runs", default="ours,peer")
    parser.add_argument("--cap-gib", type=float, default=0.0,
                        help="address-space growth allowed (ours; 0: none — reading the 6.6 GB file maps it twice)")
    parser.add_argument("--need-gib", type=float, default=12.0, help="memory available before an 'ours' run")
    parser.add_argument("--weight-dtype", default="fp16",
                        help="the loader's weight_dtype: fp16 = the transformer benchmark's storage (F16, fp32 "
                             "compute by manual cast); 'default' stores fp32 on a CPU (11.8 GB for the full model)")
    parser.add_argument("--peer-cap-gib", type=float, default=10.0, help="address-space growth allowed (peer)")
    args = parser.parse_args()
    if args.full_size_child:
        print(json.dumps(full_size_child(args.full_size_child, args.method)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    complete = {int(s) for s in args.complete.split(",") if s}
    name = "dit4sr_graph" + ("_tiny" if args.transformer == "tiny" else "")
    results = {"machine": machine(), "transformer": args.transformer, "weight_dtype": args.weight_dtype,
               "graph": GRAPH.name, "steps": 1,
               "threads": "ComfyUI default (all CPUs)", "rows": []}
    parts = args.parts.split(",")
    if "fullsize" in parts:
        print("wrote", save_results("dit4sr_graph_full_size_tensors",
                                    {"machine": results["machine"], "rows": full_size_part(sizes)}))
    if "graph" in parts:
        models, ours = make_models(args.transformer)
        _, tiny = make_models("tiny")
        for size in sizes:
            if "ours" in args.runs:
                results["rows"].append(run_case(models, ours, size, None if size in complete else 1, False,
                                                args.cap_gib, args.need_gib, args.weight_dtype))
                print("wrote", save_results(name, results))
            if "peer" in args.runs:
                # the LR encode does not depend on the transformer: the tiny one, stopped before sampling
                results["rows"].append(run_case(models, tiny, size, 0, True, args.peer_cap_gib,
                                                args.peer_cap_gib + 1))
                print("wrote", save_results(name, results))
    for row in results["rows"]:
        added = row.get("lr_encode_added_gib")
        print(f"{row['output']:>9} {row['encode']:<11} until {row['until']:<16} peak {row['peak_rss_gib']:.2f} GiB, "
              f"LR encode {'+%.2f GiB' % added if added is not None else 'did not finish'}, {row['seconds']:.0f} s: "
              f"{row.get('result') or row.get('failed')}")


if __name__ == "__main__":
    main()
