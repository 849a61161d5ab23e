"""The one-call GPU check: every shipped workflow through a real ComfyUI v0.33 server on a CUDA machine, at full
size, in one command that fits a lent H100's 9 minutes — and, so that it cannot rot, the same script end to end
on the CPU with tiny models (tests/test_gpu_check.py runs that).

    # 1. here (the network reaches PyPI): gather what a bare CUDA machine lacks into a git-ignored folder
    .venv/bin/python tests/benchmarks/gpu_check.py --pack .comfy_host/gpu_pack
    # 2. on the lent machine (device `run`, carry [".comfy_host/gpu_pack"], Python 3.12 + PyTorch/CUDA there):
    PYTHONUNBUFFERED=1 python3 tests/benchmarks/gpu_check.py --run --pack .comfy_host/gpu_pack --out $OUT
    # the CPU rehearsal (a test): tiny embedded checkpoints, tiny sizes, 1 step
    .venv/bin/python tests/benchmarks/gpu_check.py --run --device cpu --tiny --out /tmp/gpu_check

What --run measures (JSON in --out/gpu_check.json, the log beside it, one short table printed last):
- every workflows/api/*.json as shipped (size, steps), once per weight option its loaders offer: fp16 and bf16
  (our loaders' `weight_dtype`), int8 and fp8_e4m3fn where the loaders take them (core's UNETLoader: its
  default and fp8_e4m3fn); each run: completed or not, image shape == the graph's size, all values finite
  (read before SaveImage rounds them), wall time, peak VRAM (torch.cuda.max_memory_allocated in the server);
- the PixArt-δ 1024 px 4-step LCM graph warm (sampler + VAE decode, models loaded) beside the paper's 0.5 s
  on an A100;
- seconds per sampling step of our PixArt-α 512, DiT4SR and EasyControl-on-FLUX beside core's native PixArt,
  SD3.5-medium and FLUX at the same latent size and CFG, in the same server: (t(s2) − t(s1)) / (s2 − s1) of two
  warm runs that differ only in their step count (loading, text encoding and VAE decode cancel);
- ControlAR image tokens per second (a warm re-run with another seed);
- the LCM schedule-leak check (core issue 16490; under v0.33's dynamic VRAM on NVIDIA): base → ModelSampling-
  Discrete(lcm, zsnr) → base on one loaded checkpoint gives the first latent again, bit for bit;
- a low-VRAM server (v0.33: `--disable-dynamic-vram --lowvram`; dynamic VRAM ignores --lowvram) running the
  PixArt-δ ControlNet and DiT4SR graphs: completed, time, peak VRAM.
A time budget (--budget-s, default 540 s on CUDA) skips what would not fit and says so.

Weights: on CUDA, full-size random weights in the released layouts, drawn on the GPU and written to --models
(default /dev/shm when it has room, else a temp folder): the tensor names and shapes come from the kernels'
configs of the released models and are checked against ../shared/manifests (carried in the pack). Core's
CLIP / T5 text encoders of the FLUX and SD3 graphs are replaced by tests/host_probe's conditioning stand-ins
(as the API tests and bench_graph_sizes.py do: their speed is core's, not ours); our T5 loaders run the full
T5-XXL / FLAN-T5-XL.

Shared helpers: graph preparation and reading (`prepared`, `ids`, `shipped_size`, `at_size`, `classify`, `machine`)
are imported from bench_graph_sizes.py, which runs every shipped graph through a server for peak RSS; the
checkpoint makers and input pictures from tests/make_*checkpoints.py.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows" / "api"
LATENT_NODE = "30"
GIB = 2 ** 30
MIB = 2 ** 20


def _importable_pack():
    """Make `dit_control` importable where no .venv links it (a bare device machine): a link to this checkout in
    a temp folder on sys.path (never the repository root itself: our kernels/ would shadow Hugging Face's)."""
    try:
        import dit_control  # noqa: F401
        return None
    except ImportError:
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / "dit_control_pack_link"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / "dit_control"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(folder))
        return folder


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    PACK_LINK = _importable_pack()
else:
    PACK_LINK = None


