"""Manifest parity for ControlAR / LlamaGen (manifests/controlar, not its transformers5/ renaming): for every
released (or code-derived) layout, the full-size model built on the meta device from the config read off the
manifest has exactly its names and shapes, its parameter and state-dict element counts, and loads strictly
(assign on meta: no memory). The documented stray keys are tolerated; anything else is named. Foreign files (a
PixArt checkpoint, the VQ given to the GPT loader and back, transformers-5 naming, a truncated or empty file) get a
clear CheckpointError."""
import json

import pytest
import torch

from dit_control.kernels.checkpoint_io import CheckpointError
from dit_control.kernels.controlar.checkpoint import (
    infer_gpt_config,
    load_gpt,
    load_gpt_file,
    load_vq,
    load_vq_file,
    prepare_gpt,
    prepare_vq,
)
from dit_control.kernels.controlar.text import encode_caption
from dit_control.kernels.t5 import T5Config, T5Encoder, infer_t5_config, t5_expected_shapes

GPT_MANIFESTS = ["controlar_t2i_XL_dinov2s_512", "controlar_t2i_XL_dinov2s_768_MR", "controlar_t2i_XL_dinov2b_512",
                 "controlar_c2i_B_vits_256", "controlar_c2i_L_vits_256", "llamagen_t2i_XL", "llamagen_c2i_B",
                 "llamagen_c2i_L", "llamagen_c2i_XL", "llamagen_c2i_XXL", "llamagen_c2i_3B"]

# what each layout must be read as: (name, heads, T, block size, control encoder)
EXPECTED = {
    "controlar_t2i_XL_dinov2s_512": ("GPT-XL", 20, 120, 1024, "DINOv2-S"),
    "controlar_t2i_XL_dinov2s_768_MR": ("GPT-XL", 20, 120, 2304, "DINOv2-S"),
    "controlar_t2i_XL_dinov2b_512": ("GPT-XL", 20, 120, 1024, "DINOv2-B"),
    "controlar_c2i_B_vits_256": ("GPT-B", 12, 1, 256, "ViT-S/16"),
    "controlar_c2i_L_vits_256": ("GPT-L", 16, 1, 256, "ViT-S/16"),
    "llamagen_t2i_XL": ("GPT-XL", 20, 120, 1024, None),
    "llamagen_c2i_B": ("GPT-B", 12, 1, 256, None),
    "llamagen_c2i_L": ("GPT-L", 16, 1, 256, None),
    "llamagen_c2i_XL": ("GPT-XL", 20, 1, 256, None),
    "llamagen_c2i_XXL": ("GPT-XXL", 24, 1, 256, None),
    "llamagen_c2i_3B": ("GPT-3B", 32, 1, 256, None),
}


@pytest.fixture(scope="module")
def folder(shared):
    return shared / "manifests" / "controlar"


@pytest.fixture(scope="module")
def index(folder):
    return json.loads((folder / "INDEX.json").read_text())


def meta_state_dict(folder, name) -> dict:
    m = json.loads((folder / f"{name}.json").read_text())
    return {k: torch.empty(v, device="meta") for k, v in m["tensors"].items()}


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def test_every_manifest_is_covered(folder, index):
    assert sorted(GPT_MANIFESTS + ["vq16"]) == sorted(index) == sorted(p.stem for p in folder.glob("*.json")
                                                                        if p.stem != "INDEX")


@pytest.mark.parametrize("name", GPT_MANIFESTS)
def test_gpt_manifest_strict_on_meta(folder, index, name):
    sd = meta_state_dict(folder, name)
    info = index[name]
    assert len(sd) == info["tensor_count"]
    model, cfg = load_gpt(sd)                              # strict, assign on the meta device
    title, heads, t, block, encoder = EXPECTED[name]
    assert cfg.describe().startswith(title) and cfg.n_head == heads
    assert (cfg.cls_token_num, cfg.block_size, cfg.vocab_size) == (t, block, 16384)
    assert (cfg.control.describe().split(" ")[0] if cfg.control else None) == encoder
    ours = model.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert numel(ours.values()) == info["state_dict_numel"]
    assert numel(model.parameters()) == info["parameter_count"]
    buffers = sorted(k for k, _ in model.named_buffers())
    assert buffers == sorted(info["persistent_buffers"])
    by_module = {}
    for k, v in ours.items():
        by_module[k.split(".")[0]] = by_module.get(k.split(".")[0], 0) + v.numel()
    assert by_module == info["numel_by_top_level_module"]


def test_known_sizes_and_injection_points(folder):
    cfg = infer_gpt_config(meta_state_dict(folder, "controlar_t2i_XL_dinov2s_512"))
    assert (cfg.dim, cfg.n_layer, cfg.ffn_hidden, cfg.head_dim, cfg.caption_dim) == (1280, 36, 3584, 64, 2048)
    assert cfg.injection_layers == (0, 12, 24) and cfg.grid == 32
    assert infer_gpt_config(meta_state_dict(folder, "controlar_t2i_XL_dinov2s_768_MR")).grid == 48
    assert infer_gpt_config(meta_state_dict(folder, "controlar_c2i_L_vits_256")).injection_layers == (0, 8, 16)
    assert infer_gpt_config(meta_state_dict(folder, "controlar_c2i_B_vits_256")).injection_layers == (0, 4, 8)
    assert infer_gpt_config(meta_state_dict(folder, "llamagen_c2i_3B")).head_dim == 100
    # a base's block size is not in its weights: it can be given
    assert infer_gpt_config(meta_state_dict(folder, "llamagen_c2i_B"), block_size=576).grid == 24


