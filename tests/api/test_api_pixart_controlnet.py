"""PixArt-δ ControlNet-Transformer through core "Apply ControlNet" on a real ComfyUI server."""
import io
import json

import pytest
import torch
from PIL import Image

from dit_control.kernels.checkpoint_io import read_state_dict
from dit_control.kernels.pixart.control_file import load_bundled_base
from dit_control.kernels.pixart.controlnet import load_pixart_controlnet, prepare_pixart_controlnet
from dit_control.kernels.pixart.lcm import ddpm_alphas_cumprod, lcm_sample, lcm_timesteps
from dit_control.kernels.t5 import load_t5_encoder, read_t5_state_dict
from dit_control.tests.api.api_graphs import add_lcm_control_latents, at_pass_size, first_node
from dit_control.tests.comfy_host import COMFY_DIR, REPO, assert_documented, execution_error
from dit_control.tests.generators.make_checkpoints import write_example_inputs

WORKFLOW = REPO / "workflows" / "api" / "pixart_delta_controlnet.json"
CONTROLNET_FILE = "controlnet/PixArt-XL-2-1024-ControlNet.pth"
PROMPT = "a red cube on a wooden table"
SEED, HEIGHT, WIDTH = 77, 256, 384
SD15_SCALE = 0.18215


@pytest.fixture(scope="module", autouse=True)
def example_inputs(comfy):
    write_example_inputs(comfy.base_dir / "input")


def shipped():
    return json.loads(WORKFLOW.read_text())


def small_graph(strength=1.0, start=0.0, end=1.0, with_controlnet=True, size=(HEIGHT, WIDTH), steps=3):
    """The shipped graph at a small size; strength/start/end on Apply ControlNet, or no ControlNet."""
    g = shipped()
    g["7"]["inputs"].update(height=size[0], width=size[1])
    g["11"]["inputs"].update(height=size[0], width=size[1])
    g["12"]["inputs"].update(steps=steps)
    g["10"]["inputs"].update(strength=strength, start_percent=start, end_percent=end)
    if not with_controlnet:
        g["12"]["inputs"].update(positive=["3", 0], negative=["4", 0])
        for k in ("10", "8", "7", "6", "5"):
            del g[k]
    return g


def png(comfy, history):
    assert history["status"]["status_str"] == "success", execution_error(history)
    (data,) = comfy.images(history)
    return data


def test_nodes_registered(object_info):
    for name in ("DiTControl_PixArtControlNetLoader", "DiTControl_PixArtControlNetCheckpointLoader"):
        assert_documented(object_info, name, "DiT Control/PixArt")
    assert "PixArt-XL-2-1024-ControlNet.pth" in \
        object_info["DiTControl_PixArtControlNetLoader"]["input"]["required"]["controlnet_name"][1]["options"]


@pytest.mark.both_hosts
def test_shipped_workflow_runs_end_to_end(comfy):
    # two of its 14 steps: every step runs the same code; what the trained ControlNet draws through the shipped
    # graph at full steps is measured in test_api_micro_model.py. At 512 px (api_graphs.at_pass_size): its
    # 1024 px is the LCM flagship's, run whole by test_api_pixart_lcm.py
    g = shipped()
    assert g["12"]["inputs"]["steps"] == 14
    assert g[first_node(g, "EmptyLatentImage")]["inputs"]["width"] == 1024
    g["12"]["inputs"]["steps"] = 2
    size = at_pass_size(comfy, g, 1024, main_host_size=512)
    data = png(comfy, comfy.run(g))
    assert Image.open(io.BytesIO(data)).size == (size, size)


@pytest.mark.both_hosts
def test_strength_zero_is_bit_identical_to_no_controlnet_and_strength_changes_it(comfy):
    without = png(comfy, comfy.run(small_graph(with_controlnet=False)))
    zero = png(comfy, comfy.run(small_graph(strength=0.0)))
    assert zero == without
    full = png(comfy, comfy.run(small_graph(strength=1.0)))
    assert full != without
    assert Image.open(io.BytesIO(full)).size == (WIDTH, HEIGHT)


def test_control_image_of_another_size_and_aspect_is_fitted(comfy):
    """A portrait control image on a landscape latent: resized + centre-cropped, not a crash."""
    g = small_graph()
    del g["7"]                      # feed the raw 200x300 portrait image straight to HED
    g["8"]["inputs"]["image"] = ["5", 0]
    g["5"]["inputs"]["image"] = "portrait_control.png"
    data = png(comfy, comfy.run(g))
    assert Image.open(io.BytesIO(data)).size == (WIDTH, HEIGHT)


# ---- per-step application: the graph's latent equals a kernel LCM loop with control on chosen steps ----

def lcm_latent_graph(strength, start, end):
    g = small_graph(strength=strength, start=start, end=end)
    for k in ("12", "13", "14"):
        del g[k]
    g["3"]["inputs"]["text"] = PROMPT
    return add_lcm_control_latents(g, model="1", apply_controlnet="10", empty_latent="11", control_image="8",
                                   vae="9", seed=SEED, prefix=f"cn/{end}")