# ---------------------------------------------------------------------------------------------------------------
#                                   the pack: what a bare CUDA machine lacks
# ---------------------------------------------------------------------------------------------------------------
# The lent machines' image (../.library device KINDS.md, read 2026-11-17): Python 3.12, torch 2.11 + CUDA 13,
# numpy, pillow, safetensors, transformers, tokenizers, sentencepiece, einops, aiohttp, yarl, pyyaml, scipy,
# psutil, requests, opencv ... Of ComfyUI v0.33's and our imports it lacks these (found by starting v0.33 with
# this pack on a sys.path holding only the image's packages: tests/test_gpu_check.py repeats that start).
# Pure Python: their installed files are copied from .venv (they run on any Python 3).
# The image's packages as KINDS.md lists them (tests/test_gpu_check.py starts v0.33 on these plus the pack):
DEVICE_IMAGE_PACKAGES = tuple("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer
click cloudpickle contourpy cycler einops filelock fonttools frozenlist fsspec h11 hf-xet httpcore httpx
huggingface-hub idna imageio jinja2 joblib kiwisolver lazy-loader markdown markdown-it-py markupsafe matplotlib mdurl
mpmath multidict networkx numpy nvidia-ml-py opencv-python-headless packaging pandas pillow pip pluggy propcache
protobuf psutil pygments pyparsing pytest python-dateutil pyyaml regex requests rich safetensors scikit-image
scikit-learn scipy sentencepiece setuptools six sympy threadpoolctl tifffile tiktoken tokenizers torch torchaudio
torchvision tqdm transformers triton typing-extensions urllib3 wheel yarl zipp""".split())
PACK_COPIED = ("SQLAlchemy", "alembic", "Mako", "torchsde", "trampoline", "simpleeval", "comfy-aimdo",
               "comfy-kitchen", "pydantic", "pydantic-settings", "annotated-types", "typing-inspection",
               "python-dotenv")
# SQLAlchemy, comfy-kitchen: their compiled parts are .cpython-311 files that Python 3.12 would not load; both run
# without them (SQLAlchemy's pure fallback; comfy-kitchen's eager/triton backends). comfy-aimdo's library is
# loaded with ctypes (any Python). Version-specific compiled packages need a wheel for the device's Python:
PACK_WHEELS = ("pydantic_core",)
DEVICE_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Left out on purpose: PyAV (~40 MB of FFmpeg; comfy_api imports it at module level, no image graph calls it:
# a stand-in module that raises on use), the frontend (~85 MB; `--front-end-root` an empty folder), workflow
# templates and docs, bitsandbytes (~125 MB; int8 then takes its torch._int_mm / dequantise routes), kornia,
# spandrel, blake3 (only core nodes our graphs do not use import them).
AV_STAND_IN = '''"""Stand-in for PyAV in the GPU check's pack: ComfyUI imports `av` at module level for its video types;
the image graphs never call it. Any use raises."""
import importlib.abc
import importlib.machinery
import sys
import types


class _Missing:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not in the GPU check's pack: video nodes cannot run here")

    def __class_getitem__(cls, item):
        return cls


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        missing = type(name, (_Missing,), {"__module__": self.__name__})
        setattr(self, name, missing)
        return missing

    def open(self, *args, **kwargs):
        raise RuntimeError("PyAV is not in the GPU check's pack: video nodes cannot run here")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True) if fullname.startswith("av.") else None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StandIn
'''
TREE_NAME = "comfyui-v0.33.0.tar.gz"
TREE_SKIPPED = ("tests", "tests-unit", "blueprints", ".git", ".github", "script_examples")
MANIFESTS_NAME = "manifests.tar.gz"
TRANSFER_LIMIT = 64 * MIB       # what one device call may carry: the checkout's tracked files plus the pack


def copy_distribution(name: str, site: Path) -> int:
    """The installed files of a distribution, without byte code and version-specific extensions; bytes copied."""
    import importlib.metadata as md
    dist = md.distribution(name)
    copied = 0
    for f in dist.files or []:
        rel = str(f)
        if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc") \
                or re.search(r"\.cpython-\d+[^/]*\.so$", rel):
            continue
        src = Path(dist.locate_file(f))
        if src.is_file():
            dst = site / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied += src.stat().st_size
    return copied


def tracked_bytes() -> int:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def pack(dest: Path, download: bool = True, manifests: Path | None = None) -> dict:
    """Gather into `dest` what --run needs on a bare CUDA machine; refuses a pack that would not travel."""
    import importlib.metadata as md

    from dit_control.tests.comfy_host import comfy_dir
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    site = dest / "site"
    site.mkdir(parents=True)
    info = {"device_python": DEVICE_PYTHON, "copied": {}, "wheels": [], "left_out": []}
    for name in PACK_COPIED:
        copy_distribution(name, site)
        info["copied"][name] = md.version(name)
    (site / "av").mkdir()
    (site / "av" / "__init__.py").write_text(AV_STAND_IN)
    wheels = dest / "wheels"
    wheels.mkdir()
    for name in PACK_WHEELS:
        spec = f"{name}=={md.version(name)}"
        if not download:
            info["left_out"].append(f"{spec} (no download asked: the device must have it)")
            continue
        platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(wheels),
                        spec], check=True)
        info["wheels"] += sorted(p.name for p in wheels.glob("*.whl"))
    tree = comfy_dir("0.33")
    with tarfile.open(dest / TREE_NAME, "w:gz", compresslevel=9) as tar:
        tar.add(tree, arcname="comfyui", filter=lambda t: None if (
            "__pycache__" in t.name or Path(t.name).parts[1:2] and Path(t.name).parts[1] in TREE_SKIPPED) else t)
    src = Path(manifests or REPO.parent / "shared" / "manifests")
    with tarfile.open(dest / MANIFESTS_NAME, "w:gz", compresslevel=9) as tar:
        for rel in sorted({m for f in full_size_plan() for m in f.get("manifests", ())}):
            tar.add(src / rel, arcname=rel)
    info["pack_bytes"] = folder_bytes(dest)
    info["checkout_bytes"] = tracked_bytes()
    total = info["pack_bytes"] + info["checkout_bytes"]
    (dest / "PACK.json").write_text(json.dumps(info, indent=1))
    if total > TRANSFER_LIMIT:
        raise SystemExit(f"the pack ({info['pack_bytes'] / MIB:.1f} MiB) and the checkout "
                         f"({info['checkout_bytes'] / MIB:.1f} MiB) are {total / MIB:.1f} MiB: over the "
                         f"{TRANSFER_LIMIT / MIB:.0f} MiB one device call carries")
    return info


def unpack(pack_dir: Path) -> dict:
    """On the device: the v0.33 tree where tests/comfy_host.py looks for it, the manifests, the wheels installed
    into the pack; returns the PYTHONPATH entries the check and its servers need."""
    from dit_control.tests.comfy_host import comfy_dir
    pack_dir = Path(pack_dir)
    tree = comfy_dir("0.33")
    if not (tree / "main.py").exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(pack_dir / TREE_NAME) as tar:
            tar.extractall(tree.parent)
    manifests = pack_dir / "manifests"
    if not manifests.exists():
        with tarfile.open(pack_dir / MANIFESTS_NAME) as tar:
            tar.extractall(manifests)
    binary = pack_dir / "site_bin"
    whl = sorted((pack_dir / "wheels").glob("*.whl"))
    if whl and not binary.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--no-compile", "--target", str(binary), *map(str, whl)], check=True)
    return {"paths": [str(p) for p in (binary, pack_dir / "site") if p.exists()], "manifests": manifests}


def use_device_environment(paths: list):
    """Servers started from here use this interpreter and see the pack (no .venv on a lent machine)."""
    from dit_control.tests import comfy_host
    if not comfy_host.PYTHON.exists():
        comfy_host.PYTHON = Path(sys.executable)
    extra = [*paths, *([str(PACK_LINK)] if PACK_LINK else [])]
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join([*extra, *filter(None, [os.environ.get("PYTHONPATH")])])


# ---------------------------------------------------------------------------------------------------------------
#                       full-size random weights in the released layouts (drawn on the device)
# ---------------------------------------------------------------------------------------------------------------

def full_size_plan() -> list:
    """The files the shipped workflows name, at the released models' sizes: path, tensor shapes (from our
    kernels' configs of the released models), dtype per tensor, file format, and the manifests the shapes are
    checked against. Shapes only: nothing is allocated here."""
    import torch

    from dit_control.kernels.controlar.checkpoint import gpt_expected_shapes, vq_expected_shapes
    from dit_control.kernels.controlar.dinov2 import Dinov2Config
    from dit_control.kernels.controlar.gpt import GPTConfig
    from dit_control.kernels.controlar.vq import VQConfig
    from dit_control.kernels.dit4sr.model import DiT4SRConfig
    from dit_control.kernels.flux_easycontrol.checkpoint import expected_shapes as flux_shapes
    from dit_control.kernels.flux_easycontrol.model import FluxConfig
    from dit_control.kernels.pixart.checkpoint import expected_shapes as pixart_shapes
    from dit_control.kernels.pixart.controlnet import controlnet_expected_shapes
    from dit_control.kernels.pixart.model import PixArtConfig
    from dit_control.kernels.t5 import T5Config, t5_expected_shapes
    from dit_control.tests.generators.make_dit4sr_checkpoints import (
        DIT4SR_FOLDER,
        diffusers_config,
        dit4sr_shapes,
        released_dtype,
    )

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    pixart_512 = PixArtConfig(sample_size=64, pe_interpolation=1.0, micro_condition=False)
    pixart_1024 = PixArtConfig()
    lcm = PixArtConfig(null_caption=False)
    flan = T5Config(vocab_size=32128, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24)
    dit4sr = DiT4SRConfig()

    def keyed(shapes: dict) -> dict:
        return {k: tuple(v) for k, v in shapes.items()}

    def with_pos_embed(cfg, shapes):
        grid = cfg.sample_size // cfg.patch_size
        return {"pos_embed": (1, grid * grid, cfg.hidden_size), **shapes}

    # dtypes: as released, except the fp32 releases of PixArt (.pth), the PixArt ControlNet / RelaCtrl files and
    # ControlAR, written in fp16 (same names, shapes and containers; half the ~60 GB to write in the 9 minutes)
    plan = [
        {"path": "diffusion_models/PixArt-XL-2-512x512.pth", "format": "pth", "wrapper": "state_dict",
         "shapes": keyed(with_pos_embed(pixart_512, pixart_shapes(pixart_512))), "dtype": f16,
         "manifests": ["pixart/pixart_xl2_512_orig.json"]},
        {"path": "diffusion_models/PixArt-LCM-XL-2-1024-MS/transformer/diffusion_pytorch_model.safetensors",
         "format": "safetensors", "layout": "pixart_diffusers", "config": lcm,
         "shapes": None, "dtype": f16, "manifests": ["pixart/pixart_lcm_xl2_1024_ms_diffusers.json"]},
        {"path": "controlnet/PixArt-XL-2-1024-ControlNet.pth", "format": "pth", "wrapper": "state_dict",
         "shapes": {**{f"base_model.{k}": v
                       for k, v in keyed(with_pos_embed(pixart_1024, pixart_shapes(pixart_1024))).items()},
                    **keyed(controlnet_expected_shapes(13, pixart_1024))},       # names start "controlnet."
         "dtype": f16, "manifests": ["pixart/pixart_xl2_1024_controlnet_orig.json"]},
        {"path": "controlnet/relactrl_pixart_canny_1024.pth", "format": "relactrl", "dtype": f16, "manifests": []},
        {"path": "text_encoders/t5xxl_fp16.safetensors", "format": "safetensors",
         "shapes": {k: tuple(v) for k, v in t5_expected_shapes(T5Config.xxl()).items()
                    if k != "encoder.embed_tokens.weight"},
         "dtype": f16, "manifests": []},
        {"path": "text_encoders/flan-t5-xl", "format": "t5_shards",
         "shapes": {k: tuple(v) for k, v in t5_expected_shapes(flan).items() if k != "encoder.embed_tokens.weight"},
         "dtype": f16, "manifests": []},
        {"path": "diffusion_models/flux1-dev.safetensors", "format": "safetensors",
         "shapes": keyed(flux_shapes(FluxConfig())), "dtype": bf16,
         "manifests": ["flux_easycontrol/flux1dev_comfy_native_transformer.json"]},
        {"path": f"diffusion_models/{DIT4SR_FOLDER}/diffusion_pytorch_model.safetensors", "format": "safetensors",
         "shapes": keyed(dit4sr_shapes(dit4sr)), "dtype": released_dtype, "config_json": diffusers_config(dit4sr),
         "manifests": []},
        {"path": "diffusion_models/sd3.5_medium.safetensors", "format": "safetensors", "layout": "sd35_native",
         "shapes": None, "dtype": f16, "manifests": ["sd3_dit4sr/sd35_medium_comfy_native_mmdit.json"]},
        {"path": "controlar/canny_MR.safetensors", "format": "safetensors",
         "shapes": keyed(gpt_expected_shapes(GPTConfig(block_size=2304, control=Dinov2Config()))), "dtype": f16,
         "manifests": ["controlar/controlar_t2i_XL_dinov2s_768_MR.json"]},
        {"path": "controlar/hed.safetensors", "format": "safetensors",
         "shapes": keyed(gpt_expected_shapes(GPTConfig(block_size=1024, control=Dinov2Config()))), "dtype": f16,
         "manifests": ["controlar/controlar_t2i_XL_dinov2s_512.json"]},
        {"path": "controlar/vq_ds16_t2i.pt", "format": "pth", "wrapper": "model",
         "shapes": keyed(vq_expected_shapes(VQConfig())), "dtype": f32, "manifests": ["controlar/vq16.json"]},
        # small files: the existing full-size makers (CPU), as the tiny set already uses them
        {"path": "vae/sd-vae-ft-ema.safetensors", "format": "maker", "maker": "save_random_sd_vae", "manifests": []},
        {"path": "vae/ae.safetensors", "format": "maker", "maker": "save_random_flux_vae", "manifests": []},
        {"path": "vae/sd3.5_vae.safetensors", "format": "maker", "maker": "save_random_sd3_vae", "manifests": []},
        {"path": "annotators/ControlNetHED.pth", "format": "maker", "maker": "save_random_hed", "manifests": []},
        {"path": "loras/canny.safetensors", "format": "lora", "manifests": ["flux_easycontrol/easycontrol_canny.json"]},
        {"path": "loras/subject.safetensors", "format": "lora",
         "manifests": ["flux_easycontrol/easycontrol_subject.json"]},
    ]
    for entry in plan:
        if entry.get("layout") == "pixart_diffusers":
            from dit_control.kernels.pixart.checkpoint import original_to_diffusers, to_diffusers_config
            with torch.device("meta"):
                meta = {k: torch.empty(v) for k, v in pixart_shapes(entry["config"]).items()}
            entry["shapes"] = {k: tuple(v.shape) for k, v in original_to_diffusers(meta).items()}
            entry["config_json"] = to_diffusers_config(entry["config"])
    return plan


def manifest_shapes(manifests: Path, rel: str) -> dict:
    data = json.loads((Path(manifests) / rel).read_text())
    tensors = data.get("tensors") or data.get("params")
    return {k: tuple(v["shape"] if isinstance(v, dict) else v) for k, v in tensors.items()}


def check_plan_against_manifests(plan: list, manifests: Path) -> list:
    """[(file, manifest, what differs)] for every planned file whose shapes differ from its release's manifest
    (an SD3.5 manifest has the native layout the plan takes from it: nothing to compare)."""
    problems = []
    for entry in plan:
        for rel in entry.get("manifests", ()):
            if entry.get("shapes") is None or entry["format"] == "lora":
                continue
            want = manifest_shapes(manifests, rel)
            got = entry["shapes"]
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            wrong = sorted(k for k in set(want) & set(got) if tuple(want[k]) != tuple(got[k]))
            if missing or extra or wrong:
                problems.append((entry["path"], rel, {"missing": missing[:5], "extra": extra[:5], "shape": wrong[:5]}))
    return problems


def draw(name: str, shape: tuple, dtype, device, gen):
    """A random tensor for a weight of this name: matrices ~ N(0, 1/fan_in), norm scales ~1, biases small,
    embedding tables N(0, 1) — the rule of tests/make_checkpoints.py's makers, drawn on `device`."""
    import torch
    if len(shape) <= 1:
        if "norm" in name and name.endswith(("weight", "scale")):
            t = 1.0 + 0.05 * torch.randn(shape, generator=gen, device=device)
        else:
            t = 0.02 * torch.randn(shape, generator=gen, device=device)
    elif "embed" in name and len(shape) == 2 and ("token" in name or "shared" in name or "embedding" in name):
        t = torch.randn(shape, generator=gen, device=device)
    else:
        fan_in = 1
        for n in shape[1:]:
            fan_in *= n
        t = torch.randn(shape, generator=gen, device=device) * fan_in ** -0.5
    return t.to(dtype)


def write_file(entry: dict, models: Path, device, manifests: Path, seed: int):
    """One planned file, drawn on `device`, written in its release's format."""
    import safetensors.torch
    import torch

    from dit_control.tests.generators import make_checkpoints as mk
    path = models / entry["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = entry["format"]
    if fmt == "maker":
        maker = mk if hasattr(mk, entry["maker"]) else \
            importlib.import_module("dit_control.tests.generators.make_dit4sr_checkpoints")
        getattr(maker, entry["maker"])(path, seed=seed)
        return
    if fmt == "lora":
        data = json.loads((manifests / entry["manifests"][0]).read_text())
        mk.save_easycontrol_lora(path, seed=seed, rank=int(data["rank"]), double_blocks=19, single_blocks=38)
        return
    if fmt == "relactrl":
        from dit_control.kernels.pixart.model import PixArtConfig
        from dit_control.tests.generators.make_relactrl_checkpoints import _save, relactrl_state_dict
        sd = relactrl_state_dict(seed=seed, base_cfg=PixArtConfig())
        _save(path, {k: v.to(entry["dtype"]) for k, v in sd.items()})
        return
    shapes = entry["shapes"] if entry["shapes"] is not None else manifest_shapes(manifests, entry["manifests"][0])
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype_of = entry["dtype"] if callable(entry["dtype"]) else (lambda name, d=entry["dtype"]: d)
    sd = {k: draw(k, v, dtype_of(k), device, gen).cpu() for k, v in shapes.items()}
    if fmt == "pth":
        torch.save({entry["wrapper"]: sd}, path)
    elif fmt == "safetensors":
        safetensors.torch.save_file(sd, str(path))
    elif fmt == "t5_shards":
        single = path.parent / f".{path.name}-single.safetensors"
        safetensors.torch.save_file(sd, str(single))
        mk.shard_t5(single, path)
        single.unlink()
    if "config_json" in entry:
        (path.parent / "config.json").write_text(json.dumps(entry["config_json"], indent=1))


def make_full_size(models: Path, device, manifests: Path, log) -> Path:
    """Every planned file (kept between runs on the same machine: a stamp per file)."""
    import torch
    plan = full_size_plan()
    problems = check_plan_against_manifests(plan, manifests)
    if problems:
        raise SystemExit(f"the full-size layouts differ from the released manifests: {problems}")
    for i, entry in enumerate(plan):
        stamp = models / ".stamps" / (entry["path"].replace("/", "_") + ".done")
        if stamp.exists():
            continue
        t0 = time.time()
        write_file(entry, models, device, manifests, seed=100 + i)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text("ok")
        log(f"made {entry['path']} in {time.time() - t0:.1f} s")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # the DualCLIPLoader / TripleCLIPLoader names of the shipped graphs: placeholders (stand-ins run instead)
    import safetensors.torch
    for name in ("clip_l.safetensors", "clip_g.safetensors"):
        p = models / "text_encoders" / name
        if not p.exists():
            safetensors.torch.save_file({"placeholder": torch.zeros(1)}, str(p))
    return models


# ---------------------------------------------------------------------------------------------------------------
#                                               graphs
# ---------------------------------------------------------------------------------------------------------------

def lcm_leak_graphs(width: int, height: int, prefix: str) -> list:
    """[base, ModelSamplingDiscrete(lcm, zsnr)-patched, base again]: the shipped PixArt-δ LCM graph (PixArt DiT
    Loader -> our LCM Scheduler / Sampler in SamplerCustom) at this size, saving its latent as node 30 instead
    of decoding it. The three share the loader's inputs, so one server runs them on one loaded checkpoint;
    a nonce pass-through (tests/host_probe) before the sampler makes the third run sample again instead of
    answering from the cache. Core issue 16490: under dynamic VRAM the patch's schedule leaked into later
    runs of the same checkpoint."""
    def graph(patched: bool, nonce: int) -> dict:
        g = json.loads((WORKFLOWS / "pixart_delta_lcm_t2i.json").read_text())
        for k in ("9", "10", "11"):
            del g[k]
        g["5"]["inputs"].update(width=width, height=height)
        g["40"] = {"class_type": "DiTControlProbe_LatentPassthrough", "inputs": {"samples": ["5", 0], "nonce": nonce}}
        g["8"]["inputs"]["latent_image"] = ["40", 0]
        if patched:
            g["41"] = {"class_type": "ModelSamplingDiscrete",
                       "inputs": {"model": ["1", 0], "sampling": "lcm", "zsnr": True}}
            g["6"]["inputs"]["model"] = g["8"]["inputs"]["model"] = ["41", 0]
        g[LATENT_NODE] = {"class_type": "SaveLatent",
                          "inputs": {"samples": ["8", 0],
                                     "filename_prefix": f"{prefix}/{'lcm' if patched else 'base'}_{nonce}"}}
        return g
    return [graph(False, 1), graph(True, 2), graph(False, 3)]


WEIGHT_OPTIONS = ("fp16", "bf16", "int8", "fp8_e4m3fn")
CORE_UNET_OPTION = {"fp16": "default", "bf16": "default", "int8": "default", "fp8_e4m3fn": "fp8_e4m3fn"}
SAMPLER_NODES = ("KSampler", "DiTControl_LCMScheduler")
# tiny sizes of the CPU rehearsal: the graph's own aspect, this many pixels on the long side
TINY_SIDE = 128


def with_weights(g: dict, option: str) -> dict:
    """Every loader's weight choice set to `option` (core's UNETLoader: its nearest one)."""
    for node in g.values():
        if "weight_dtype" in node["inputs"]:
            node["inputs"]["weight_dtype"] = (CORE_UNET_OPTION[option] if node["class_type"] == "UNETLoader"
                                              else option)
    return g


def with_steps(g: dict, steps: int) -> dict:
    from dit_control.tests.benchmarks.bench_graph_sizes import ids
    for k in ids(g, "KSampler") + ids(g, "DiTControl_LCMScheduler"):
        g[k]["inputs"]["steps"] = steps
    return g


def reseeded(g: dict, seed: int) -> dict:
    """Another noise seed: core runs the sampler (and what follows) again, the loaders stay cached."""
    for node in g.values():
        for key in ("seed", "noise_seed"):
            if key in node["inputs"] and node["class_type"] != "DiTControl_RelaCtrlCheckpointLoader":
                node["inputs"][key] = seed
    return g


def with_image_stats(g: dict) -> dict:
    """A DiTControlProbe_ImageStats beside each SaveImage (node ids 9xx), reading the same IMAGE."""
    from dit_control.tests.benchmarks.bench_graph_sizes import ids
    for k in ids(g, "SaveImage"):
        g[f"9{k}"] = {"class_type": "DiTControlProbe_ImageStats", "inputs": {"images": g[k]["inputs"]["images"]}}
    return g


def tiny(g: dict) -> dict:
    """The CPU rehearsal's sizes: the graph's size scaled to TINY_SIDE on its long side (multiples of 64); DiT4SR's
    small input photo (40 x 32) and least upscaled size; EasyControl's least condition size; the FLUX / SD3
    text stand-ins at 8 tokens. The same nodes run; only the sizes are the CPU's."""
    from dit_control.tests.benchmarks.bench_graph_sizes import at_size, ids, shipped_size
    for k in ids(g, "DiTControl_DiT4SRConditioning"):
        g[k]["inputs"]["min_short_side"] = 64
    for k in ids(g, "LoadImage"):
        if g[k]["inputs"]["image"] == "dit4sr_input.png":
            g[k]["inputs"]["image"] = "dit4sr_input_small.png"
    for k in ids(g, "DiTControl_ApplyEasyControl"):
        g[k]["inputs"]["condition_size"] = 64
    for node in g.values():
        if node["class_type"].endswith("ConditioningStandIn"):
            node["inputs"]["tokens"] = 8
    size = shipped_size(g)
    if size is None:
        return g
    scale = TINY_SIDE / max(size)
    return at_size(g, tuple(max(64, int(round(s * scale / 64)) * 64) for s in size))


def expected_image_size(g: dict):
    """(height, width) the graph's images must have, or None where the input photo sets it (DiT4SR)."""
    from dit_control.tests.benchmarks.bench_graph_sizes import shipped_size
    size = shipped_size(g)
    return None if size is None else (size[1], size[0])


def core_native_graphs(name: str, g: dict, models_tiny: bool) -> dict | None:
    """Core's own model at the same latent size and sampler settings as our graph `name` (for the per-step
    comparison), conditioned by the stand-ins; None where there is no peer."""
    from dit_control.tests.benchmarks.bench_graph_sizes import ids, shipped_size
    (ks,) = ids(g, "KSampler")
    sampler = dict(g[ks]["inputs"])
    if name == "pixart_alpha_t2i":
        # core's UNETLoader reads the released PixArt .pth (the same file our loader reads); core's detection
        # takes PixArt at its released width only (1152), so the tiny micro model has no core peer
        unet = None if models_tiny else "PixArt-XL-2-512x512.pth"
        latent, tokens, stand_in = "EmptyLatentImage", 120, "Flux"
    elif name == "dit4sr_upscale_x4":
        unet = None if models_tiny else "sd3.5_medium.safetensors"
        latent, tokens, stand_in = "EmptySD3LatentImage", 154, "SD3"
    elif name == "easycontrol_canny":
        core = json.loads(json.dumps(g))
        for k in ids(core, "DiTControl_ApplyEasyControl") + ids(core, "DiTControl_EasyControlLoRALoader"):
            del core[k]
        (msf,) = ids(core, "ModelSamplingFlux")
        core[msf]["inputs"]["model"] = [ids(core, "UNETLoader")[0], 0]
        return core
    else:
        return None
    if unet is None:
        return None
    size = shipped_size(g) or (512, 512)
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": f"DiTControlProbe_{stand_in}ConditioningStandIn",
              "inputs": {"text": "a photo", "tokens": tokens}},
        "3": {"class_type": f"DiTControlProbe_{stand_in}ConditioningStandIn", "inputs": {"text": "", "tokens": tokens}},
        "4": {"class_type": latent, "inputs": {"width": size[0], "height": size[1], "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {**{k: v for k, v in sampler.items() if not isinstance(v, list)},
                                                   "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0]}},
        LATENT_NODE: {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"native/{name}"}},
    }


# ---------------------------------------------------------------------------------------------------------------
#                                               running
# ---------------------------------------------------------------------------------------------------------------

class Check:
    """One --run: its servers, its rows, its time budget and its log."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.tiny = args.tiny
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.budget = args.budget_s
        self.rows = []
        self.timings = {}
        self.skipped = []
        self.nonce = 1000
        self.log_file = open(self.out / "gpu_check.log", "a")

    def log(self, text: str):
        line = f"[{time.time() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.budget - (time.time() - self.started)

    def fits(self, what: str, needs_s: float) -> bool:
        if self.left() >= needs_s:
            return True
        self.skipped.append(f"{what}: {needs_s:.0f} s needed, {max(0, self.left()):.0f} s left")
        self.log(f"skipped {what}: over the time budget")
        return False

    def server(self, models: Path, name: str, extra=()):
        from dit_control.tests.comfy_host import ComfyServer
        from dit_control.tests.generators.make_checkpoints import write_example_inputs
        base = Path(self.args.work) / f"base_{name}"
        fe = base / "frontend"
        fe.mkdir(parents=True, exist_ok=True)   # headless: an empty frontend folder (no frontend package needed)
        server = ComfyServer(models, base_dir=base, probe=True, cpu=self.device == "cpu",
                             extra_args=["--front-end-root", str(fe), *extra],
                             log_path=self.out / f"server_{name}.log").start(timeout=600)
        write_example_inputs(server.base_dir / "input")    # every shipped graph's input pictures
        return server

    def _probe(self, server, class_type: str) -> dict:
        self.nonce += 1
        h = server.run({"1": {"class_type": class_type, "inputs": {"nonce": self.nonce}}})
        return json.loads(h["outputs"]["1"]["text"][0]) if h["status"]["status_str"] == "success" else {}

    def run_graph(self, server, g: dict, timeout: float = 600.0) -> dict:
        """Run one prompt; wall time, peak VRAM, the image statistics, and completed / refused / failed raw."""
        from dit_control.tests.benchmarks.bench_graph_sizes import classify
        from dit_control.tests.comfy_host import PromptRejected
        self._probe(server, "DiTControlProbe_ResetPeakMemory")
        t0 = time.time()
        try:
            history = server.run(g, timeout=timeout)
            result, said = classify(history)
        except PromptRejected as e:
            history, result, said = None, "refused", f"/prompt: {json.dumps(e.body)[:300]}"
        except Exception as e:  # noqa: BLE001 - a dead server or a timeout is a row too
            history, result, said = None, "failed raw", f"{type(e).__name__}: {str(e)[:300]}"
        seconds = time.time() - t0
        peak = self._probe(server, "DiTControlProbe_PeakMemory") if server.proc and server.proc.poll() is None else {}
        stats = []
        if history and result == "completed":
            stats = [json.loads(v["text"][0]) for k, v in sorted(history["outputs"].items())
                     if k.startswith("9") and "text" in v]
        return {"result": result, "said": said, "seconds": round(seconds, 3), "images": stats,
                "peak_vram_gib": round(peak.get("peak_allocated", 0) / GIB, 3), "history": history}

    def graph_row(self, server, workflow: str, option: str, g: dict, label: str = "") -> dict:
        run = self.run_graph(server, g)
        want = expected_image_size(g)
        shapes_ok = bool(run["images"]) and all(s["finite"] for s in run["images"]) and \
            (want is None or all(tuple(s["shape"][1:3]) == want for s in run["images"]))
        row = {"workflow": workflow, "weights": option, "run": label or "shipped", "result": run["result"],
               "images_ok": shapes_ok, "images": run["images"], "expected_hw": want, "seconds": run["seconds"],
               "peak_vram_gib": run["peak_vram_gib"], "said": run["said"]}
        self.rows.append(row)
        self.log(f"{workflow} [{option}{', ' + label if label else ''}]: {row['result']}, images ok {shapes_ok}, "
                 f"{row['seconds']:.2f} s, peak VRAM {row['peak_vram_gib']:.2f} GiB {row['said'][:200]}")
        return row

    def prepared(self, name: str, steps: int | None = None) -> dict:
        from dit_control.tests.benchmarks.bench_graph_sizes import prepared
        g = prepared(name, 1)                               # stand-ins for core's CLIP / T5 loaders
        shipped = json.loads((WORKFLOWS / f"{name}.json").read_text())
        for k in (k for k, v in shipped.items() if v["class_type"] in SAMPLER_NODES):
            g[k]["inputs"]["steps"] = 1 if self.tiny else shipped[k]["inputs"]["steps"]
        if steps is not None:
            with_steps(g, steps)
        if self.tiny:
            tiny(g)
        return with_image_stats(g)

    def step_time(self, server, g: dict, steps: tuple, warm_up: bool) -> float | None:
        """Seconds per sampling step: two warm runs that differ only in the step count (loading, encoding and
        the VAE decode cancel); `warm_up`: a run at the first count first (a graph whose models are not loaded
        yet). The difference of two wall times: with tiny models on a CPU it is noise and can be negative."""
        times = []
        for i, s in enumerate(((steps[0],) if warm_up else ()) + tuple(steps)):
            run = self.run_graph(server, reseeded(with_steps(json.loads(json.dumps(g)), s), 7 + i))
            if run["result"] != "completed":
                self.log(f"per-step run failed: {run['said'][:300]}")
                return None
            times.append(run["seconds"])
        return round((times[-1] - times[-2]) / (steps[1] - steps[0]), 4)


def run_check(args) -> dict:
    import torch

    from dit_control.tests.benchmarks.bench_graph_sizes import machine
    check = Check(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (use --device cpu --tiny for the rehearsal)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from dit_control.tests.generators.make_checkpoints import make_all
        models = make_all(REPO / ".comfy_host" / "models")
    else:
        manifests = Path(args.manifests)
        models = make_full_size(Path(args.models), torch.device(args.device), manifests, check.log)
    check.log(f"models ready in {models}")
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    # the CPU rehearsal: one option per graph, fp16 and bf16 in turn, int8 and fp8 on the LCM graph
    options_of = (lambda i: WEIGHT_OPTIONS) if not args.tiny else (lambda i: (("fp16", "bf16")[i % 2],))
    extra_options = () if not args.tiny else ("int8", "fp8_e4m3fn")
    results = {"machine": machine(), "device": args.device, "tiny": args.tiny, "budget_s": args.budget_s}
    if torch.cuda.is_available() and args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    server = check.server(models, "main")
    try:
        # 1. every shipped graph, every weight option
        used = {}
        for i, name in enumerate(names):
            for option in options_of(i):
                if check.fits(f"{name} [{option}]", 20 if args.device == "cuda" else 5):
                    check.graph_row(server, name, option, with_weights(check.prepared(name), option))
                    used[name] = option
        # the CPU rehearsal runs the int8 / fp8 options on one graph only (they are slow on the CPU)
        for option in extra_options:
            check.graph_row(server, "pixart_delta_lcm_t2i", option,
                            with_weights(check.prepared("pixart_delta_lcm_t2i"), option))
        # 2. the LCM 1024 graph warm, beside the paper's 0.5 s on an A100
        if "pixart_delta_lcm_t2i" in names and check.fits("LCM warm", 10):
            g = with_weights(check.prepared("pixart_delta_lcm_t2i"), "fp16")
            warm = check.run_graph(server, reseeded(g, 4242))
            check.timings["lcm_1024_4step_warm_s"] = warm["seconds"] if warm["result"] == "completed" else None
            check.timings["lcm_paper_a100_s"] = 0.5
            check.log(f"LCM 1024 graph warm: {warm['seconds']:.2f} s ({warm['result']})")
        # 3. seconds per step: ours beside core's native peer
        steps = (1, 2) if args.tiny else (2, 6)
        # (the CPU rehearsal: PixArt and FLUX, whose peer graph core can load at tiny size)
        per_step = ("pixart_alpha_t2i", "easycontrol_canny") if args.tiny else \
            ("pixart_alpha_t2i", "dit4sr_upscale_x4", "easycontrol_canny")
        for name in per_step:
            if name not in names or not check.fits(f"per-step {name}", 30 if args.device == "cuda" else 10):
                continue
            # the weights of its first run (stage 1): its models are loaded, no warm-up run needed
            ours = with_weights(check.prepared(name), used.get(name, "bf16"))
            peer = core_native_graphs(name, ours, args.tiny)
            check.timings[f"step_s_ours_{name}"] = check.step_time(server, ours, steps, warm_up=name not in used)
            # (the rehearsal's numbers are noise: no warm-up run for the peer there, its loaders are ours, cached)
            check.timings[f"step_s_core_{name}"] = \
                check.step_time(server, peer, steps, warm_up=not args.tiny) if peer else None
            check.log(f"s/step {name}: ours {check.timings[f'step_s_ours_{name}']}, "
                      f"core {check.timings[f'step_s_core_{name}']}")
        # 4. ControlAR tokens per second (warm, another seed)
        if "controlar_hed_512" in names and check.fits("ControlAR tokens/s", 20):
            g = check.prepared("controlar_hed_512")
            run = check.run_graph(server, reseeded(g, 99))
            (sampler,) = [v for v in g.values() if v["class_type"] == "DiTControl_ControlARSampler"]
            tokens = (sampler["inputs"]["width"] // 16) * (sampler["inputs"]["height"] // 16)
            check.timings["controlar_tokens_per_s"] = tokens / run["seconds"] if run["result"] == "completed" else None
            check.log(f"ControlAR: {tokens} tokens in {run['seconds']:.2f} s ({run['result']})")
        # 5. the LCM schedule-leak check on one loaded checkpoint
        if check.fits("LCM leak check", 15):
            side = TINY_SIDE if args.tiny else 1024
            runs = [check.run_graph(server, g) for g in lcm_leak_graphs(side, side, "leak")]
            if all(r["result"] == "completed" for r in runs):
                first, patched, again = (server.saved_latent(r["history"], LATENT_NODE) for r in runs)
                results["lcm_leak"] = {"patched_differs": not torch.equal(patched, first),
                                       "base_again_bit_equal": torch.equal(again, first)}
            else:
                results["lcm_leak"] = {"failed": [r["said"] for r in runs if r["result"] != "completed"]}
            check.log(f"LCM leak check: {results['lcm_leak']}")
    finally:
        server.stop()
    # 6. low VRAM: the ControlNet and DiT4SR graphs on a server that keeps less on the GPU
    # v0.33's dynamic VRAM ignores --lowvram: off first. On the CPU (the rehearsal) ComfyUI refuses --lowvram
    # beside --cpu: the second server then runs with dynamic VRAM off only.
    from dit_control.tests.comfy_host import host_name
    low = (["--disable-dynamic-vram"] if host_name() == "0.33" else []) + \
        (["--lowvram"] if args.device == "cuda" else [])
    lowvram_names = [n for n in ("pixart_delta_controlnet", "dit4sr_upscale_x4") if n in names]
    if lowvram_names and check.fits("low-VRAM server", 60 if args.device == "cuda" else 15):
        server = check.server(models, "lowvram", extra=low)
        try:
            for name in lowvram_names:
                check.graph_row(server, name, "fp16", with_weights(check.prepared(name), "fp16"), label="lowvram")
        finally:
            server.stop()
    results.update(rows=check.rows, timings=check.timings, skipped=check.skipped,
                   seconds=round(time.time() - check.started, 1))
    (check.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(table(results), flush=True)
    return results


def _fmt(v, unit="", digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}{unit}"


def table(results: dict) -> str:
    """The short table printed last: one line per graph row, then the timings."""
    lines = [f"GPU check on {results.get('gpu', results['device'])} ({'tiny' if results['tiny'] else 'full size'}), "
             f"{results['seconds']} s", "| workflow | weights | run | result | images ok | s | peak VRAM GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['workflow']} | {r['weights']} | {r['run']} | {r['result']} | {r['images_ok']} | "
                     f"{r['seconds']:.2f} | {r['peak_vram_gib']:.2f} |")
    t = results["timings"]
    lines.append(f"LCM 1024 4-step warm: {_fmt(t.get('lcm_1024_4step_warm_s'), ' s')} (paper: 0.5 s on an A100)")
    for name, peer in (("pixart_alpha_t2i", "native PixArt"), ("dit4sr_upscale_x4", "native SD3.5-medium"),
                       ("easycontrol_canny", "native FLUX")):
        lines.append(f"s/step {name}: ours {_fmt(t.get('step_s_ours_' + name))} | {peer} "
                     f"{_fmt(t.get('step_s_core_' + name))}")
    lines.append(f"ControlAR tokens/s: {_fmt(t.get('controlar_tokens_per_s'), digits=1)}")
    lines.append(f"LCM leak check: {results.get('lcm_leak', 'not run')}")
    if results["skipped"]:
        lines.append(f"skipped (time budget): {'; '.join(results['skipped'])}")
    return "\n".join(lines)


def default_models_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 60 * GIB:
        return shm / "dit_control_gpu_check"
    return Path(os.environ.get("TMPDIR", "/tmp")) / "dit_control_gpu_check"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", type=Path, help="--run: read the pack here; alone: gather the pack here")
    parser.add_argument("--no-download", action="store_true", help="--pack: fetch no binary wheel (PACK_WHEELS)")
    parser.add_argument("--run", action="store_true")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny checkpoints, tiny sizes, 1 step")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "gpu_check")
    parser.add_argument("--models", type=Path, default=None, help="where the full-size weights are made")
    parser.add_argument("--manifests", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="the servers' base folders")
    parser.add_argument("--only", default="", help="comma-separated workflow names")
    parser.add_argument("--budget-s", type=float, default=None)
    args = parser.parse_args(argv)
    # a stopped check (timeout, device limit) still stops its servers: SIGTERM runs the finally blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.run:
        if args.pack is None:
            parser.error("--pack DIR or --run")
        info = pack(args.pack, download=not args.no_download)
        print(json.dumps(info, indent=1))
        return info
    if args.pack is not None:
        unpacked = unpack(args.pack)
        use_device_environment(unpacked["paths"])
        args.manifests = args.manifests or unpacked["manifests"]
    args.manifests = args.manifests or REPO.parent / "shared" / "manifests"
    args.models = args.models or default_models_dir()
    args.work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "dit_control_gpu_check_work"
    args.budget_s = args.budget_s or (540.0 if args.device == "cuda" else 3600.0)
    if args.tiny and args.device == "cuda":
        parser.error("--tiny is the CPU rehearsal: use it with --device cpu")
    return run_check(args)


if __name__ == "__main__":
    main()
