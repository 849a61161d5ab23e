"""What the compatibility module (nodes/comfy_compat.py) promises, checked on every host the suite runs:
the server is the host we asked for, our patchers are of the class core's own loaders build there, and
the step noise the references use is the running host's own."""
import json

import pytest
import torch

from dit_control.tests.comfy_host import HOSTS, execution_error

DIT = "PixArt-XL-2-512x512.pth"
CORE_LOADABLE = "comfy-native-pixart-depth1.safetensors"   # a PixArt file core's own UNETLoader reads


@pytest.mark.both_hosts
def test_server_is_the_chosen_host(comfy):
    version = comfy.get("/system_stats")["system"]["comfyui_version"]
    assert version == HOSTS[comfy.host].lstrip("v"), (comfy.host, version)


def _patcher_report(comfy, loader: dict) -> dict:
    graph = {"1": loader, "2": {"class_type": "DiTControlProbe_PatcherClass", "inputs": {"model": ["1", 0]}}}
    h = comfy.run(graph)
    assert h["status"]["status_str"] == "success", execution_error(h)
    return json.loads(h["outputs"]["2"]["text"][0])


@pytest.mark.both_hosts
def test_our_model_patcher_is_the_class_core_builds(comfy):
    ours = _patcher_report(comfy, {"class_type": "DiTControl_PixArtDiTLoader",
                                   "inputs": {"dit_name": DIT, "weight_dtype": "default", "resolution": "auto"}})
    core = _patcher_report(comfy, {"class_type": "UNETLoader",
                                   "inputs": {"unet_name": CORE_LOADABLE, "weight_dtype": "default"}})
    assert ours["patcher"] == ours["core_picks"] == core["patcher"], (ours, core)
    # v0.33 rebuilds patchers from their loader (non-dynamic and multi-GPU clones): ours registers one
    # exactly when core's own loader does
    assert ours["has_reloader"] == core["has_reloader"], (ours, core)
    if ours["has_reloader"]:
        # (core's own reload of this test file is not compared: the file lacks y_embedding, which core
        # leaves uninitialised, so two loads differ there)
        assert ours["reload_matches"] is True, ours


@pytest.mark.both_hosts
def test_bundled_base_model_has_the_same_patcher_and_reloader(comfy):
    """The ControlNet checkpoint loader's bundled base MODEL is built like the DiT loader's."""
    ours = _patcher_report(comfy, {"class_type": "DiTControl_PixArtControlNetCheckpointLoader",
                                   "inputs": {"controlnet_name": "PixArt-XL-2-1024-ControlNet.pth",
                                              "weight_dtype": "default"}})
    assert ours["patcher"] == ours["core_picks"], ours
    assert ours["reload_matches"] is (True if ours["has_reloader"] else None), ours


@pytest.mark.both_hosts
def test_probe_noise_is_seeded_as_the_host_seeds_it(comfy):
    """The probe reads the host's own sampler noise; here its rule is pinned down per host, so a probe that
    silently read something else would be caught (v0.33 seeds CPU step noise with seed + 1)."""
    initial, steps = comfy.sampler_noise(64, 64, 5, draws=2)
    assert torch.equal(initial, torch.randn((1, 4, 8, 8), generator=torch.manual_seed(5)))
    seed = 5 + 1 if comfy.host == "0.33" else 5
    gen = torch.Generator().manual_seed(seed)
    assert torch.equal(steps[0], torch.randn((1, 4, 8, 8), generator=gen))
    assert torch.equal(steps[1], torch.randn((1, 4, 8, 8), generator=gen))
