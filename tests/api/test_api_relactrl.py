"""RelaCtrl through core "Apply ControlNet" on a real ComfyUI server: the shipped Canny workflow, reproducible
permutations (same seed -> same image, another seed -> another), strength 0 = no control bit for bit, both CFG
halves with the same permutations, control exactly on the steps in range with the (seed, step) permutations,
the control-only file + separate base, and clear errors for wrong files and bases. The 0.3.75 floor runs the
tests that go through core's Apply ControlNet / sampler plumbing (strength 0, the per-step exactness, the base
errors); the rest checks our own loader and permutation code, the same on either host."""
import io
import json

import pytest
import torch
from PIL import Image

from dit_control.kernels.checkpoint_io import read_state_dict
from dit_control.kernels.pixart.control_file import load_bundled_base
from dit_control.kernels.pixart.lcm import ddpm_alphas_cumprod, lcm_sample, lcm_timesteps
from dit_control.kernels.pixart.relactrl import load_relactrl, prepare_relactrl
from dit_control.kernels.t5 import load_t5_encoder, read_t5_state_dict
from dit_control.tests.api.api_graphs import add_lcm_control_latents, at_pass_size, first_node
from dit_control.tests.comfy_host import COMFY_DIR, REPO, assert_documented, execution_error
from dit_control.tests.generators.make_checkpoints import write_example_inputs
from dit_control.tests.generators.make_relactrl_checkpoints import (
    RELACTRL_FILE,
    relactrl_state_dict,
    save_relactrl_base,
    save_relactrl_control_only,
)

WORKFLOW = REPO / "workflows" / "api" / "pixart_relactrl_canny.json"
TEST_DIR = "relactrl_test"
CONTROL_ONLY = f"{TEST_DIR}/relactrl_pixart_canny_1024_controlnet_only.pth"
SEPARATE_BASE = f"{TEST_DIR}/PixArt-XL-2-1024-MS-relactrl-base.pth"
BAD_KEYS = f"{TEST_DIR}/relactrl_missing_and_unexpected.pth"
PLAIN_PIXART = f"{TEST_DIR}/PixArt-XL-2-1024-MS-in-the-controlnet-folder.pth"
PROMPT = "a red cube on a wooden table"
SEED, HEIGHT, WIDTH = 77, 128, 256      # 16x8 tokens: the least the 4 pseudo-token segments need, cheap VAE
SD15_SCALE = 0.18215


@pytest.fixture(scope="module", autouse=True)
def relactrl_files(models_dir):
    """This module's variants of the tiny RelaCtrl file (make_all made the full one), before the first prompt."""
    save_relactrl_control_only(models_dir / "controlnet" / CONTROL_ONLY)
    save_relactrl_base(models_dir / "diffusion_models" / SEPARATE_BASE)
    plain = models_dir / "controlnet" / PLAIN_PIXART        # a plain PixArt file picked by mistake
    if not plain.exists():
        plain.symlink_to(models_dir / "diffusion_models" / "PixArt-XL-2-1024-MS.pth")
    bad = models_dir / "controlnet" / BAD_KEYS
    if not bad.exists():
        sd = relactrl_state_dict()
        sd.pop("controlnet.3.process.experts_attn.1.attn.proj.bias")
        sd["controlnet.3.process.extra_gate"] = torch.zeros(3)
        torch.save({"state_dict": sd}, bad)


@pytest.fixture(scope="module", autouse=True)
def example_inputs(comfy, relactrl_files):
    write_example_inputs(comfy.base_dir / "input")


def shipped():
    return json.loads(WORKFLOW.read_text())


def small_graph(strength=1.0, start=0.0, end=1.0, with_control=True, steps=3, seed=0, cfg=4.5,
                same_negative=False, save_latent=None):
    """The shipped graph at 256x128 and a few steps; strength/start/end on Apply ControlNet, the loader's
    permutation seed, or no control at all. `save_latent`: also save the sampled latent under this prefix."""
    g = shipped()
    g["6"]["inputs"].update(height=HEIGHT, width=WIDTH)
    g["10"]["inputs"].update(height=HEIGHT, width=WIDTH)
    g["11"]["inputs"].update(steps=steps, cfg=cfg, seed=SEED)
    g["1"]["inputs"]["seed"] = seed
    g["9"]["inputs"].update(strength=strength, start_percent=start, end_percent=end)
    if same_negative:
        g["9"]["inputs"]["negative"] = ["3", 0]
    if not with_control:
        g["11"]["inputs"].update(positive=["3", 0], negative=["3", 0] if same_negative else ["4", 0])
        for k in ("9", "7", "6", "5"):
            del g[k]
    if save_latent:
        g["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": save_latent}}
    return g


def png(comfy, history):
    assert history["status"]["status_str"] == "success", execution_error(history)
    (data,) = comfy.images(history)
    return data


