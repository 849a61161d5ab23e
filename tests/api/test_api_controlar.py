"""ControlAR (issue 13) through a real ComfyUI server's API: the shipped workflows on the random tiny checkpoints
in the released layouts (tests/generators/make_controlar_checkpoints.py: ControlAR GPT + DINOv2 flat .safetensors,
LlamaGen base and VQ-16 as {"model": …} .pt, FLAN-T5 shards), which test the nodes' mechanics at the full 16384
vocabulary. The released names hold the micro ControlAR trained here (what it draws: test_api_controlar_micro.py),
so these graphs name the random files (controlar/random/, text_encoders/flan-t5-xl-random/) instead: `graph`.

The sampled token ids are read through tests/host_probe's DiTControlProbe_ImageTokens (the pack has no node
that shows tokens). Everything else runs as shipped; the extra runs change only the inputs they test.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from dit_control.tests.comfy_host import PromptRejected, assert_documented, execution_error, load_api_graph
from dit_control.tests.generators.make_controlar_checkpoints import (
    FLAN_T5_FOLDER,
    GPT_FILES,
    RANDOM_FLAN_T5_FOLDER,
    RANDOM_FOLDER,
    write_controlar_inputs,
)
from dit_control.tests.generators.workflow_format import strip_meta, ui_to_api

REPO = Path(__file__).resolve().parents[2]
SAMPLER = "DiTControl_ControlARSampler"
WORKFLOWS = ("controlar_canny_mr", "controlar_hed_512")
NODES = ("DiTControl_ControlARLoader", "DiTControl_VQ16Loader", "DiTControl_ControlARTextEncode", SAMPLER,
         "DiTControl_VQDecode")
_RUNS: dict = {}          # (host, key) -> (tokens, png bytes): one heavy run shared by several asserts


@pytest.fixture(scope="module")
def server(comfy, models_dir):
    write_controlar_inputs(comfy.base_dir / "input")
    broken = models_dir / "controlar" / "broken"
    if not broken.exists():
        broken.mkdir(parents=True)
        (broken / "PixArt-XL-2-512x512.pth").write_bytes(
            (models_dir / "diffusion_models" / "PixArt-XL-2-512x512.pth").read_bytes())
        good = (models_dir / "controlar" / RANDOM_FOLDER / "canny_MR.safetensors").read_bytes()
        (broken / "truncated_canny_MR.safetensors").write_bytes(good[: len(good) // 2])
        import safetensors.torch
        sd = safetensors.torch.load_file(str(models_dir / "controlar" / RANDOM_FOLDER / "canny_MR.safetensors"))
        sd["output.weight"].mul_(1e37)             # finite in the file, logits overflow to Inf
        safetensors.torch.save_file(sd, str(broken / "overflow_canny_MR.safetensors"))
    return comfy


def one(g, class_type) -> str:
    (k,) = [k for k, n in g.items() if n["class_type"] == class_type]
    return k


def on_random_files(g: dict) -> dict:
    """The graph's ControlAR GPT, VQ and FLAN-T5 files swapped for the random tiny ones of the same names."""
    for node in g.values():
        inputs = node["inputs"]
        if node["class_type"] == "DiTControl_ControlARLoader":
            inputs["model_name"] = f"{RANDOM_FOLDER}/{inputs['model_name']}"
        elif node["class_type"] == "DiTControl_VQ16Loader":
            inputs["vq_name"] = f"{RANDOM_FOLDER}/{inputs['vq_name']}"
        elif node["class_type"] == "DiTControl_PixArtT5Loader":
            inputs["t5_name"] = inputs["t5_name"].replace(f"{FLAN_T5_FOLDER}/", f"{RANDOM_FLAN_T5_FOLDER}/", 1)
    return g


def graph(name: str, size=None, tokens=True, **sampler) -> dict:
    """A shipped API workflow on the random files (on_random_files), optionally at another size (fit +
    sampler), other sampler inputs, and the token probe on the sampler's output."""
    g = on_random_files(load_api_graph(REPO / "workflows" / "api" / f"{name}.json"))
    s = one(g, SAMPLER)
    if size is not None:
        g[one(g, "DiTControl_FitControlImage")]["inputs"].update(width=size[0], height=size[1])
        g[s]["inputs"].update(width=size[0], height=size[1])
    for key, value in sampler.items():
        if value is None:
            g[s]["inputs"].pop(key, None)
        else:
            g[s]["inputs"][key] = value
    if tokens:
        g["90"] = {"class_type": "DiTControlProbe_ImageTokens", "inputs": {"image_tokens": [s, 0]}}
    return g


