"""kernels/t5.py: parity with transformers.T5EncoderModel, full-size layout, strict loading, file errors."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from dit_control.kernels.t5 import (
    T5CheckpointError,
    T5Config,
    T5Encoder,
    infer_t5_config,
    load_t5_encoder,
    load_t5_encoder_file,
    read_t5_state_dict,
    relative_position_bucket,
)

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2)
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)


def hf_config(**dims):
    return transformers.T5Config(**dims, feed_forward_proj="gated-gelu", dropout_rate=0.0)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(hf_config(**TINY)).eval()
    with torch.no_grad():  # HF inits norms to 1; make them matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_sd(hf_model):
    """Plain tensors (tie broken, contiguous) as a file would hold them."""
    return {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 140), generator=g)  # > max_distance: every bucket kind
    mask = torch.ones(2, 140, dtype=torch.long)
    mask[1, 57:] = 0                                                     # right-padded second sample
    return ids, mask


def write_layout(root: Path, layout: str, hf_model, hf_sd) -> Path:
    """The same weights in each supported on-disk layout; returns what to pass to read_t5_state_dict."""
    if layout == "comfy_single_file":      # HF names, both tied names present (cloned)
        save_file(hf_sd, root / "t5xxl_fp32.safetensors")
        return root / "t5xxl_fp32.safetensors"
    if layout == "hf_sharded_safetensors":
        hf_model.save_pretrained(root / "hf", max_shard_size="60KB")
        assert (root / "hf" / "model.safetensors.index.json").exists()
        return root / "hf"
    if layout == "diffusers_text_encoder":
        hf_model.save_pretrained(root / "text_encoder")
        (root / "model_index.json").write_text("{}")
        return root
    if layout == "hf_sharded_bin":       # pytorch_model.bin.index.json + .bin shards, embed under one name
        folder = root / "bin"
        folder.mkdir()
        keys = [k for k in hf_sd if k != "encoder.embed_tokens.weight"]
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        weight_map = {}
        for shard, names in shards.items():
            torch.save({k: hf_sd[k] for k in names}, folder / shard)
            weight_map.update({k: shard for k in names})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return folder
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["comfy_single_file", "hf_sharded_safetensors", "diffusers_text_encoder",
                                    "hf_sharded_bin"])
def test_parity_with_transformers(tmp_path, layout, hf_model, hf_sd, inputs):
    ids, mask = inputs
    sd = read_t5_state_dict(write_layout(tmp_path, layout, hf_model, hf_sd))
    model, cfg = load_t5_encoder(sd)
    assert cfg == T5Config(**TINY)
    with torch.no_grad():
        ref = hf_model(input_ids=ids).last_hidden_state
        ours = model(ids)
        assert ours.shape == (2, 140, TINY["d_model"]) and ours.dtype == torch.float32
        assert (ours - ref).abs().max().item() <= 1e-5
        ref_m = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours_m = model(ids, mask)
        valid = mask.bool()
        assert (ours_m - ref_m)[valid].abs().max().item() <= 1e-5
        # the mask must matter for the padded sample and not at all for the full one
        assert (ours_m[1, :57] - ours[1, :57]).abs().max().item() > 1e-3
        assert (ours_m[0] - ours[0]).abs().max().item() <= 1e-6


def test_relative_position_bucket_matches_transformers():
    rel = torch.arange(-300, 301)[None, :]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_bucket(rel, 32, 128), ref)


def test_load_from_file_and_no_copy(tmp_path, hf_model, hf_sd, inputs):
    model, _ = load_t5_encoder_file(write_layout(tmp_path, "comfy_single_file", hf_model, hf_sd))
    params = dict(model.named_parameters())
    assert not any(p.is_meta or p.requires_grad for p in params.values())
    assert model.shared.weight is model.encoder.embed_tokens.weight
    # dtype=None: the model's parameters are the state dict's tensors, not copies
    model2, _ = load_t5_encoder(hf_sd)
    assert model2.encoder.block[1].layer[1].DenseReluDense.wo.weight.data_ptr() == \
        hf_sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"].data_ptr()
    with torch.no_grad():
        assert torch.equal(model(inputs[0][:, :16]), model2(inputs[0][:, :16]))


def test_xxl_layout_matches_transformers_on_meta():
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(hf_config(**XXL))
        ours = T5Encoder(T5Config.xxl())
    assert T5Config.xxl() == T5Config(**XXL)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert len(our_shapes) == 220
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_ref == 4_762_310_656
    meta_sd = {k: torch.empty(s, device="meta") for k, s in ref_shapes.items()}
    assert infer_t5_config(meta_sd) == T5Config.xxl()


def test_operations_namespace_is_used(hf_sd):
    class CountingLinear(nn.Linear):
        calls = 0

        def forward(self, x):
            CountingLinear.calls += 1
            return super().forward(x)

    class Ops:
        Linear = CountingLinear
        Embedding = nn.Embedding

    model, cfg = load_t5_encoder(hf_sd, operations=Ops)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert CountingLinear.calls == cfg.num_layers * 7  # q k v o wi_0 wi_1 wo


def test_decoder_and_lm_head_are_dropped(hf_sd):
    sd = dict(hf_sd)
    sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(64, 64)
    sd["decoder.final_layer_norm.weight"] = torch.zeros(64)
    sd["lm_head.weight"] = torch.zeros(128, 64)
    load_t5_encoder(sd)


def test_strict_missing_extra_and_mismatch_all_named(hf_sd):
    sd = dict(hf_sd)
    del sd["encoder.block.1.layer.0.SelfAttention.k.weight"]
    del sd["encoder.final_layer_norm.weight"]
    sd["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(3)
    sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = torch.zeros(64, 95)
    with pytest.raises(T5CheckpointError) as e:
        load_t5_encoder(sd)
    msg = str(e.value)
    for name in ("encoder.block.1.layer.0.SelfAttention.k.weight", "encoder.final_layer_norm.weight",
                 "encoder.block.0.layer.0.SelfAttention.extra.weight",
                 "encoder.block.1.layer.1.DenseReluDense.wo.weight: expected (64, 96), found (64, 95)"):
        assert name in msg
    assert "T5-v1.1 encoder" in msg and "2 blocks, d_model 64" in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_strict_each_kind_alone(hf_sd, change):
    sd = dict(hf_sd)
    key = {"missing": "encoder.block.0.layer.1.layer_norm.weight",
           "extra": "scaled_fp8",
           "shape": "encoder.block.0.layer.0.SelfAttention.o.weight"}[change]
    if change == "missing":
        del sd[key]
    elif change == "extra":
        sd[key] = torch.zeros(0)
    else:
        sd[key] = torch.zeros(64, 32)
    with pytest.raises(T5CheckpointError, match=key.replace(".", r"\.")):
        load_t5_encoder(sd)


def test_missing_config_key_still_names_every_key(hf_sd):
    sd = dict(hf_sd)
    del sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    del sd["encoder.block.1.layer.1.layer_norm.weight"]
    with pytest.raises(T5CheckpointError) as e:
        load_t5_encoder(sd)
    assert "relative_attention_bias.weight" in str(e.value) and "block.1.layer.1.layer_norm" in str(e.value)


def test_flux_like_dict_is_not_t5():
    sd = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2), "time_in.in_layer.weight": torch.zeros(2, 2)}
    with pytest.raises(T5CheckpointError, match="not a T5 encoder: found keys like double_blocks.0"):
        load_t5_encoder(sd)
    with pytest.raises(T5CheckpointError, match="not a T5 encoder"):
        load_t5_encoder({"model.diffusion_model.t_block.1.weight": torch.zeros(2)})


def test_empty_and_truncated_files_name_the_file(tmp_path, hf_sd):
    empty = tmp_path / "t5_empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(T5CheckpointError, match="t5_empty.safetensors.*empty"):
        read_t5_state_dict(empty)
    good = tmp_path / "t5_good.safetensors"
    save_file(hf_sd, good)
    cut = tmp_path / "t5_cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(T5CheckpointError, match="t5_cut.safetensors.*truncated"):
        read_t5_state_dict(cut)
    cut_bin = tmp_path / "pytorch_model.bin"
    torch.save(hf_sd, cut_bin)
    cut_bin.write_bytes(cut_bin.read_bytes()[:5000])
    with pytest.raises(T5CheckpointError, match="pytorch_model.bin"):
        read_t5_state_dict(tmp_path / "pytorch_model.bin")
    (tmp_path / "no_weights").mkdir()
    with pytest.raises(T5CheckpointError, match="no_weights.*no weights file"):
        read_t5_state_dict(tmp_path / "no_weights")


def test_bf16_load_is_close(hf_sd, inputs):
    ids, mask = inputs
    m32, _ = load_t5_encoder(hf_sd)
    m16, _ = load_t5_encoder(hf_sd, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert m16.shared.weight is m16.encoder.embed_tokens.weight
    with torch.no_grad():
        a, b = m32(ids, mask), m16(ids, mask)
    assert b.dtype == torch.bfloat16
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(a[valid], b[valid].float(), dim=-1)
    assert cos.min().item() >= 0.99


@pytest.mark.parametrize("layout", ["comfy_single_file", "hf_sharded_safetensors", "diffusers_text_encoder",
                                    "hf_sharded_bin"])
def test_file_loader_streams_every_layout_to_the_same_model(tmp_path, layout, hf_model, hf_sd, inputs):
    """load_t5_encoder_file (header check + one tensor at a time for safetensors) == transformers."""
    ids, mask = inputs
    model, cfg = load_t5_encoder_file(write_layout(tmp_path, layout, hf_model, hf_sd))
    assert cfg == T5Config(**TINY) and model.shared.weight is model.encoder.embed_tokens.weight
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model(ids, mask)
    assert (ours - ref)[mask.bool()].abs().max().item() <= 1e-5


def test_streamed_int8_encoder_keeps_cosine_and_a_quarter_of_the_bytes(tmp_path, hf_model, hf_sd, inputs):
    from dit_control.kernels.int8 import Int8Linear, Int8Ops, weight_bytes
    ids, mask = inputs
    path = write_layout(tmp_path, "hf_sharded_safetensors", hf_model, hf_sd)
    model, _ = load_t5_encoder_file(path, operations=Int8Ops, dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == TINY["num_layers"] * 7 and all(m.weight.dtype == torch.int8 for m in linears)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model(ids, mask)
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(ours[valid], ref[valid], dim=-1)
    assert cos.min().item() >= 0.99
    fp32_linear = sum(m.in_features * m.out_features * 4 for m in linears)
    int8_linear = sum(weight_bytes(m) for m in linears)
    assert int8_linear <= 0.30 * fp32_linear


def test_streaming_loader_names_a_truncated_shard(tmp_path, hf_model, hf_sd):
    folder = write_layout(tmp_path, "hf_sharded_safetensors", hf_model, hf_sd)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(T5CheckpointError, match=f"{shard.name}.*truncated"):
        load_t5_encoder_file(folder)


_PEAK_SCRIPT = """
import gc, torch
from dit_control.kernels.checkpoint_io import release_free_heap
from dit_control.kernels.int8 import Int8Ops
from dit_control.kernels.t5 import load_t5_encoder_file
def status(field):
    return int(open('/proc/self/status').read().split(field + ':')[1].split()[0]) / 1024