def _cached_nodes(history) -> set:
    return {n for kind, data in history["status"].get("messages", []) if kind == "execution_cached"
            for n in data.get("nodes", [])}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_nodes_registered(comfy):
    for name in ("DiTControl_RelaCtrlLoader", "DiTControl_RelaCtrlCheckpointLoader"):
        asked_now = comfy.get(f"/object_info/{name}")    # the session's object_info predates our files
        assert_documented(asked_now, name, "DiT Control/PixArt")
        info = asked_now[name]
        assert "gufeng_" in info["description"]          # the style checkpoints' prompt tags
        assert RELACTRL_FILE in info["input"]["required"]["relactrl_name"][1]["options"]


def test_shipped_workflow_runs_end_to_end(comfy):
    # v0.33 only: the 21-block base is the file's heaviest run; the floor runs every other graph of this file.
    # Two of its 20 steps: every step runs the same code (the random RelaCtrl draws noise at any count). At
    # 512 px (api_graphs.at_pass_size): its 1024 px is the LCM flagship's, run whole by test_api_pixart_lcm.py
    g = shipped()
    assert g["11"]["inputs"]["steps"] == 20
    assert g[first_node(g, "EmptyLatentImage")]["inputs"]["width"] == 1024
    g["11"]["inputs"]["steps"] = 2
    size = at_pass_size(comfy, g, 1024, main_host_size=512)
    data = png(comfy, comfy.run(g))
    assert Image.open(io.BytesIO(data)).size == (size, size)


def test_same_seed_same_image_another_seed_another(comfy):
    first = png(comfy, comfy.run(small_graph(seed=5)))
    # the same graph freshly loaded (fp32 is what 'default' picks for these fp32 weights on a CPU): the
    # loader and the sampler run again, nothing comes from the cache
    g = small_graph(seed=5)
    g["1"]["inputs"]["weight_dtype"] = "fp32"
    h = comfy.run(g)
    assert not {"1", "11"} & _cached_nodes(h)
    assert png(comfy, h) == first
    other = png(comfy, comfy.run(small_graph(seed=6)))
    assert other != first
    assert Image.open(io.BytesIO(other)).size == (WIDTH, HEIGHT)


@pytest.mark.both_hosts
def test_strength_zero_is_bit_identical_to_no_control_and_strength_changes_it(comfy):
    without = png(comfy, comfy.run(small_graph(with_control=False)))
    assert png(comfy, comfy.run(small_graph(strength=0.0))) == without
    assert png(comfy, comfy.run(small_graph(strength=1.0))) != without


def test_both_cfg_halves_get_the_same_permutations(comfy):
    """Positive = negative: when both halves see the same permutations, cond = uncond and CFG 4.5 gives the
    CFG 1 result (one half only). Were the halves shuffled apart, CFG would add 3.5x their difference —
    and a changed permutation seed moves the latent by far more than the tolerance."""
    cfg45 = comfy.saved_latent(comfy.run(small_graph(cfg=4.5, same_negative=True, save_latent="rc/cfg45")), "20")
    cfg1 = comfy.saved_latent(comfy.run(small_graph(cfg=1.0, same_negative=True, save_latent="rc/cfg1")), "20")
    assert _rel(cfg45, cfg1) <= 1e-4
    reseeded = comfy.saved_latent(comfy.run(small_graph(cfg=1.0, same_negative=True, seed=9,
                                                    save_latent="rc/cfg1_seed9")), "20")
    assert _rel(reseeded, cfg1) > 100 * max(_rel(cfg45, cfg1), 1e-6)


# ---- per-step application: the graph's latent equals a kernel LCM loop with (seed, step) permutations ----

def lcm_latent_graph(strength, start, end, seed):
    g = small_graph(strength=strength, start=start, end=end, seed=seed)
    for k in ("11", "12", "13"):
        del g[k]
    g["3"]["inputs"]["text"] = PROMPT
    return add_lcm_control_latents(g, model="1", apply_controlnet="9", empty_latent="10", control_image="7",
                                   vae="8", seed=SEED, prefix=f"rc/{end}")