def run_error(server, g) -> str:
    history = server.run(g)
    err = execution_error(history)
    assert err is not None, "the prompt was expected to fail"
    return err["exception_message"]


def tokens_of(history) -> list:
    return json.loads(history["outputs"]["90"]["text"][0])["tokens"]


def png_size(data: bytes) -> tuple:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def shared_run(server, key: str, g: dict):
    """(tokens, png) of a run several tests compare against, made once per host."""
    key = (server.host, key)
    if key not in _RUNS:
        history = server.run_ok(g)
        (png,) = server.images(history)
        _RUNS[key] = (tokens_of(history), png)
    return _RUNS[key]


def shipped(server, name: str):
    return shared_run(server, name, graph(name))


def small_controlled(server):
    """canny_MR at 256×256 as shipped otherwise (seed 42, strength 1), previews off."""
    return shared_run(server, "small", graph("controlar_canny_mr", size=(256, 256), preview_every_rows=0))


# ---------------------------------------------------------------------------------------------
#                                    Nodes and workflows
# ---------------------------------------------------------------------------------------------

def test_nodes_have_descriptions_tooltips_and_own_types(object_info):
    for name in NODES:
        assert_documented(object_info, name, "DiT Control/ControlAR")
    assert object_info["DiTControl_ControlARLoader"]["output"][0] == "CONTROLAR_MODEL"
    assert object_info["DiTControl_VQ16Loader"]["output"] == ["VQ_MODEL"]
    assert object_info["DiTControl_ControlARTextEncode"]["output"] == ["CONTROLAR_CONDITIONING"]
    assert object_info[SAMPLER]["output"] == ["IMAGE_TOKENS"]
    assert object_info["DiTControl_VQDecode"]["output"] == ["IMAGE"]
    assert set(object_info[SAMPLER]["input"]["optional"]) == {"control_image", "vq_model"}


def test_loaders_list_the_controlar_model_folder(object_info):
    files = object_info["DiTControl_ControlARLoader"]["input"]["required"]["model_name"][1]["options"]
    assert {*GPT_FILES, "t2i_XL_stage2_512.pt", "vq_ds16_t2i.pt"} <= set(files)
    assert object_info["DiTControl_VQ16Loader"]["input"]["required"]["vq_name"][1]["options"] == files


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_the_api_workflow(object_info, name):
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    assert ui_to_api(ui, object_info) == strip_meta(load_api_graph(REPO / "workflows" / "api" / f"{name}.json"))


# ---------------------------------------------------------------------------------------------
#                                    Shipped workflows
# ---------------------------------------------------------------------------------------------

@pytest.mark.both_hosts
def test_canny_mr_workflow_768x512(server):
    before = server.log_path.read_text(errors="replace")
    tokens, png = shipped(server, "controlar_canny_mr")
    assert png_size(png) == (768, 512)
    assert len(tokens) == 1 and len(tokens[0]) == 48 * 32                  # 768×512 at 16 px per token
    assert all(0 <= t < 16384 for t in tokens[0]) and len(set(tokens[0])) > 100
    # preview_every_rows 8 of 32 rows with the VQ connected: previews after rows 8, 16 and 24
    log = server.log_path.read_text(errors="replace")[len(before):]
    assert "3 row previews" in log, server.log_tail(20)


def test_hed_512_workflow(server):
    tokens, png = shipped(server, "controlar_hed_512")
    assert png_size(png) == (512, 512)
    assert len(tokens[0]) == 1024


def test_same_seed_same_tokens_another_seed_differs(server):
    tokens, png = shipped(server, "controlar_canny_mr")
    # previews off: the sampler runs again (another input) and must draw exactly the same tokens
    again = server.run_ok(graph("controlar_canny_mr", preview_every_rows=0))
    assert tokens_of(again) == tokens
    assert server.images(again) == [png]
    # another seed (at 256×256, against the shared seed-42 run of that size)
    ref_tokens, ref_png = small_controlled(server)
    other = server.run_ok(graph("controlar_canny_mr", size=(256, 256), preview_every_rows=0, seed=43))
    other_tokens = tokens_of(other)
    assert sum(a != b for a, b in zip(other_tokens[0], ref_tokens[0])) > len(ref_tokens[0]) // 2
    assert server.images(other) != [ref_png]