def test_vq16_manifest_strict_on_meta(folder, index):
    sd = meta_state_dict(folder, "vq16")
    model, cfg = load_vq(sd)
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.num_res_blocks) == \
        (16384, 8, 128, (1, 1, 2, 2, 4), 256, 2)
    ours = model.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert len(ours) == index["vq16"]["tensor_count"] == 344
    assert numel(model.parameters()) == index["vq16"]["parameter_count"]
    assert numel(ours.values()) == index["vq16"]["state_dict_numel"]
    decoder_widths = [lvl.res[0].conv1.out_channels for lvl in model.decoder.conv_blocks]
    assert decoder_widths == [512, 256, 256, 128, 128]


def test_documented_stray_keys_are_tolerated_and_dropped(folder):
    sd = meta_state_dict(folder, "llamagen_c2i_B")
    stray = {"freqs_cis": torch.empty(257, 32, 2, device="meta"),
             "layers.3.attention.kv_cache.k_cache": torch.empty(2, 12, 264, 64, device="meta"),
             "layers.3.attention.kv_cache.v_cache": torch.empty(2, 12, 264, 64, device="meta")}
    checked, _ = prepare_gpt({**sd, **stray})
    assert set(checked) == set(sd)


def test_problems_are_named(folder):
    sd = meta_state_dict(folder, "controlar_t2i_XL_dinov2s_512")
    broken = dict(sd)
    del broken["condition_layers.1.fc2.weight"]
    broken["condition_layers.1.fc2.weight_extra"] = torch.empty(3, device="meta")
    broken["layers.5.feed_forward.w2.weight"] = torch.empty(1280, 3583, device="meta")
    with pytest.raises(CheckpointError) as e:
        prepare_gpt(broken)
    text = str(e.value)
    assert "1 missing: condition_layers.1.fc2.weight" in text
    assert "condition_layers.1.fc2.weight_extra" in text
    assert "layers.5.feed_forward.w2.weight: expected (1280, 3584), found (1280, 3583)" in text
    vq = meta_state_dict(folder, "vq16")
    del vq["quantize.codebook_used"]                   # the reference loads strict: the buffer must be there
    with pytest.raises(CheckpointError, match="quantize.codebook_used"):
        prepare_vq(vq)


def test_transformers5_naming_is_named(folder):
    sd = meta_state_dict(folder / "transformers5", "controlar_t2i_XL_dinov2s_512")
    with pytest.raises(CheckpointError, match="transformers-5 naming"):
        prepare_gpt(sd)


def test_unknown_size_needs_a_head_count(folder):
    sd = meta_state_dict(folder, "llamagen_c2i_B")
    sd = {k: v for k, v in sd.items() if not k.startswith("layers.11.")}
    with pytest.raises(CheckpointError, match="give its head count"):
        infer_gpt_config(sd)
    assert infer_gpt_config(sd, n_head=12).n_layer == 11


def test_foreign_files(shared, folder, tmp_path):
    pixart = shared / "golden" / "pixart_ms" / "weights_orig.safetensors"
    with pytest.raises(CheckpointError, match="expected a ControlAR / LlamaGen GPT"):
        load_gpt_file(str(pixart))
    with pytest.raises(CheckpointError, match="expected a LlamaGen VQ tokenizer"):
        load_vq_file(str(pixart))
    golden = shared / "golden" / "controlar"
    with pytest.raises(CheckpointError, match="this is the VQ image tokenizer"):
        load_gpt_file(str(golden / "vq.safetensors"))
    with pytest.raises(CheckpointError, match="this is the GPT"):
        load_vq_file(str(golden / "weights.safetensors"))
    data = (golden / "weights.safetensors").read_bytes()
    truncated = tmp_path / "hed.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_gpt_file(str(truncated), n_head=4, adapter_heads=2)
    empty = tmp_path / "vq_ds16_t2i.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_vq_file(str(empty))


def test_wrapped_pt_files_load(shared, tmp_path):
    """LlamaGen's `{"model": …}` .pt wrapper (VQ and bases) and the flat safetensors read the same."""
    from safetensors.torch import load_file
    golden = shared / "golden" / "controlar"
    sd = load_file(str(golden / "vq.safetensors"))
    torch.save({"model": sd, "steps": 1}, tmp_path / "vq_ds16_t2i.pt")
    model, _ = load_vq_file(str(tmp_path / "vq_ds16_t2i.pt"))
    assert torch.equal(model.quantize.embedding.weight, sd["quantize.embedding.weight"])


def test_flan_t5_xl_config_from_weights():
    """ControlAR's FLAN-T5-XL runs through kernels/t5.py: its shapes give back its config (d_model 2048, 32 heads
    of 64, d_ff 5120, 24 blocks), and the caption rule sits on top of our encoder."""
    flan_xl = T5Config(vocab_size=32128, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24)
    shapes = t5_expected_shapes(flan_xl)
    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert infer_t5_config(sd) == flan_xl
    tiny = T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=4, d_ff=24, num_layers=2)
    torch.manual_seed(0)
    enc = T5Encoder(tiny).eval()
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([[5, 9, 11, 1, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    emb, left = encode_caption(enc, ids, mask)
    with torch.no_grad():
        raw = enc(ids, mask)
    assert left.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert torch.count_nonzero(emb[0, :4]) == 0 and torch.equal(emb[0, 4:], raw[0, :4])