@pytest.fixture(scope="module")
def kernel_models(models_dir):
    from transformers import T5TokenizerFast
    control_sd, base_sd, info = prepare_relactrl(read_state_dict(str(models_dir / "controlnet" / RELACTRL_FILE)))
    base = load_bundled_base(base_sd, info).eval()
    net = load_relactrl(control_sd, base.config, info=info).eval()
    t5, _ = load_t5_encoder(read_t5_state_dict(models_dir / "text_encoders/t5xxl_fp16.safetensors"),
                            dtype=torch.float32)
    tok = T5TokenizerFast.from_pretrained(str(COMFY_DIR / "comfy/text_encoders/t5_tokenizer"))
    ids = tok(PROMPT, max_length=120, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        caption = t5.eval()(ids.input_ids, ids.attention_mask)
    return base, net, caption, ids.attention_mask


def kernel_lcm(comfy, kernel_models, control_latent, strength, controlled_steps, seed):
    base, net, caption, mask = kernel_models
    x_T, step_noise = comfy.sampler_noise(WIDTH, HEIGHT, SEED, draws=4)   # as the running host draws it
    timesteps = lcm_timesteps(4)

    def eps(x, t):
        step = timesteps.index(t)
        control = net.branch(control_latent, strength=strength, seed=seed, step=step) \
            if step in controlled_steps else None
        return base(x, torch.tensor([float(t)]), caption, mask, control=control)[:, :4]

    with torch.no_grad():
        x0 = lcm_sample(eps, x_T, timesteps, ddpm_alphas_cumprod(), lambda i, like: step_noise[i])
    return x0 / SD15_SCALE


@pytest.mark.both_hosts
@pytest.mark.parametrize("end,controlled", [(1.0, (0, 1, 2, 3)), (0.6, (0, 1, 2))])
def test_control_is_applied_exactly_on_the_steps_in_range_with_step_seeded_permutations(
        comfy, kernel_models, end, controlled):
    h = comfy.run(lcm_latent_graph(0.8, 0.0, end, seed=3))
    out = comfy.saved_latent(h, "23")
    control_latent = comfy.saved_latent(h, "25") * SD15_SCALE
    assert _rel(out, kernel_lcm(comfy, kernel_models, control_latent, 0.8, controlled, seed=3)) <= 1e-4
    # the check can fail: other steps controlled, or another permutation seed
    other = (0, 1, 2) if len(controlled) == 4 else (0, 1, 2, 3)
    assert _rel(out, kernel_lcm(comfy, kernel_models, control_latent, 0.8, other, seed=3)) > 1e-4
    assert _rel(out, kernel_lcm(comfy, kernel_models, control_latent, 0.8, controlled, seed=4)) > 1e-4


# ---- the other set-up: control-only file + a separate PixArt-XL-2-1024-MS --------------------------------

def separate_graph(**kw):
    g = small_graph(**kw)
    g["1"] = {"class_type": "DiTControl_PixArtDiTLoader",
              "inputs": {"dit_name": SEPARATE_BASE, "weight_dtype": "default", "resolution": "auto"}}
    g["30"] = {"class_type": "DiTControl_RelaCtrlLoader",
               "inputs": {"relactrl_name": CONTROL_ONLY, "weight_dtype": "default", "seed": kw.get("seed", 0)}}
    g["9"]["inputs"]["control_net"] = ["30", 0]
    return g


def test_control_only_file_with_separate_base_equals_the_full_file(comfy):
    assert png(comfy, comfy.run(separate_graph())) == png(comfy, comfy.run(small_graph()))


def test_relactrl_loader_takes_the_full_file_too(comfy):
    g = separate_graph()
    g["30"]["inputs"]["relactrl_name"] = RELACTRL_FILE
    assert png(comfy, comfy.run(g)) == png(comfy, comfy.run(small_graph()))


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("node,name,needle", [
    ("1", "PixArt-XL-2-1024-ControlNet.pth", "found a PixArt-δ ControlNet-Transformer"),
    ("30", PLAIN_PIXART, "found a plain PixArt-α transformer"),
    ("1", "broken/not-a-controlnet.safetensors", "expected a RelaCtrl control branch"),
    ("1", "broken/empty.pth", "is empty"),
    ("1", CONTROL_ONLY, "carries no base model"),
    ("1", BAD_KEYS, "controlnet.3.process.experts_attn.1.attn.proj.bias"),
    ("1", BAD_KEYS, "controlnet.3.process.extra_gate"),
    ("30", "PixArt-XL-2-1024-ControlNet.pth", "found a PixArt-δ ControlNet-Transformer"),
])
def test_wrong_relactrl_file_is_a_clear_error(comfy, node, name, needle):
    g = separate_graph() if node == "30" else small_graph()
    g[node]["inputs"]["relactrl_name"] = name
    err = execution_error(comfy.run(g))
    assert err and needle in err["exception_message"], err
    assert png(comfy, comfy.run(small_graph(steps=2)))   # the server still serves


@pytest.mark.both_hosts
def test_relactrl_on_a_base_too_shallow_or_not_pixart_is_a_clear_error(comfy):
    g = separate_graph()
    g["1"]["inputs"]["dit_name"] = "PixArt-XL-2-1024-MS.pth"      # the tiny 2-block base
    err = execution_error(comfy.run(g))
    assert err and "does not fit the base model" in err["exception_message"], err
    g = small_graph()
    g["31"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "comfy-native-pixart-depth1.safetensors",
                                                      "weight_dtype": "default"}}
    g["11"]["inputs"]["model"] = ["31", 0]
    err = execution_error(comfy.run(g))
    assert err and "works only with a MODEL from 'PixArt-α DiT Loader'" in err["exception_message"], err
    assert png(comfy, comfy.run(small_graph(steps=2)))