def test_strength_0_gives_exactly_the_uncontrolled_tokens(server):
    small = (256, 256)
    zero = tokens_of(server.run_ok(graph("controlar_canny_mr", size=small, preview_every_rows=0, strength=0.0)))
    free = tokens_of(server.run_ok(graph("controlar_canny_mr", size=small, preview_every_rows=0,
                                          control_image=None)))
    full, _ = small_controlled(server)
    assert zero == free
    assert sum(a != b for a, b in zip(zero[0], full[0])) > 16         # the control itself does change tokens


def server_threads() -> int:
    """torch's intra-op thread count in a fresh process of the server's Python and environment: the server's
    (neither ComfyUI nor the pack sets it), whatever earlier tests left this pytest process at."""
    import os
    import subprocess

    from dit_control.tests.comfy_host import PYTHON
    out = subprocess.run([str(PYTHON), "-c", "import torch; print(torch.get_num_threads())"], check=True,
                         capture_output=True, text=True, env=dict(os.environ))
    return int(out.stdout.split()[-1])


def kernel_tokens(models_dir: Path, input_dir: Path, width: int, height: int, seed: int) -> list:
    """The canny_MR workflow's tokens computed here with the kernels alone (no ComfyUI): drawn input ->
    centre-crop fit -> Canny 100/200 -> [−1, 1]; FLAN-T5 caption left-padded with zeroed pads; generate()
    with a generator seeded as the node seeds it. The T5 and the GPT run as in the server (float32, the same
    shapes: batch 1, CFG batch 2) and on the server's thread count, so the ids are the same computation's, not
    merely close: reductions and GEMMs can round differently with another thread count."""
    import numpy as np
    import torch
    from transformers import T5TokenizerFast

    from dit_control.kernels.canny import canny_edges
    from dit_control.kernels.control_image import edges_to_control_rgb, fit_control_image
    from dit_control.kernels.controlar.checkpoint import load_gpt_file
    from dit_control.kernels.controlar.dinov2 import resize_mode
    from dit_control.kernels.controlar.sampling import SamplingSettings, generate
    from dit_control.kernels.controlar.text import encode_caption
    from dit_control.kernels.t5 import load_t5_encoder_file
    from dit_control.tests.comfy_host import COMFY_DIR

    g = load_api_graph(REPO / "workflows" / "api" / "controlar_canny_mr.json")
    s = g[one(g, SAMPLER)]["inputs"]
    image = Image.open(input_dir / g[one(g, "LoadImage")]["inputs"]["image"]).convert("RGB")
    x = torch.from_numpy(np.array(image).astype(np.float32) / 255.0).movedim(-1, 0)[None]
    edges = edges_to_control_rgb(canny_edges(fit_control_image(x, height, width, "center_crop"), 100, 200))
    control = edges * 2.0 - 1.0
    text = " ".join(g[one(g, "DiTControl_ControlARTextEncode")]["inputs"]["text"].lower().split())  # cleaned
    tok = T5TokenizerFast.from_pretrained(str(COMFY_DIR / "comfy" / "text_encoders" / "t5_tokenizer"))
    ids = tok(text, max_length=120, padding="max_length", truncation=True, return_tensors="pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(server_threads())
    try:
        t5_file = models_dir / "text_encoders" / RANDOM_FLAN_T5_FOLDER / "model-00001-of-00002.safetensors"
        t5, _ = load_t5_encoder_file(str(t5_file), dtype=torch.float32)
        caption, mask = encode_caption(t5, ids.input_ids, ids.attention_mask, dtype=torch.float32)
        gpt, _ = load_gpt_file(str(models_dir / "controlar" / RANDOM_FOLDER / "canny_MR.safetensors"), n_head=2,
                               adapter_heads=1)
        settings = SamplingSettings(cfg_scale=s["cfg"], temperature=s["temperature"], top_k=s["top_k"],
                                    top_p=s["top_p"], control_strength=s["strength"])
        with torch.no_grad():
            features = gpt.control_tokens(gpt.adapter_features(control, resize_mode("canny")))
            out = generate(gpt, gpt.embed_prefix(caption), (height // 16) * (width // 16), settings,
                           torch.Generator().manual_seed(seed), mask, features)
    finally:
        torch.set_num_threads(threads)
    return out.tolist()


def test_tokens_equal_the_kernel_pipeline_run_in_process(server, models_dir):
    """The whole node chain (fit, Canny, 14-px resize rule, caption cleaning and left padding, seeding) draws
    exactly the tokens of the kernels run here (the same computation: kernel_tokens); 256×192 is non-square on
    the MR model's 48-wide RoPE grid."""
    api = tokens_of(server.run_ok(graph("controlar_canny_mr", size=(256, 192), preview_every_rows=0, seed=77)))
    assert api == kernel_tokens(models_dir, server.base_dir / "input", 256, 192, seed=77)


def test_llamagen_base_generates_without_control(server):
    g = graph("controlar_canny_mr", size=(256, 256), preview_every_rows=0, control_image=None, cfg=7.5)
    g["1"]["inputs"]["model_name"] = "t2i_XL_stage2_512.pt"
    tokens = tokens_of(server.run_ok(g))
    assert len(tokens[0]) == 256
    g = graph("controlar_canny_mr", size=(256, 256), preview_every_rows=0)
    g["1"]["inputs"]["model_name"] = "t2i_XL_stage2_512.pt"
    assert "without a control encoder" in run_error(server, g)


def test_size_over_the_token_budget_is_refused_naming_it(server):
    g = graph("controlar_canny_mr", size=(1024, 1024))
    err = execution_error(server.run(g))
    message = err["exception_message"]
    assert "token budget of 2304" in message and "4096" in message, message
    # refused before the control map is made at that size (the sampler's control_image is lazy)
    assert one(g, "DiTControl_FitControlImage") not in err["executed"], err["executed"]
    g = graph("controlar_canny_mr")
    g["1"]["inputs"]["model_name"] = f"{RANDOM_FOLDER}/hed.safetensors"       # a 512-px model: 1024 tokens
    message = run_error(server, g)
    assert "token budget of 1024" in message and "1536" in message, message


@pytest.mark.both_hosts
def test_nan_cfg_or_top_p_is_refused_by_name_and_the_next_prompt_runs(server):
    """A NaN widget passes ComfyUI's range check (it compares false with min and max); without this check NaN
    cfg meant no CFG and NaN top_p no top-p, silently. ±Infinity is core's own refusal at /prompt."""
    for name in ("cfg", "top_p"):
        message = run_error(server, graph("controlar_canny_mr", size=(64, 64), preview_every_rows=0,
                                          **{name: float("nan")}))
        assert f"ControlAR Sampler: {name} is nan" in message and "finite" in message, message
    with pytest.raises(PromptRejected, match="value_bigger_than_max"):
        server.submit(graph("controlar_canny_mr", size=(64, 64), cfg=float("inf")))
    tokens = tokens_of(server.run_ok(graph("controlar_canny_mr", size=(64, 64), preview_every_rows=0, seed=6)))
    assert len(tokens[0]) == 16


def test_interrupt_stops_within_a_token_and_the_server_keeps_serving(server):
    g = graph("controlar_canny_mr", preview_every_rows=0, seed=1234, batch_size=4)
    start = len(server.log_path.read_text(errors="replace"))
    prompt_id = server.submit(g)
    deadline = time.time() + 300
    while "image tokens (48×32) × batch 4" not in server.log_path.read_text(errors="replace")[start:]:
        assert time.time() < deadline, server.log_tail(20)
        time.sleep(0.05)
    time.sleep(1.5)                                          # inside the 1536-token loop (several s)
    asked = time.time()
    server.post("/interrupt", {})
    history = server.wait(prompt_id)
    stopped = time.time() - asked
    kinds = [kind for kind, _ in history["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    log = server.log_path.read_text(errors="replace")[start:]
    line = next(line for line in log.splitlines() if "ControlAR Sampler interrupted after image token" in line)
    done = int(line.split("image token ")[1].split(" of ")[0])
    assert 0 <= done < 1536, line
    assert stopped < 5.0, stopped                            # one token is milliseconds; the rest would be many s
    # the server keeps serving: the next prompt runs
    tokens = tokens_of(server.run_ok(graph("controlar_canny_mr", size=(256, 256), preview_every_rows=0,
                                            seed=1234)))
    assert len(tokens[0]) == 256


@pytest.mark.both_hosts
def test_wrong_files_give_clear_errors_and_the_next_prompt_runs(server):
    def loader_error(name, node="1", key="model_name"):
        g = graph("controlar_canny_mr", size=(256, 256), preview_every_rows=0)
        g[node]["inputs"][key] = name
        return run_error(server, g)

    message = loader_error("broken/PixArt-XL-2-512x512.pth")
    assert "expected a ControlAR / LlamaGen GPT" in message and "PixArt" in message, message
    message = loader_error("broken/truncated_canny_MR.safetensors")
    assert "truncated" in message and "truncated_canny_MR.safetensors" in message, message
    message = loader_error(next(iter(GPT_FILES)), node="2", key="vq_name")
    assert "expected a LlamaGen VQ tokenizer" in message and "GPT loader" in message, message
    message = loader_error("vq_ds16_t2i.pt")
    assert "expected a ControlAR / LlamaGen GPT" in message and "VQ loader" in message, message
    message = loader_error("t5xxl_fp16.safetensors", node="3", key="t5_name")   # a T5 of another width
    assert "the caption is 64 wide" in message and "96-wide FLAN-T5 rows" in message, message
    message = loader_error("broken/overflow_canny_MR.safetensors")
    assert "logits turned NaN/Inf at image token 1 of 256" in message and "overflow" in message, message
    tokens = tokens_of(server.run_ok(graph("controlar_canny_mr", size=(256, 256), preview_every_rows=0, seed=5)))
    assert len(tokens[0]) == 256


@pytest.mark.parametrize("weight_dtype", ["int8", "int8_fast"])
def test_int8_weights_run(server, weight_dtype):
    start = len(server.log_path.read_text(errors="replace"))
    g = graph("controlar_canny_mr", size=(256, 256), preview_every_rows=0, seed=9)
    g["1"]["inputs"]["weight_dtype"] = weight_dtype
    history = server.run_ok(g)
    assert len(tokens_of(history)[0]) == 256 and png_size(server.images(history)[0]) == (256, 256)
    log = server.log_path.read_text(errors="replace")[start:]
    assert f"loaded {RANDOM_FOLDER}/canny_MR.safetensors as ControlAR" in log and "storage int8 weights" in log, \
        log[-2000:]


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8_e4m3fn"])
def test_narrow_float_storage_runs(server, weight_dtype):
    g = graph("controlar_canny_mr", size=(128, 128), preview_every_rows=0, seed=3)
    g["1"]["inputs"]["weight_dtype"] = weight_dtype
    assert len(tokens_of(server.run_ok(g))[0]) == 64


def previews_over_websocket(server, g: dict, timeout: float = 300.0) -> list:
    """Submit `g` as a websocket client and collect the preview images the server sends it (PIL images)."""
    import asyncio
    import struct
    import uuid

    import aiohttp

    client = uuid.uuid4().hex

    async def collect():
        images = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url.replace('http', 'ws')}/ws?clientId={client}") as ws:
                status, body = server.post("/prompt", {"prompt": g, "client_id": client})
                assert status == 200, body
                prompt_id = body["prompt_id"]
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        event = struct.unpack(">I", msg.data[:4])[0]
                        if event == 1:                                   # PREVIEW_IMAGE: image type, bytes
                            images.append(Image.open(io.BytesIO(msg.data[8:])))
                        elif event == 4:                                 # with metadata (json length, json)
                            n = struct.unpack(">I", msg.data[4:8])[0]
                            images.append(Image.open(io.BytesIO(msg.data[8 + n:])))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data["type"] in ("executing", "execution_success", "execution_error") and \
                                data["data"].get("prompt_id") == prompt_id and \
                                (data["type"] != "executing" or data["data"].get("node") is None):
                            break
        return images

    return asyncio.run(asyncio.wait_for(collect(), timeout))


@pytest.mark.both_hosts
def test_row_previews_reach_the_client(server):
    """preview_every_rows 4 on a 16-row image: previews of the first 4, 8 and 12 rows, 256 px wide (the
    server may scale them, keeping the aspect)."""
    images = previews_over_websocket(server, graph("controlar_canny_mr", size=(256, 256), preview_every_rows=4,
                                                   seed=11, tokens=False))
    aspects = [round(im.width / im.height, 2) for im in images]
    assert aspects == [round(256 / (16 * rows), 2) for rows in (4, 8, 12)], aspects


def test_compute_dtype_bf16_says_so_and_samples(server):
    """compute_dtype bf16: bf16 weights, maths and KV cache where the CPU has native bf16 (the description says
    why), a clear refusal naming the CPU feature elsewhere."""
    from dit_control.kernels.native_dtypes import native_bf16

    g = graph("controlar_canny_mr", size=(64, 64), preview_every_rows=0)
    loader = one(g, "DiTControl_ControlARLoader")
    g[loader]["inputs"]["compute_dtype"] = "bf16"
    g["91"] = {"class_type": "DiTControlProbe_TextReport", "inputs": {"text": [loader, 1]}}
    native, why = native_bf16("cpu")
    if not native:
        assert "avx512_bf16" in run_error(server, g)
        return
    history = server.run_ok(g)
    assert f"compute torch.bfloat16 (compute bf16: {why})" in history["outputs"]["91"]["text"][0]
    assert len(tokens_of(history)[0]) == 16
