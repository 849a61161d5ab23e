"""Manifest parity for DiT4SR (manifests/sd3_dit4sr): the full-size model (2.9 B) built on the meta device from
the config read off the released manifest has exactly its names and shapes, apart from the one documented list
of dead attn2 tensors (= the manifest's `unused_untrained_tensors`); loading is strict and names every problem;
foreign files (an SD3.5-medium / SD3-medium base without control tensors, ComfyUI's native MMDiT, FLUX, a
truncated or empty file, a config.json that does not describe the weights) get a clear CheckpointError."""
import json
import shutil

import pytest
import torch

from dit_control.kernels.checkpoint_io import CheckpointError
from dit_control.kernels.dit4sr.checkpoint import (
    DEAD_TENSOR_PARTS,
    dead_tensor_names,
    expected_shapes,
    load_dit4sr_file,
    prepare_dit4sr,
)
from dit_control.kernels.dit4sr.model import DiT4SR


def manifest(shared, folder, name):
    return json.loads((shared / "manifests" / folder / name).read_text())


def meta_state_dict(m: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in m["tensors"].items()}


@pytest.fixture(scope="module")
def released(shared):
    return manifest(shared, "sd3_dit4sr", "dit4sr_transformer.json")


@pytest.fixture(scope="module")
def prepared(released):
    return prepare_dit4sr(meta_state_dict(released), released["config"])


def numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def test_full_size_model_matches_released_manifest(released, prepared):
    checked, cfg = prepared
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.hidden_size) == (24, 24, 64, 1536)
    assert cfg.dual_attention_layers == tuple(range(13))
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.pos_embed_max_size) == (4096, 2048, 384)
    assert (cfg.in_channels, cfg.out_channels, cfg.patch_size, cfg.ff_inner_dim) == (16, 16, 2, 6144)
    ours = expected_shapes(cfg)
    dead = dead_tensor_names(cfg)
    # the documented list is exactly the release's dead tensors
    assert sorted(dead) == sorted(released["unused_untrained_tensors"]) and len(dead) == 130
    assert numel(released["tensors"][k] for k in dead) == 122_764_928   # the spec's "122.8M"
    # model + dead list = the release, name by name and shape by shape
    assert set(ours).isdisjoint(dead)
    assert {**ours, **{k: tuple(released["tensors"][k]) for k in dead}} == \
        {k: tuple(v) for k, v in released["tensors"].items()}
    assert len(ours) + len(dead) == released["n_tensors"] == 1383
    assert numel(ours.values()) + numel(released["tensors"][k] for k in dead) == released["params"]
    assert set(checked) == set(ours)
    # the trained set: every *control* tensor is a model tensor (to_k_control included, though it has no effect)
    control = [k for k in ours if "control" in k]
    assert len(control) == released["n_control_tensors"] == 344
    assert numel(ours[k] for k in control) == released["control_params"]
    assert sum(1 for k in control if ".to_k_control." in k) == 2 * (24 + 13)


def test_released_dtypes_are_base_f16_control_f32(released):
    """What load_dit4sr's default dtype rule relies on (the base's dtype wins in a mixed file)."""
    assert {v for k, v in released["dtypes"].items() if "control" in k} == {"F32"}
    assert {v for k, v in released["dtypes"].items() if "control" not in k} == {"F16"}


def test_meta_model_has_no_dead_modules_and_keeps_to_k_control(prepared):
    _, cfg = prepared
    with torch.device("meta"):
        model = DiT4SR(cfg)
    block = model.transformer_blocks[0]
    assert not hasattr(block.attn2, "add_q_proj") and not hasattr(block.attn2, "to_add_out")
    assert hasattr(block.attn, "to_k_control") and hasattr(block.attn2, "to_k_control")
    last = model.transformer_blocks[23]
    assert last.context_pre_only and not hasattr(last, "ff_context") and not hasattr(last.attn, "to_add_out")
    assert not hasattr(model.transformer_blocks[13], "attn2")


