"""tests/benchmarks/gpu_check.py, the one-call GPU check, kept from rotting on a machine without a GPU:

- its CPU rehearsal (`--run --device cpu --tiny`) runs end to end: every shipped workflow completes with finite
  images of the graph's size, the timings, the LCM schedule-leak check and the low-VRAM server all report, and
  the short table comes last;
- the full-size weights it would draw on the GPU have the released layouts (our kernels' configs of the released
  models against ../shared/manifests, tensor for tensor; nothing is allocated);
- its pack fits one device call and is enough: ComfyUI v0.33 starts and runs our LCM graph with nothing on its
  path but the lent machine's image packages (KINDS.md's list, from .venv) and the pack.
"""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from dit_control.tests.benchmarks import gpu_check
from dit_control.tests.comfy_host import PYTHON, REPO

SCRIPT = REPO / "tests" / "benchmarks" / "gpu_check.py"


# Every section of the check, each on the graph it needs — one per family (the API tests run all eleven graphs
# through the same server code; the rehearsal's job is the check's own code): the LCM graph (int8 / fp8 options,
# the warm 1024 timing, the leak check), PixArt-α and EasyControl (per-step times beside core's peers), ControlAR
# (tokens per second), the ControlNet and DiT4SR graphs (the low-VRAM server).
REHEARSED = ("pixart_delta_lcm_t2i", "pixart_alpha_t2i", "easycontrol_canny", "controlar_hed_512",
             "pixart_delta_controlnet", "dit4sr_upscale_x4")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([str(PYTHON), str(SCRIPT), "--run", "--device", "cpu", "--tiny", "--out", str(out),
                           "--work", str(out / "work"), "--only", ",".join(REHEARSED)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_cpu_rehearsal_runs_every_shipped_graph_end_to_end(rehearsal):
    results, stdout = rehearsal
    shipped = {p.stem for p in (REPO / "workflows" / "api").glob("*.json")}
    assert set(REHEARSED) <= shipped
    main = [r for r in results["rows"] if r["run"] == "shipped"]
    assert sorted({r["workflow"] for r in main}) == sorted(REHEARSED)
    for row in results["rows"]:
        assert row["result"] == "completed", row
        assert row["images_ok"], row          # finite, and of the graph's size where the graph sets one
    # both weight options a GPU run compares, and the int8 / fp8 options, went through the loaders
    assert {r["weights"] for r in main} == {"fp16", "bf16", "int8", "fp8_e4m3fn"}
    assert {r["workflow"] for r in results["rows"] if r["run"] == "lowvram"} == \
        {"pixart_delta_controlnet", "dit4sr_upscale_x4"}
    assert results["lcm_leak"] == {"patched_differs": True, "base_again_bit_equal": True}
    t = results["timings"]
    assert t["lcm_1024_4step_warm_s"] > 0 and t["controlar_tokens_per_s"] > 0
    # per-step times are differences of wall times (tiny on a CPU: noise, any sign), but they must exist
    for key in ("step_s_ours_pixart_alpha_t2i", "step_s_ours_easycontrol_canny", "step_s_core_easycontrol_canny"):
        assert isinstance(t[key], float), (key, t)
    assert results["skipped"] == []
    assert stdout.rstrip().splitlines()[-1].startswith("LCM leak check:"), stdout[-500:]


def test_full_size_layouts_match_the_released_manifests(shared):
    plan = gpu_check.full_size_plan()
    assert gpu_check.check_plan_against_manifests(plan, shared / "manifests") == []
    checked = {e["path"] for e in plan if e.get("shapes") and e["manifests"]}
    assert len(checked) >= 6, checked       # PixArt 512 / LCM / ControlNet, FLUX, ControlAR x2, VQ
    params = {e["path"]: sum(math.prod(s) for s in e["shapes"].values())
              for e in plan if e.get("shapes")}
    assert params["diffusion_models/flux1-dev.safetensors"] > 11.8e9          # the released 11.9 B
    assert params["text_encoders/t5xxl_fp16.safetensors"] > 4.7e9             # T5-v1.1-XXL encoder


def device_like_site(folder: Path) -> Path:
    """Links to .venv's copies of the lent machine's image packages and of what they need themselves (the
    image's own versions differ; their dependencies come with them there)."""
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    norm = lambda n: n.lower().replace("_", "-")            # noqa: E731
    installed = {norm(d.metadata["Name"]): d for d in md.distributions()}
    # what the pack brings is never taken from the image side, even where a .venv version of an image package
    # needs it (the test must show the pack supplies it)
    packed = {norm(n) for n in (*gpu_check.PACK_COPIED, *gpu_check.PACK_WHEELS)}
    todo, seen = [norm(n) for n in gpu_check.DEVICE_IMAGE_PACKAGES], set(packed)
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for req in installed[name].requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({**default_environment(), "extra": ""}):
                todo.append(norm(r.name))
    site = Path(installed["torch"].locate_file(""))
    folder.mkdir(parents=True, exist_ok=True)
    for name in seen - packed:
        for top in {str(f).split("/")[0] for f in installed[name].files or []}:
            if not top.startswith("..") and top != "__pycache__" and not top.endswith(".pth") \
                    and (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    # the pack's one binary wheel is for Python 3.12: here its Python's own build stands in for it
    import pydantic_core
    (folder / "pydantic_core").symlink_to(Path(pydantic_core.__file__).parent)
    return folder


def test_pack_fits_one_device_call_and_starts_v033_with_only_the_image_packages(tmp_path, models_dir, monkeypatch):
    from dit_control.tests import comfy_host
    info = gpu_check.pack(tmp_path / "pack", download=False)
    assert info["pack_bytes"] + info["checkout_bytes"] <= gpu_check.TRANSFER_LIMIT, info
    unpacked = gpu_check.unpack(tmp_path / "pack")
    assert (unpacked["manifests"] / "pixart" / "pixart_xl2_512_orig.json").exists()
    # an interpreter that sees nothing but the image's packages and the pack: no .venv site (-S)
    isolated = tmp_path / "python"
    isolated.write_text(f"#!/bin/sh\nexec {PYTHON} -S \"$@\"\n")
    isolated.chmod(0o755)
    monkeypatch.setattr(comfy_host, "PYTHON", isolated)
    paths = [str(device_like_site(tmp_path / "image")), *unpacked["paths"]]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    fe = tmp_path / "frontend"
    fe.mkdir()
    with comfy_host.ComfyServer(models_dir, base_dir=tmp_path / "base", probe=True,
                                extra_args=["--front-end-root", str(fe)]) as server:
        info = server.get("/object_info")
        assert "DiTControl_LCMSampler" in info and "SamplerCustom" in info, server.log_tail()
        base, _, _ = gpu_check.lcm_leak_graphs(64, 64, "pack")
        base["6"]["inputs"]["steps"] = 1
        server.run_ok(base)
