"""The pack against core changes newer than the hosts we have (v0.33 and the 0.3.75 floor), through a real
server on both hosts. No newer ComfyUI tree can be had here: tests/host_probe/newer_core.py builds each newer
behaviour as a subclass of the running host's own class inside the server, and the pack's objects meet it
there (nodes/comfy_compat.py holds the pack's side).

1. ControlBase without `cond_hint` (an open core change caches prepared hints per size elsewhere): our PixArt
   CONTROL_NET (ControlNet-Transformer and RelaCtrl) samples the same latent on such a base.
2. v0.38's extra constructor keyword (`fast_disk`) on ModelPatcher and ControlBase, passed on by clone()/copy()
   and by core's reload of a patcher: our reloaders, multi-GPU deep clones and CONTROL_NET copies carry it.
3. The dynamic-VRAM ModelSamplingDiscrete leak (core issue 16490): on one loaded PixArt-LCM checkpoint, base ->
   ModelSamplingDiscrete(lcm, zsnr)-patched -> base gives the first base latent again, bit for bit.
"""
import json

import pytest
import torch

from dit_control.tests.benchmarks.gpu_check import lcm_leak_graphs
from dit_control.tests.comfy_host import REPO, execution_error
from dit_control.tests.generators.make_checkpoints import write_example_inputs

WORKFLOWS = REPO / "workflows" / "api"
LATENT_NODE = "30"


@pytest.fixture(scope="module", autouse=True)
def example_inputs(comfy):
    write_example_inputs(comfy.base_dir / "input")


def control_graph(workflow: str, hintless: bool, prefix: str) -> dict:
    """A shipped PixArt control graph at a small size and 1 step, saving its sampled latent (no VAE decode);
    `hintless`: its CONTROL_NET rebuilt on the ControlBase that sets no `cond_hint`."""
    g = json.loads((WORKFLOWS / f"{workflow}.json").read_text())
    apply = next(k for k, v in g.items() if v["class_type"] == "ControlNetApplyAdvanced")
    sampler = next(k for k, v in g.items() if v["class_type"] == "KSampler")
    for node in g.values():
        if node["class_type"] in ("EmptyLatentImage", "DiTControl_FitControlImage"):
            node["inputs"].update(width=256, height=128)   # RelaCtrl's segments need 16 x 8 tokens at least
    g[sampler]["inputs"]["steps"] = 1
    for k in [k for k, v in g.items() if v["class_type"] in ("VAEDecode", "SaveImage")]:
        del g[k]
    g[LATENT_NODE] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    if hintless:
        g["41"] = {"class_type": "DiTControlProbe_HintlessControlBase",
                   "inputs": {"control_net": g[apply]["inputs"]["control_net"]}}
        g[apply]["inputs"]["control_net"] = ["41", 0]
    return g


@pytest.mark.both_hosts
@pytest.mark.parametrize("workflow", ["pixart_delta_controlnet", "pixart_relactrl_canny"])
def test_control_net_samples_the_same_on_a_control_base_without_cond_hint(comfy, workflow):
    plain = comfy.saved_latent(comfy.run_ok(control_graph(workflow, False, f"hint/{workflow}_plain")), LATENT_NODE)
    history = comfy.run(control_graph(workflow, True, f"hint/{workflow}_hintless"))
    err = execution_error(history)
    assert err is None, f"on a ControlBase that sets no cond_hint: {err and err.get('exception_message')}"
    hintless = comfy.saved_latent(history, LATENT_NODE)
    assert torch.equal(hintless, plain), f"max diff {(hintless - plain).abs().max()}"


def _fast_disk_report(comfy) -> dict:
    g = {"1": {"class_type": "DiTControl_PixArtControlNetCheckpointLoader",
               "inputs": {"controlnet_name": "PixArt-XL-2-1024-ControlNet.pth", "weight_dtype": "default"}},
         "2": {"class_type": "DiTControlProbe_FastDiskHost", "inputs": {"model": ["1", 0], "control_net": ["1", 1]}}}
    return json.loads(comfy.run_ok(g)["outputs"]["2"]["text"][0])


@pytest.mark.both_hosts
def test_patchers_and_control_net_copies_pass_a_newer_hosts_keyword_on(comfy):
    report = _fast_disk_report(comfy)
    # v0.33 reloads patchers through cached_patcher_init (0.3.75 has none): a newer host's reload hands
    # the loader its own keyword, which must reach the patcher instead of failing the loader's call
    assert ("reload" in report) == (comfy.host == "0.33"), report
    if "reload" in report:
        assert report["reload"] == {"class": "FastDiskModelPatcher", "fast_disk": True}, report["reload"]
    assert report["deepclone_multigpu"] == {"class": "FastDiskModelPatcher", "fast_disk": True,
                                            "own_network": True, "clone_fast_disk": True}, report["deepclone_multigpu"]
    copy = report["copy"]
    assert "error" not in copy, copy
    assert copy["class"].endswith("OnFastDiskCore") and copy["fast_disk"] is True, copy


@pytest.mark.both_hosts
def test_lcm_patch_does_not_leak_into_a_later_run_of_the_same_loaded_checkpoint(comfy):
    base, patched, base_again = lcm_leak_graphs(width=128, height=128, prefix="leak")
    runs = [comfy.run_ok(g) for g in (base, patched, base_again)]
    loader = next(k for k, v in base.items() if v["class_type"] == "DiTControl_PixArtDiTLoader")
    cached = [{n for kind, data in h["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}
              for h in runs]
    # one loaded checkpoint: the loader ran once, the later prompts took its MODEL from the cache
    assert loader in cached[1] and loader in cached[2], cached
    first, lcm, again = (comfy.saved_latent(h, LATENT_NODE) for h in runs)
    # the patch matters (zsnr changes the schedule), so a leak of it into the base run would show
    assert not torch.equal(lcm, first)
    assert torch.equal(again, first), f"base after the patched run differs: max {(again - first).abs().max()}"
