"""Manifest parity for EasyControl (manifests/flux_easycontrol): the full-size FLUX.1-dev built on the meta
device from a config read off the native manifest has exactly its names and shapes, the diffusers layout
renames onto it (the published `from_diffusers` map, plus the adaLN halves swap), every released
EasyControl LoRA loads strictly and fits that model, and wrong files are named."""
import json

import pytest
import torch

from dit_control.kernels.checkpoint_io import CheckpointError
from dit_control.kernels.flux_easycontrol.checkpoint import (
    SWAPPED_HALVES,
    diffusers_to_native,
    expected_shapes,
    load_flux,
    prepare_flux,
)
from dit_control.kernels.flux_easycontrol.condition import Condition, EasyControl
from dit_control.kernels.flux_easycontrol.lora import EasyControlLoRAConfig, load_lora, prepare_lora
from dit_control.kernels.flux_easycontrol.lora import expected_shapes as lora_shapes
from dit_control.kernels.flux_easycontrol.model import Flux

LORA_NAMES = ("Ghibli", "canny", "depth", "hedsketch", "inpainting", "pose", "seg", "subject")


def manifest(shared, name):
    return json.loads((shared / "manifests/flux_easycontrol" / name).read_text())


def meta_state_dict(m: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in m["tensors"].items()}


@pytest.fixture(scope="module")
def native(shared):
    return manifest(shared, "flux1dev_comfy_native_transformer.json")


@pytest.fixture(scope="module")
def flux_config(native):
    return prepare_flux(meta_state_dict(native)).config


@pytest.fixture(scope="module")
def a_lora(shared):
    return meta_state_dict(manifest(shared, "easycontrol_canny.json"))


# ---------------------------------------------------------------------------------------------
#                                       The base FLUX.1-dev
# ---------------------------------------------------------------------------------------------

def test_full_size_flux_matches_native_manifest(native, flux_config):
    cfg = flux_config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.depth_single_blocks) == (3072, 24, 19, 38)
    assert (list(cfg.axes_dim), cfg.context_in_dim, cfg.vec_in_dim, cfg.in_channels) == ([16, 56, 56], 4096, 768, 16)
    assert cfg.guidance_embed and cfg.qkv_bias and cfg.mlp_ratio == 4.0
    ours = expected_shapes(cfg)
    assert ours == {k: tuple(v) for k, v in native["tensors"].items()}
    assert len(ours) == native["n_tensors"] == 780
    assert sum(torch.Size(s).numel() for s in ours.values()) == native["params"]


def test_diffusers_layout_renames_onto_native(shared, native):
    diffusers = manifest(shared, "flux1dev_diffusers_transformer.json")
    sd, cfg, layout = prepare_flux(meta_state_dict(diffusers))
    assert layout == "diffusers"
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v) for k, v in native["tensors"].items()}
    assert (cfg.num_heads, cfg.hidden_size) == (diffusers["config"]["num_attention_heads"],
                                                diffusers["config"]["num_attention_heads"]
                                                * diffusers["config"]["attention_head_dim"])


def test_diffusers_renaming_equals_published_map(native):
    """Mark each diffusers tensor with its identity [i, i + 0.5], convert, read back where it went: the
    fused tensors are the map's parts in order; final_layer.adaLN_modulation.1 also has its halves
    swapped (diffusers [scale, shift] -> native [shift, scale]), which the map does not mark."""
    parts = native["from_diffusers"]
    marks = {}
    for names in parts.values():
        for name in names:
            marks[name] = torch.tensor([len(marks), len(marks) + 0.5])
    converted = diffusers_to_native(marks)
    assert set(converted) == set(parts)
    for native_name, names in parts.items():
        expected = torch.cat([marks[n] for n in names])
        if native_name in SWAPPED_HALVES:
            expected = torch.cat(expected.chunk(2)[::-1])
        assert torch.equal(converted[native_name], expected), native_name


def test_full_checkpoint_prefix_is_stripped(native):
    sd = {f"model.diffusion_model.{k}": v for k, v in meta_state_dict(native).items()}
    assert prepare_flux(sd).layout == "native"


def test_strict_base_load_names_every_problem(native):
    sd = meta_state_dict(native)
    del sd["double_blocks.7.img_attn.qkv.bias"], sd["single_blocks.30.linear2.weight"]
    sd["double_blocks.0.img_attn.extra.weight"] = torch.empty(3, device="meta")
    sd["single_blocks.3.linear1.weight"] = torch.empty(21504, 3071, device="meta")
    with pytest.raises(CheckpointError) as e:
        prepare_flux(sd)
    text = str(e.value)
    for needle in ("double_blocks.7.img_attn.qkv.bias", "single_blocks.30.linear2.weight",
                   "double_blocks.0.img_attn.extra.weight",
                   "single_blocks.3.linear1.weight: expected (21504, 3072), found (21504, 3071)",
                   "2 missing", "1 unexpected", "1 shape mismatches", "native layout"):
        assert needle in text, needle