@pytest.fixture(scope="module")
def kernel_models(models_dir):
    from transformers import T5TokenizerFast
    # float32, as the server's default weight dtype computes (the embedded micro model's files are fp16)
    control_sd, base_sd, info = prepare_pixart_controlnet(
        {k: v.float() for k, v in read_state_dict(str(models_dir / CONTROLNET_FILE)).items()})
    base = load_bundled_base(base_sd, info).eval()
    net = load_pixart_controlnet(control_sd, base.config, info=info).eval()
    t5, _ = load_t5_encoder(read_t5_state_dict(models_dir / "text_encoders/t5xxl_fp16.safetensors"),
                            dtype=torch.float32)
    tok = T5TokenizerFast.from_pretrained(str(COMFY_DIR / "comfy/text_encoders/t5_tokenizer"))
    ids = tok(PROMPT, max_length=120, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        caption = t5.eval()(ids.input_ids, ids.attention_mask)
    return base, net, caption, ids.attention_mask


def kernel_lcm(comfy, kernel_models, control_latent, strength, controlled_timesteps):
    base, net, caption, mask = kernel_models
    x_T, step_noise = comfy.sampler_noise(WIDTH, HEIGHT, SEED, draws=4)   # as the running host draws it

    def eps(x, t):
        control = net.branch(control_latent, strength=strength) if t in controlled_timesteps else None
        return base(x, torch.tensor([float(t)]), caption, mask, control=control)[:, :4]

    with torch.no_grad():
        x0 = lcm_sample(eps, x_T, lcm_timesteps(4), ddpm_alphas_cumprod(),
                        lambda i, like: step_noise[i])
    return x0 / SD15_SCALE


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.both_hosts
@pytest.mark.parametrize("end,controlled", [(1.0, (999, 759, 499, 259)), (0.6, (999, 759, 499))])
def test_control_is_applied_exactly_on_the_steps_in_range(comfy, kernel_models, end, controlled):
    h = comfy.run(lcm_latent_graph(0.8, 0.0, end))
    assert h["status"]["status_str"] == "success", execution_error(h)
    out = comfy.saved_latent(h, "23")
    control_latent = comfy.saved_latent(h, "25") * SD15_SCALE
    assert _rel(out, kernel_lcm(comfy, kernel_models, control_latent, 0.8, controlled)) <= 1e-4
    # and not equal to the loop with control on every step / on no step (the check can fail)
    other = (999, 759, 499) if len(controlled) == 4 else (999, 759, 499, 259)
    assert _rel(out, kernel_lcm(comfy, kernel_models, control_latent, 0.8, other)) > 1e-4


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.both_hosts
def test_controlnet_on_a_non_pixart_model_is_a_clear_error(comfy):
    g = small_graph()
    g["30"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "comfy-native-pixart-depth1.safetensors",
                                                      "weight_dtype": "default"}}
    g["12"]["inputs"]["model"] = ["30", 0]
    err = execution_error(comfy.run(g))
    assert err and "works only with a MODEL from 'PixArt-α DiT Loader'" in err["exception_message"]
    assert png(comfy, comfy.run(small_graph(steps=2)))   # the server still serves


@pytest.mark.parametrize("name,needle", [
    ("broken/not-a-controlnet.safetensors", "expected a PixArt-δ ControlNet-Transformer"),
    ("broken/empty.pth", "is empty"),
])
@pytest.mark.both_hosts
def test_wrong_controlnet_file_is_a_clear_error(comfy, name, needle):
    g = small_graph()
    g["1"]["inputs"]["controlnet_name"] = name
    err = execution_error(comfy.run(g))
    assert err and needle in err["exception_message"], err
    assert png(comfy, comfy.run(small_graph(steps=2)))


def test_controlnet_only_loader_with_separate_base(comfy):
    g = small_graph()
    g["40"] = {"class_type": "DiTControl_PixArtControlNetLoader",
               "inputs": {"controlnet_name": "PixArt-XL-2-1024-ControlNet.pth", "weight_dtype": "default"}}
    g["10"]["inputs"]["control_net"] = ["40", 0]
    data = png(comfy, comfy.run(g))
    assert data == png(comfy, comfy.run(small_graph()))   # same weights, same image


def test_controlnet_with_int8_base_through_apply_controlnet(comfy):
    g = small_graph(steps=2)
    g["1"]["inputs"]["weight_dtype"] = "int8"
    data = png(comfy, comfy.run(g))
    assert Image.open(io.BytesIO(data)).size == (WIDTH, HEIGHT)


def test_nan_strength_of_apply_controlnet_is_refused_by_name(comfy):
    """core's Apply ControlNet range check lets NaN through (NaN compares false with min and max)."""
    err = execution_error(comfy.run(small_graph(strength=float("nan"), steps=1)))
    assert err and "Apply ControlNet (PixArt ControlNet-Transformer): strength is nan" in err["exception_message"], err


def test_compute_dtype_bf16_controlnet_and_a_mismatch_named(comfy):
    """The checkpoint loader's compute_dtype bf16 computes base and control in bf16 where the CPU has it; a control
    network loaded for fp32 maths under a bf16 MODEL is refused with what to set (not a dtype crash in a GEMM)."""
    from dit_control.kernels.native_dtypes import native_bf16

    g = small_graph(steps=1)
    g["1"]["inputs"]["compute_dtype"] = "bf16"
    history = comfy.run(g)
    if not native_bf16("cpu")[0]:
        err = execution_error(history)
        assert err and "avx512_bf16" in err["exception_message"], err
        return
    assert Image.open(io.BytesIO(png(comfy, history))).size == (WIDTH, HEIGHT)
    g["40"] = {"class_type": "DiTControl_PixArtControlNetLoader",
               "inputs": {"controlnet_name": "PixArt-XL-2-1024-ControlNet.pth", "weight_dtype": "default"}}
    g["10"]["inputs"]["control_net"] = ["40", 0]
    err = execution_error(comfy.run(g))
    assert err and "the MODEL computes in bfloat16 but this control network was loaded to compute in float32" in \
        err["exception_message"], err