# a first load pays the process's one-time costs (kernel libraries, thread pools); then measure a second
model, _ = load_t5_encoder_file({path!r}, operations=Int8Ops, dtype=torch.float32)
del model
gc.collect()
release_free_heap()
open('/proc/self/clear_refs', 'w').write('5')   # reset the peak (VmHWM) to the current RSS
before = status('VmRSS')
model, _ = load_t5_encoder_file({path!r}, operations=Int8Ops, dtype=torch.float32)
print(before, status('VmHWM'))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
def test_int8_streaming_load_never_holds_the_float_weights(tmp_path):
    """A 400 MB fp32 T5 loaded as int8 raises the process's peak RSS by far less than its float size."""
    import subprocess
    cfg = T5Config(vocab_size=4096, d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=8)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5Encoder(cfg).state_dict().items() if k != "encoder.embed_tokens.weight"}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    path = tmp_path / "t5_medium_fp32.safetensors"
    save_file(sd, path)
    fp32_mb = path.stat().st_size / 2**20
    del sd
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT.format(path=str(path))],
                         capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split()[-2:])
    grew = after - before
    assert fp32_mb > 350
    # the int8 result (~27% of fp32) plus one layer's floats in flight; a whole-file read would add 100%
    assert grew <= 0.40 * fp32_mb, f"peak RSS grew {grew:.0f} MB loading a {fp32_mb:.0f} MB fp32 file"


@pytest.mark.parametrize("layout", ["comfy_single_file", "hf_sharded_safetensors", "diffusers_text_encoder",
                                    "hf_sharded_bin"])
def test_stored_dtype_is_read_without_loading(tmp_path, layout, hf_model, hf_sd):
    from dit_control.kernels.t5 import t5_stored_dtype
    half = {k: v.half() for k, v in hf_sd.items()}
    if layout == "comfy_single_file":
        save_file(half, tmp_path / "t5.safetensors")
        assert t5_stored_dtype(tmp_path / "t5.safetensors") == torch.float16
    assert t5_stored_dtype(write_layout(tmp_path, layout, hf_model, hf_sd)) == torch.float32