def test_lora_file_as_base_model_is_named(a_lora):
    with pytest.raises(CheckpointError) as e:
        load_flux(a_lora)
    assert "expected a FLUX.1 transformer" in str(e.value) and "EasyControl condition LoRA" in str(e.value)


# ---------------------------------------------------------------------------------------------
#                                     The released LoRAs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LORA_NAMES)
def test_released_lora_loads_strictly_and_fits_flux1_dev(shared, flux_config, name):
    m = manifest(shared, f"easycontrol_{name}.json")
    sd = meta_state_dict(m)
    cfg = prepare_lora(sd)
    assert cfg == EasyControlLoRAConfig(hidden_size=3072, rank=m["rank"], double_blocks=19, single_blocks=38)
    assert lora_shapes(cfg) == {k: tuple(v) for k, v in m["tensors"].items()}
    assert len(sd) == m["n_tensors"] == 380
    assert sum(t.numel() for t in sd.values()) == m["params"]
    lora = load_lora(sd)                              # strict load_state_dict on the meta device
    assert lora.processor("double", 18).proj_loras[0].up.weight.shape == (3072, 128)
    assert not hasattr(lora.processor("single", 37), "proj_loras")
    with torch.device("meta"):
        model = Flux(flux_config)
    EasyControl([Condition(torch.zeros(1, 16, 64, 64), lora)]).check_fits(model)


def test_lora_for_another_flux_is_refused(shared, flux_config):
    from dit_control.kernels.checkpoint_io import read_state_dict
    tiny = load_lora(read_state_dict(str(shared / "golden/easycontrol/lora_spatial.safetensors")))
    with torch.device("meta"):
        model = Flux(flux_config)
    with pytest.raises(CheckpointError) as e:
        EasyControl([Condition(torch.zeros(1, 16, 8, 8), tiny)]).check_fits(model)
    assert "2 double + 2 single blocks of width 64" in str(e.value)
    assert "19 double + 38 single blocks of width 3072" in str(e.value)


def test_strict_lora_load_names_every_problem(a_lora):
    sd = dict(a_lora)
    del sd["transformer_blocks.4.attn.processor.proj_loras.0.up.weight"]
    sd["transformer_blocks.0.attn.processor.q_loras.1.down.weight"] = torch.empty(128, 3072, device="meta")
    sd["single_transformer_blocks.9.attn.processor.v_loras.0.down.weight"] = torch.empty(64, 3072, device="meta")
    with pytest.raises(CheckpointError) as e:
        load_lora(sd)
    text = str(e.value)
    for needle in ("19 double + 38 single blocks, rank 128, width 3072",
                   "1 missing: transformer_blocks.4.attn.processor.proj_loras.0.up.weight",
                   "1 unexpected: transformer_blocks.0.attn.processor.q_loras.1.down.weight",
                   "single_transformer_blocks.9.attn.processor.v_loras.0.down.weight: expected (128, 3072), "
                   "found (64, 3072)"):
        assert needle in text, needle


def _meta(*names, shape=(4, 4)):
    return {n: torch.empty(shape, device="meta") for n in names}


FOREIGN = {
    "kohya FLUX LoRA": (_meta("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                              "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"), "kohya-style FLUX LoRA"),
    "PEFT FLUX LoRA": (_meta("transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"),
                       "PEFT/diffusers-style FLUX LoRA"),
    "ComfyUI FLUX LoRA": (_meta("diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight",
                                "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"),
                          "FLUX LoRA with lora_down/lora_up"),
    "PixArt transformer": (_meta("t_block.1.weight", "x_embedder.proj.weight", "blocks.0.attn.qkv.weight"),
                           "PixArt-α transformer"),
    "SD UNet": (_meta("model.diffusion_model.input_blocks.0.0.weight"), "Stable Diffusion UNet"),
}


@pytest.mark.parametrize("what", sorted(FOREIGN))
def test_foreign_files_are_named(what):
    sd, needle = FOREIGN[what]
    with pytest.raises(CheckpointError) as e:
        load_lora(sd)
    assert "expected an EasyControl condition LoRA" in str(e.value)
    assert needle in str(e.value)


def test_flux_base_as_lora_is_named(native):
    with pytest.raises(CheckpointError) as e:
        load_lora(meta_state_dict(native))
    assert "expected an EasyControl condition LoRA" in str(e.value) and "a FLUX transformer" in str(e.value)
