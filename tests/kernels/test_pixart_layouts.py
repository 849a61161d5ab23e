"""Manifest parity: full-size models built on the meta device have exactly the released names and
shapes, the diffusers renaming equals the published key map, and loading is strict."""
import json

import pytest
import torch

from dit_control.kernels.checkpoint_io import CheckpointError, check_strict
from dit_control.kernels.pixart.checkpoint import (
    TOLERATED_KEYS,
    diffusers_to_original,
    expected_shapes,
    infer_config,
    load_pixart,
    prepare_pixart,
)

BASE_MANIFESTS = {
    # file: (trained latent size, micro-conditions)
    "pixart_xl2_1024_ms_orig.json": (128, True),
    "pixart_xl2_512_orig.json": (64, False),
    "pixart_xl2_256_orig.json": (32, False),
    "pixart_xl2_1024_ms_diffusers.json": (128, True),
    "pixart_lcm_xl2_1024_ms_diffusers.json": (128, True),
    "pixart_xl2_512_diffusers.json": (64, False),
    "pixart_xl2_256_diffusers.json": (32, False),
}


def meta_state_dict(manifest: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in manifest["tensors"].items()}


@pytest.mark.parametrize("name", sorted(BASE_MANIFESTS))
def test_full_size_model_matches_manifest(shared, name):
    manifest = json.loads((shared / "manifests/pixart" / name).read_text())
    sample_size, micro = BASE_MANIFESTS[name]
    sd = meta_state_dict(manifest)
    diffusers = "diffusers" in name
    checked, cfg, layout = prepare_pixart(dict(sd), sample_size=None if not diffusers else sample_size)
    assert layout == ("diffusers" if diffusers else "original")
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.caption_channels) == (1152, 28, 16, 4096)
    assert cfg.sample_size == sample_size and cfg.micro_condition == micro
    assert cfg.pe_interpolation == sample_size / 64
    # every released tensor but the documented drops is a model tensor with the same shape
    ours = expected_shapes(cfg)
    assert set(ours) == set(checked)
    n_ours = sum(torch.Size(s).numel() for s in ours.values())
    dropped = sum(torch.Size(manifest["tensors"][k]).numel() for k in TOLERATED_KEYS if k in manifest["tensors"])
    assert n_ours + dropped == manifest["total_elements"]


def test_diffusers_renaming_equals_published_key_map(shared):
    for name in ("key_map_orig_to_diffusers_1024ms.json", "key_map_orig_to_diffusers_512.json"):
        key_map = json.loads((shared / "manifests/pixart" / name).read_text())["map"]
        # mark every diffusers tensor with its own identity, convert, and read back where it went
        sd = {e["dst"]: torch.full((1,), float(i)) for i, e in enumerate(key_map)}
        by_src = {}
        for i, e in enumerate(key_map):
            by_src.setdefault(e["src"], []).append((e["chunk"] or 0, float(i)))
        converted = diffusers_to_original(sd)
        assert set(converted) == set(by_src)
        for src, parts in by_src.items():
            assert converted[src].tolist() == [v for _, v in sorted(parts)], src


def test_strict_load_names_every_problem(shared):
    manifest = json.loads((shared / "manifests/pixart/pixart_xl2_1024_ms_orig.json").read_text())
    sd = meta_state_dict(manifest)
    del sd["blocks.3.mlp.fc1.weight"], sd["blocks.17.attn.qkv.bias"]
    sd["blocks.0.extra.weight"] = torch.empty(3, device="meta")
    sd["blocks.5.cross_attn.proj.weight"] = torch.empty(1152, 1151, device="meta")
    with pytest.raises(CheckpointError) as e:
        prepare_pixart(sd)
    text = str(e.value)
    for needle in ("blocks.3.mlp.fc1.weight", "blocks.17.attn.qkv.bias", "blocks.0.extra.weight",
                   "blocks.5.cross_attn.proj.weight: expected (1152, 1152), found (1152, 1151)",
                   "2 missing", "1 unexpected", "1 shape mismatches"):
        assert needle in text


def test_only_documented_keys_are_tolerated():
    """pos_embed may be absent or present; the null caption is part of the .pth model, not ignored."""
    cfg_sd = {"a": torch.empty(2)}
    check_strict({"a": (2,)}, {**cfg_sd, "pos_embed": torch.empty(1)}, "x", tolerated=TOLERATED_KEYS)
    with pytest.raises(CheckpointError):
        check_strict({"a": (2,)}, {**cfg_sd, "y_embedder.y_embedding": torch.empty(1)}, "x", tolerated=TOLERATED_KEYS)


@pytest.mark.parametrize("family", ["flux", "sd_unet", "t5"])
def test_foreign_checkpoints_are_named(family):
    sd = {
        "flux": {"double_blocks.0.img_attn.qkv.weight": torch.zeros(2), "img_in.weight": torch.zeros(2)},
        "sd_unet": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)},
        "t5": {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2)},
    }[family]
    with pytest.raises(CheckpointError) as e:
        load_pixart(sd)
    assert "expected a PixArt-α transformer" in str(e.value)
    assert {"flux": "FLUX", "sd_unet": "Stable Diffusion UNet", "t5": "T5"}[family] in str(e.value)


def test_config_inference_from_small_weights():
    from dit_control.kernels.pixart.model import PixArtConfig
    from dit_control.tests.generators.make_checkpoints import TINY_PIXART, random_pixart_state_dict
    cfg = PixArtConfig(sample_size=64, pe_interpolation=1.0, micro_condition=False, **TINY_PIXART)
    sd = random_pixart_state_dict(cfg, seed=0)
    inferred = infer_config(sd, sample_size=64)
    assert inferred == cfg
