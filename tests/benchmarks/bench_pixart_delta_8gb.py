"""Benchmark (the 8-bit headline): PixArt-δ at 1024 px through a real ComfyUI server, full size —
T5-XXL encoder, XL/2 DiT with LCM 4 steps, SD VAE (tiled decode) — random weights in the real layouts,
in int8, bf16 and fp32, one run. For each mode it reports the wall time of the graph and the peak
resident memory (VmHWM) of the ComfyUI process, with an RSS timeline.

    .venv/bin/python tests/benchmarks/bench_pixart_delta_.py8gb [--modes int8,bf16,fp32] [--no-t5-quality]

The graph is the shipped workflows/api/pixart_delta_lcm_t2i_int8.json with both loaders' weight_dtype
set to the mode (T5 released after encoding, tiled VAE decode: the same graph in every mode). Each mode
runs on a fresh server, so one mode's memory cannot leak into another's.

Also (no server running): T5-XXL embeddings int8 vs fp32 on one prompt (cosine per token), and the
weight bytes of the int8 DiT and T5 against fp32, from the models built on the meta device.

Files: .comfy_host/bench_models/text_encoders/t5xxl_fp16.safetensors (9.5 GB, random, ComfyUI's
single-file layout) is written on first use; the DiT and VAE are bench_lcm_vs_dpm's.
Writes bench_results/pixart_delta_8gb.json and the int8 image.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from dit_control.kernels.checkpoint_io import SAFETENSORS_DTYPES  # noqa: E402
from dit_control.kernels.int8 import Int8Ops, weight_bytes  # noqa: E402
from dit_control.kernels.pixart.model import PixArt, pixart_xl2_1024_ms  # noqa: E402
from dit_control.kernels.t5 import T5Config, T5Encoder, load_t5_encoder_file  # noqa: E402
from dit_control.tests.benchmarks.bench_lcm_vs_dpm import DIT, make_bench_models  # noqa: E402
from dit_control.tests.benchmarks.results import save_results  # noqa: E402
from dit_control.tests.comfy_host import ComfyServer, execution_error  # noqa: E402
from dit_control.tests.generators.make_checkpoints import random_t5_tensor  # noqa: E402

T5_FILE = "t5xxl_fp16.safetensors"
T5_INIT = "hf-init-v2"   # bump when the random T5 changes: the file is rewritten
WORKFLOW = REPO / "workflows" / "api" / "pixart_delta_lcm_t2i_int8.json"
PROMPT = ("Pirate ship trapped in a cosmic maelstrom nebula, rendered in cosmic beach whirlpool engine, "
          "volumetric lighting, spectacular, ambient lights")
GIB = 2**30


# -- the full-size random T5-XXL, written one tensor at a time ------------------------------------

def write_random_t5_xxl(path: Path, seed: int = 21):
    """ComfyUI-style t5xxl_fp16.safetensors (HF names, tied embedding stored once), random weights drawn
    as HF's T5 init draws them, streamed to disk so that the 9.5 GB never sit in memory."""
    config = T5Config.xxl()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5Encoder(config).state_dict().items()
                  if k != "encoder.embed_tokens.weight"}
    code = {v: k for k, v in SAFETENSORS_DTYPES.items()}[torch.float16]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in shapes.items():
            t = random_t5_tensor(name, shape, config, gen)
            f.write(t.to(torch.float16).numpy().tobytes())
    os.replace(tmp, path)


# -- one mode through the server ---------------------------------------------------------------------

def mode_graph(mode: str) -> dict:
    g = json.loads(WORKFLOW.read_text())
    g["1"]["inputs"].update(dit_name=DIT, weight_dtype=mode)
    g["2"]["inputs"].update(t5_name=T5_FILE, weight_dtype=mode, release_after_encode=True)
    g["3"]["inputs"]["text"] = PROMPT
    g["11"]["inputs"]["filename_prefix"] = f"bench/pixart_delta_{mode}"
    return g


def proc_status(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split(field + ":")[1].split()[0]) * 1024 / GIB