def test_dead_tensors_may_be_absent(released):
    sd = meta_state_dict(released)
    for k in released["unused_untrained_tensors"]:
        del sd[k]
    checked, cfg = prepare_dit4sr(sd, released["config"])
    assert len(checked) == 1383 - 130


def test_strict_load_names_every_problem(released):
    sd = meta_state_dict(released)
    del sd["transformer_blocks.7.attn.to_k_control.weight"]        # trained: must be there
    del sd["transformer_blocks.3.ff.control_conv.bias"]
    sd["transformer_blocks.13.attn2.add_q_proj.weight"] = torch.empty(1536, 1536, device="meta")  # not a dual block
    sd["transformer_blocks.5.attn.to_v_control.weight"] = torch.empty(1536, 1535, device="meta")
    with pytest.raises(CheckpointError) as e:
        prepare_dit4sr(sd, released["config"])
    text = str(e.value)
    for needle in ("transformer_blocks.7.attn.to_k_control.weight", "transformer_blocks.3.ff.control_conv.bias",
                   "transformer_blocks.13.attn2.add_q_proj.weight",
                   "transformer_blocks.5.attn.to_v_control.weight: expected (1536, 1536), found (1536, 1535)",
                   "2 missing", "1 unexpected", "1 shape mismatches", "DiT4SR"):
        assert needle in text


@pytest.mark.parametrize("name,base", [("sd35_medium_diffusers_transformer.json", "SD3.5 base"),
                                       ("sd3_medium_diffusers_transformer.json", "SD3 base")])
def test_base_without_control_tensors_is_named(shared, name, base):
    m = manifest(shared, "sd3_dit4sr", name)
    with pytest.raises(CheckpointError) as e:
        prepare_dit4sr(meta_state_dict(m), m["config"])
    text = str(e.value)
    assert base in text and "without DiT4SR's control tensors" in text and "to_q_control" in text


def test_comfy_native_sd35_is_named(shared):
    m = manifest(shared, "sd3_dit4sr", "sd35_medium_comfy_native_mmdit.json")
    with pytest.raises(CheckpointError) as e:
        prepare_dit4sr(meta_state_dict(m))
    assert "an SD3 MMDiT" in str(e.value) and "ComfyUI's single-file MMDiT naming" in str(e.value)


@pytest.mark.parametrize("name", ["flux1dev_comfy_native_transformer.json", "flux1dev_diffusers_transformer.json"])
def test_flux_file_is_named(shared, name):
    with pytest.raises(CheckpointError) as e:
        prepare_dit4sr(meta_state_dict(manifest(shared, "flux_easycontrol", name)))
    assert "expected a DiT4SR transformer" in str(e.value) and "a FLUX transformer" in str(e.value)


@pytest.fixture()
def tiny_folder(shared, tmp_path):
    src = shared / "golden" / "dit4sr" / "transformer"
    dst = tmp_path / "transformer"
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def test_truncated_and_empty_files_are_named(tiny_folder):
    weights = tiny_folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_dit4sr_file(str(weights))
    assert "truncated" in str(e.value)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_dit4sr_file(str(tiny_folder))
    assert "empty" in str(e.value)


def test_config_json_must_describe_the_weights(tiny_folder):
    cfg_path = tiny_folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    model, config = load_dit4sr_file(str(tiny_folder))             # as released: agrees
    assert config.sample_size == cfg["sample_size"]
    cfg["num_attention_heads"] = 8
    cfg["dual_attention_layers"] = [0, 1, 2]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_dit4sr_file(str(tiny_folder))
    assert "num_attention_heads: config.json says 8, the weights have 4" in str(e.value)
    assert "dual_attention_layers" in str(e.value)


def test_dead_list_is_one_documented_rule():
    added_stream = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k")
    assert len(DEAD_TENSOR_PARTS) == 10 and all(p.split(".")[0] in added_stream for p in DEAD_TENSOR_PARTS)


def test_missing_config_tensor_is_a_checkpoint_error(released):
    sd = meta_state_dict(released)
    del sd["proj_out.weight"]
    with pytest.raises(CheckpointError) as e:
        prepare_dit4sr(sd)
    assert "proj_out.weight is missing" in str(e.value)
