"""PixArt-δ ControlNet-Transformer: golden parity (original and diffusers layouts), strength and
combination rules, full-size manifest parity on the meta device, and strict loading."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dit_control.kernels.checkpoint_io import CheckpointError, read_state_dict
from dit_control.kernels.pixart.checkpoint import expected_shapes, load_pixart
from dit_control.kernels.pixart.control_file import load_bundled_base
from dit_control.kernels.pixart.controlnet import (
    adapter_to_original,
    check_base_compatible,
    combine_controls,
    load_pixart_controlnet,
    prepare_pixart_controlnet,
)
from dit_control.kernels.pixart.model import pixart_xl2_512, pixart_xl2_1024_ms

GOLDEN = "golden/pixart_controlnet"


def _relative_error(ours, golden):
    return ((ours - golden).abs().max() / golden.abs().max()).item()


def _golden_config(shared) -> dict:
    return json.loads((shared / GOLDEN / "config.json").read_text())["config_original"]


def _overrides(cfg) -> dict:
    return dict(num_heads=cfg["num_heads"], sample_size=cfg["input_size"], pe_interpolation=cfg["lewei_scale"])


def _load_golden(shared, layout):
    """(base, controlnet) from the full original file, or from the diffusers adapter + diffusers base."""
    cfg = _golden_config(shared)
    if layout == "original":
        sd = read_state_dict(str(shared / GOLDEN / "weights_orig.safetensors"))
        control_sd, base_sd, info = prepare_pixart_controlnet(sd, **_overrides(cfg))
        base = load_bundled_base(base_sd, info)
    else:
        base = load_pixart(read_state_dict(str(shared / GOLDEN / "weights_diffusers_transformer.safetensors")),
                           **_overrides(cfg))
        sd = read_state_dict(str(shared / GOLDEN / "weights_diffusers.safetensors"))
        control_sd, base_sd, info = prepare_pixart_controlnet(sd)
        assert base_sd is None and info.layout == "diffusers-adapter"
    assert info.num_blocks == cfg["copy_blocks_num"]
    controlnet = load_pixart_controlnet(control_sd, base.config, info=info)
    return base.eval(), controlnet.eval()


@pytest.fixture(scope="module")
def golden_io(shared):
    return load_file(str(shared / GOLDEN / "io.safetensors"))


@pytest.fixture(scope="module")
def golden_models(shared):
    return {layout: _load_golden(shared, layout) for layout in ("original", "diffusers")}


def _run(base, io, control=None):
    with torch.no_grad():
        return base(io["x"], io["t"], io["y"], io["mask"], img_hw=io["img_hw"], aspect_ratio=io["aspect_ratio"],
                    control=control)


# ---------------------------------------------------------------------------------------------
#                                       Golden parity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_golden_with_and_without_control(golden_models, golden_io, layout):
    base, controlnet = golden_models[layout]
    out = _run(base, golden_io, controlnet.branch(golden_io["c"]))
    assert out.shape == golden_io["out"].shape
    assert _relative_error(out, golden_io["out"]) <= 1e-4
    assert _relative_error(_run(base, golden_io), golden_io["out_no_control"]) <= 1e-4


def test_both_layouts_load_the_same_weights(golden_models):
    (_, a), (_, b) = golden_models["original"], golden_models["diffusers"]
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
#                               Strength, combination, batch rules
# ---------------------------------------------------------------------------------------------

def test_strength_zero_is_the_base_model_bit_for_bit(golden_models, golden_io):
    base, controlnet = golden_models["original"]
    plain = _run(base, golden_io)
    assert torch.equal(_run(base, golden_io, controlnet.branch(golden_io["c"], strength=0.0)), plain)
    doubled = _run(base, golden_io, controlnet.branch(golden_io["c"], strength=2.0))
    assert _relative_error(doubled, golden_io["out"]) > 1e-2


def test_strengths_of_combined_controlnets_add_up(golden_models, golden_io):
    base, controlnet = golden_models["original"]
    once = _run(base, golden_io, controlnet.branch(golden_io["c"], strength=1.0))
    halves = combine_controls(controlnet.branch(golden_io["c"], 0.5), None, controlnet.branch(golden_io["c"], 0.5))
    assert _relative_error(_run(base, golden_io, halves), once) <= 1e-5
    assert combine_controls(None) is None


def test_control_latent_follows_the_sampler_batch(golden_models, golden_io):
    base, controlnet = golden_models["original"]
    c = golden_io["c"][:1]
    broadcast = _run(base, golden_io, controlnet.branch(c))
    explicit = _run(base, golden_io, controlnet.branch(c.repeat(2, 1, 1, 1)))
    assert torch.equal(broadcast, explicit)
    with pytest.raises(ValueError, match="batch 3 does not divide the sampler batch 2"):
        _run(base, golden_io, controlnet.branch(golden_io["c"][:1].repeat(3, 1, 1, 1)))


def test_control_latent_of_another_size_is_refused(golden_models, golden_io):
    base, controlnet = golden_models["original"]
    with pytest.raises(ValueError) as e:
        _run(base, golden_io, controlnet.branch(golden_io["c"][..., :16]))
    assert "16x16" in str(e.value) and "16x24" in str(e.value)


# ---------------------------------------------------------------------------------------------
#                       Full-size manifests on the meta device, key map
# ---------------------------------------------------------------------------------------------

CONTROL_MANIFESTS = {
    # file: (layout, bundled base: (sample_size, micro_condition) or None)
    "pixart_xl2_1024_controlnet_orig.json": ("original", (128, True)),
    "pixart_xl2_1024_controlnet_orig_controlnet_only.json": ("original-controlnet", None),
    "pixart_xl2_512_controlnet_orig.json": ("original", (64, False)),
    "pixart_xl2_512_controlnet_orig_trainconfig.json": ("original", (64, False)),
    "pixart_controlnet_adapter_diffusers.json": ("diffusers-adapter", None),
}


def _manifest(shared, name) -> dict:
    return json.loads((shared / "manifests/pixart" / name).read_text())


def _meta_state_dict(manifest: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in manifest["tensors"].items()}


def _numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


@pytest.mark.parametrize("name", sorted(CONTROL_MANIFESTS))
def test_full_size_controlnet_matches_manifest(shared, name):
    manifest = _manifest(shared, name)
    layout, bundled = CONTROL_MANIFESTS[name]
    control_sd, base_sd, info = prepare_pixart_controlnet(_meta_state_dict(manifest))
    assert info.layout == layout
    assert (info.num_blocks, info.hidden_size, info.mlp_ratio) == (13, 1152, 4.0)

    base_cfg = info.base_config or pixart_xl2_1024_ms()
    controlnet = load_pixart_controlnet(control_sd, base_cfg, info=info)   # full size, still on meta
    ours = {k: tuple(v.shape) for k, v in controlnet.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in control_sd.items()}
    assert controlnet.num_blocks == 13 and hasattr(controlnet.controlnet[0], "before_proj")
    assert not any(hasattr(b, "before_proj") for b in controlnet.controlnet[1:])
    n = _numel(ours.values())

    if bundled is None:
        assert base_sd is None
    else:
        cfg = info.base_config
        assert (cfg.sample_size, cfg.micro_condition) == bundled
        assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.pe_interpolation) == (1152, 28, 16, cfg.sample_size / 64)
        base_shapes = expected_shapes(cfg)
        assert base_shapes == {k: tuple(v.shape) for k, v in base_sd.items()}
        n += _numel(base_shapes.values())
    # every tensor of the file is used, except the documented dead ones
    assert n + _numel(manifest["tensors"][k] for k in info.dropped) == manifest["total_elements"]
    expected_drops = {"base_model.pos_embed"} if bundled else set()
    if name == "pixart_xl2_512_controlnet_orig.json":
        expected_drops |= {k for k in manifest["tensors"] if "csize_embedder" in k or "ar_embedder" in k}
        assert info.notes
    assert set(info.dropped) == expected_drops


def test_adapter_renaming_equals_published_key_map(shared):
    key_map = _manifest(shared, "key_map_orig_controlnet_to_diffusers_adapter.json")
    assert key_map["dropped_source_keys"] == []
    # mark every diffusers tensor with its own identity, convert, and read back where it went
    sd = {e["dst"]: torch.full((1,), float(i)) for i, e in enumerate(key_map["map"])}
    by_src = {}
    for i, e in enumerate(key_map["map"]):
        by_src.setdefault(e["src"], []).append((e["chunk"] or 0, float(i)))
    converted = adapter_to_original(sd)
    assert set(converted) == set(by_src)
    for src, parts in by_src.items():
        assert converted[src].tolist() == [v for _, v in sorted(parts)], src


# ---------------------------------------------------------------------------------------------
#                                         Strictness
# ---------------------------------------------------------------------------------------------

def test_strict_load_names_every_problem(shared):
    sd = _meta_state_dict(_manifest(shared, "pixart_xl2_1024_controlnet_orig.json"))
    del sd["controlnet.4.copied_block.mlp.fc1.weight"], sd["controlnet.0.before_proj.bias"]
    del sd["base_model.blocks.20.attn.qkv.bias"]
    sd["controlnet.1.before_proj.weight"] = torch.empty(1152, 1152, device="meta")   # only block 0 has it
    sd["controlnet.7.after_proj.weight"] = torch.empty(1152, 1151, device="meta")
    sd["stray.weight"] = torch.empty(2, device="meta")
    with pytest.raises(CheckpointError) as e:
        prepare_pixart_controlnet(sd)
    text = str(e.value)
    for needle in ("controlnet.4.copied_block.mlp.fc1.weight", "controlnet.0.before_proj.bias",
                   "controlnet.1.before_proj.weight", "stray.weight",
                   "controlnet.7.after_proj.weight: expected (1152, 1152), found (1152, 1151)",
                   "2 missing", "2 unexpected", "1 shape mismatches",
                   "base bundled in the ControlNet file", "blocks.20.attn.qkv.bias"):
        assert needle in text, needle


def test_adapter_leftovers_are_named(shared):
    sd = _meta_state_dict(_manifest(shared, "pixart_controlnet_adapter_diffusers.json"))
    del sd["controlnet_blocks.3.transformer_block.attn1.to_k.weight"]   # the fused qkv cannot be formed
    sd["controlnet_blocks.2.transformer_block.norm1.weight"] = torch.empty(1152, device="meta")
    with pytest.raises(CheckpointError) as e:
        prepare_pixart_controlnet(sd)
    text = str(e.value)
    for needle in ("controlnet.3.copied_block.attn.qkv.weight",
                   "controlnet_blocks.3.transformer_block.attn1.to_q.weight",
                   "controlnet_blocks.2.transformer_block.norm1.weight"):
        assert needle in text, needle


@pytest.mark.parametrize("family,needle", [
    ("flux", "a FLUX transformer"),
    ("pixart_base", "plain PixArt-α transformer"),
    ("relactrl", "RelaCtrl"),
])
def test_foreign_files_are_named(family, needle):
    sd = {
        "flux": {"double_blocks.0.img_attn.qkv.weight": torch.zeros(2), "img_in.weight": torch.zeros(2)},
        "pixart_base": {"t_block.1.weight": torch.zeros(2), "x_embedder.proj.weight": torch.zeros(2)},
        "relactrl": {"controlnet.0.process.scale_shift_table": torch.zeros(2),
                     "controlnet.0.after_proj.weight": torch.zeros(2)},
    }[family]
    with pytest.raises(CheckpointError) as e:
        prepare_pixart_controlnet(sd)
    assert "expected a PixArt-δ ControlNet-Transformer" in str(e.value)
    assert needle in str(e.value)


def test_base_compatibility(shared, golden_models):
    sd = _meta_state_dict(_manifest(shared, "pixart_xl2_1024_controlnet_orig_controlnet_only.json"))
    control_sd, _, info = prepare_pixart_controlnet(sd)
    tiny_base, tiny_controlnet = golden_models["original"]
    with pytest.raises(CheckpointError, match="width 1152 vs the base's 96"):
        load_pixart_controlnet(control_sd, tiny_base.config, info=info)
    with pytest.raises(CheckpointError, match="needs a PixArt-α base"):
        check_base_compatible(tiny_controlnet, {"hidden_size": 96})
    # the full 1024 file names its base: a 512 (non-MS) base is refused, the 1024-MS one accepted
    full = _meta_state_dict(_manifest(shared, "pixart_xl2_1024_controlnet_orig.json"))
    control_sd, _, info = prepare_pixart_controlnet(full)
    controlnet = load_pixart_controlnet(control_sd, pixart_xl2_1024_ms(), info=info)
    check_base_compatible(controlnet, pixart_xl2_1024_ms())
    with pytest.raises(CheckpointError, match="released with a PixArt-α XL/2 1024px MS"):
        check_base_compatible(controlnet, pixart_xl2_512())
    with pytest.raises(CheckpointError, match="13 control blocks feed base blocks"):
        check_base_compatible(controlnet, pixart_xl2_1024_ms(depth=12))