class RssSampler(threading.Thread):
    """Samples a process's RSS every `period` seconds into (seconds since start, GiB) pairs."""

    def __init__(self, pid: int, period: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples, self.stop = pid, period, [], threading.Event()
        self.t0 = time.time()

    def run(self):
        while not self.stop.is_set():
            try:
                self.samples.append((round(time.time() - self.t0, 1), round(proc_status(self.pid, "VmRSS"), 3)))
            except (OSError, IndexError):
                return
            self.stop.wait(self.period)


def run_mode(models: Path, mode: str, out_dir: Path) -> dict:
    base = REPO / ".comfy_host" / f"bench_base_8gb_{mode}"
    server = ComfyServer(models, base_dir=base, log_path=out_dir / f"pixart_delta_8gb_{mode}.log").start()
    row = {"mode": mode}
    try:
        pid = server.proc.pid
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("1000")   # if a mode does not fit in this machine's RAM, the server is what goes
        row["idle_rss_gib"] = round(proc_status(pid, "VmRSS"), 3)
        sampler = RssSampler(pid)
        sampler.start()
        start = time.time()
        try:
            history = server.run(mode_graph(mode), timeout=3600)
            ok = history["status"]["status_str"] == "success"
            row["error"] = None if ok else execution_error(history)
            if ok:
                image = server.images(history)[0]
                (out_dir / f"pixart_delta_{mode}_1024.png").write_bytes(image)
                row["png_bytes"] = len(image)
        except Exception as e:  # the server died (e.g. killed for memory) or timed out
            ok, row["error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
        row["seconds"] = round(time.time() - start, 1)
        row["ok"] = ok
        if server.proc is not None and server.proc.poll() is None:
            row["peak_rss_gib"] = round(proc_status(pid, "VmHWM"), 3)
            row["final_rss_gib"] = round(proc_status(pid, "VmRSS"), 3)
        sampler.stop.set()
        sampler.join()
        row["rss_timeline"] = sampler.samples
        row["max_sampled_rss_gib"] = max((s[1] for s in sampler.samples), default=None)
        row["log_lines"] = [ln for ln in server.log_tail(400).splitlines()
                            if "dit-control" in ln or "Prompt executed" in ln or "Error" in ln][-20:]
    finally:
        server.stop()
    return row


# -- quality and bytes, in this process ----------------------------------------------------------------

def encode_xxl(path: Path, operations, dtype, ids, mask):
    t0 = time.time()
    model, _ = load_t5_encoder_file(path, operations=operations, dtype=dtype)
    load_s = time.time() - t0
    t0 = time.time()
    with torch.no_grad():
        hidden = model(ids, mask, dtype=torch.float32)
    encode_s = time.time() - t0
    nbytes = weight_bytes(model)
    del model
    gc.collect()
    return hidden, load_s, encode_s, nbytes


def t5_quality_and_bytes(path: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32100, (1, 120), generator=g)
    mask = torch.zeros(1, 120, dtype=torch.long)
    mask[:, :40] = 1                                   # a 40-token prompt padded to 120, as PixArt encodes
    ref, ref_load, ref_enc, ref_bytes = encode_xxl(path, torch.nn, torch.float32, ids, mask)
    q, q_load, q_enc, q_bytes = encode_xxl(path, Int8Ops, torch.float32, ids, mask)
    valid = mask[0].bool()
    cos = torch.nn.functional.cosine_similarity(q[0, valid], ref[0, valid], dim=-1)
    return {"cosine_min": round(cos.min().item(), 5), "cosine_mean": round(cos.mean().item(), 5),
            "rel_l2": round(((q - ref)[0, valid].norm() / ref[0, valid].norm()).item(), 5),
            "fp32": {"load_s": round(ref_load, 1), "encode_s": round(ref_enc, 1), "weight_gib": round(ref_bytes / GIB,
                                                                                                      3)},
            "int8": {"load_s": round(q_load, 1), "encode_s": round(q_enc, 1), "weight_gib": round(q_bytes / GIB, 3)},
            "int8_bytes_vs_fp32": round(q_bytes / ref_bytes, 4)}


def meta_bytes(build) -> int:
    """Bytes of a model's state as built (on the meta device: free), int8 layers at one byte a weight."""
    with torch.device("meta"):
        model = build()
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def dit_bytes() -> dict:
    cfg = pixart_xl2_1024_ms(null_caption=False)
    fp32 = meta_bytes(lambda: PixArt(cfg))
    q = meta_bytes(lambda: PixArt(cfg, operations=Int8Ops))
    return {"fp32_gib": round(fp32 / GIB, 3), "int8_gib": round(q / GIB, 3), "int8_vs_fp32": round(q / fp32, 4)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="int8,bf16,fp32")
    parser.add_argument("--no-t5-quality", action="store_true")
    parser.add_argument("--name", default="pixart_delta_8gb", help="results file: bench_results/<name>.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = make_bench_models()
    t5_path = models / "text_encoders" / T5_FILE
    stamp = t5_path.with_suffix(".init")
    if not t5_path.exists() or not stamp.exists() or stamp.read_text() != T5_INIT:
        print("writing a full-size random T5-XXL encoder (9.5 GB fp16) ...", flush=True)
        write_random_t5_xxl(t5_path)
        stamp.write_text(T5_INIT)
    out_dir = REPO / "bench_results"
    out_dir.mkdir(exist_ok=True)
    results = {"torch": torch.__version__, "threads": 2, "size": 1024, "steps": 4, "modes": []}
    results["dit_bytes"] = dit_bytes()
    print("DiT weight bytes:", results["dit_bytes"], flush=True)
    for mode in args.modes.split(","):
        print(f"--- {mode}: full PixArt-δ graph at 1024 px ...", flush=True)
        row = run_mode(models, mode, out_dir)
        results["modes"].append(row)
        print({k: v for k, v in row.items() if k not in ("rss_timeline", "log_lines")}, flush=True)
        save_results(args.name, results)
    if not args.no_t5_quality:
        print("--- T5-XXL int8 vs fp32 (in this process, no server) ...", flush=True)
        results["t5_xxl"] = t5_quality_and_bytes(t5_path)
        print(results["t5_xxl"], flush=True)
    save_results(args.name, results)


if __name__ == "__main__":
    main()
