"""Golden parity of the DiT4SR kernel (specs/dit4sr.md, specs/golden.md, golden/dit4sr), its quirk checks and the
reference's latent tiling:

- `out` through our loader (the released `transformer/` folder layout, config.json beside it) + kernel;
- the non-square case through our true-grid conv (an extension: upstream asserts), against
  `ns_out_truegrid_EXTENSION`;
- the released weights' quirks: to_k_control and the dead attn2 tensors change nothing (bit for bit); zeroing
  to_q_control / to_v_control / control_conv / attn2.to_out.0 or the conv factor 1.0 move the output by what the
  reference measured (config.json `sensitivity_max_abs_change_of_out`);
- tiling: a latent that fits is bit-identical with tiling on and off; a 2×2-tile latent equals a hand-written
  Gaussian-weighted blend of per-tile predictions, however the tiles are batched; no seam step on a smooth input.

Max error ≤ 1e-4 · max |golden| (the default tolerance).
"""
import math

import pytest
import torch

from dit_control.kernels.checkpoint_io import read_json_beside, read_state_dict
from dit_control.kernels.dit4sr.checkpoint import dead_tensor_names, load_dit4sr, load_dit4sr_file
from dit_control.kernels.dit4sr.tiling import TileSettings, gaussian_weights, grid_starts, run_tiled, tile_layout
from dit_control.tests.kernels.golden_data import golden_fixtures, relative_error

one_thread, golden, io, config = golden_fixtures("dit4sr")


@pytest.fixture(scope="module")
def state_dict(golden):
    return read_state_dict(str(golden / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def config_json(golden):
    return read_json_beside(str(golden / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def model(golden):
    model, _ = load_dit4sr_file(str(golden / "transformer"))       # the released folder layout
    return model.eval()


def run(model, io, **kw):
    with torch.no_grad():
        return model(io["latent"], io["timestep"], io["encoder_hidden_states"], io["pooled_projections"],
                     io["lr_latent"], **kw)


def variant(state_dict, config_json, edit, **overrides):
    sd = {k: v.clone() for k, v in state_dict.items()}
    edit(sd)
    model, cfg = load_dit4sr(sd, config_json)
    for k, v in overrides.items():
        for block in model.transformer_blocks:
            setattr(block.ff, k, v)
    return model.eval()


# ---------------------------------------------------------------------------------------------
#                                          Golden parity
# ---------------------------------------------------------------------------------------------

def test_config_read_from_the_weights(model, config):
    cfg, tiny = model.config, config["model"]["tiny_diffusers_config"]
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim) == (tiny["num_layers"], tiny["num_attention_heads"],
                                                             tiny["attention_head_dim"])
    assert cfg.hidden_size == tiny["caption_projection_dim"]
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.pos_embed_max_size) == (
        tiny["joint_attention_dim"], tiny["pooled_projection_dim"], tiny["pos_embed_max_size"])
    assert list(cfg.dual_attention_layers) == tiny["dual_attention_layers"]
    assert cfg.conv_factor == config["scalars"]["cross_stream_conv_factor"]


@pytest.mark.parametrize("tiles", [TileSettings(), None], ids=["tiling_on", "tiling_off"])
def test_out_golden(model, io, tiles):
    out = run(model, io, tiles=tiles)
    assert out.shape == io["out"].shape
    assert relative_error(out, io["out"]) <= 1e-4


def test_batch_elements_are_independent(model, io):
    out = run(model, io)
    with torch.no_grad():
        one = model(io["latent"][1:], io["timestep"][1:], io["encoder_hidden_states"][1:],
                    io["pooled_projections"][1:], io["lr_latent"][1:])
    assert (out[1:] - one).abs().max().item() <= 1e-5


def test_non_square_true_grid_extension(model, io):
    """8×12 tokens: upstream asserts; our conv runs on the true grid (single pass, the latent fits in a tile)."""
    args = (io["ns_latent"], io["timestep"][:1], io["encoder_hidden_states"][:1], io["pooled_projections"][:1],
            io["ns_lr_latent"])
    with torch.no_grad():
        out = model(*args)
        assert torch.equal(out, model(*args, tiles=None))
    assert relative_error(out, io["ns_out_truegrid_EXTENSION"]) <= 1e-4


# ---------------------------------------------------------------------------------------------
#                                    The released weights' quirks
# ---------------------------------------------------------------------------------------------

def test_to_k_control_has_no_effect(model, io, state_dict, config_json):
    def perturb(sd):
        g = torch.Generator().manual_seed(1)
        for k in sd:
            if ".to_k_control." in k:
                sd[k] += 0.5 * torch.randn(sd[k].shape, generator=g)
    assert torch.equal(run(variant(state_dict, config_json, perturb), io), run(model, io))


def test_dead_tensors_have_no_effect(model, io, state_dict, config_json):
    dead = dead_tensor_names(model.config)
    assert len(dead) == len(set(dead)) == 2 * 10
    assert all(k in state_dict for k in dead)

    def perturb(sd):
        g = torch.Generator().manual_seed(2)
        for k in dead:
            sd[k] += 0.5 * torch.randn(sd[k].shape, generator=g)
    assert torch.equal(run(variant(state_dict, config_json, perturb), io), run(model, io))

    def drop(sd):                                                   # absent is fine too: they are never read
        for k in dead:
            del sd[k]
    assert torch.equal(run(variant(state_dict, config_json, drop), io), run(model, io))


def _zero(part):
    def edit(sd):
        for k in sd:
            if part in k:
                sd[k].zero_()
    return edit


@pytest.mark.parametrize("edit,overrides,reference", [
    (_zero(".to_q_control."), {}, "zero every to_q_control"),
    (_zero(".to_v_control."), {}, "zero every to_v_control"),
    (_zero(".ff.control_conv."), {}, "zero every ff.control_conv"),
    (_zero(".attn2.to_out.0."), {}, "zero attn2.to_out.0 (dual attention off)"),
    (lambda sd: None, {"factor": 1.0}, "cross-stream conv factor 1.0 instead of 1.2"),
], ids=["q_control", "v_control", "control_conv", "attn2_out", "factor_1.0"])
def test_control_paths_matter_as_in_the_reference(model, io, state_dict, config_json, config, edit, overrides,
                                                  reference):
    """Each change moves `out` by what the reference code measured (to 1e-3 of it): the paths are live and wired
    as upstream wires them."""
    expected = config["sensitivity_max_abs_change_of_out"][reference]
    change = (run(variant(state_dict, config_json, edit, **overrides), io) - run(model, io)).abs().max().item()
    assert change == pytest.approx(expected, rel=1e-3)


def test_released_mixed_dtypes_load_as_one(io, state_dict, config_json):
    """The release stores the base in F16 and the control tensors in F32: loaded in the base's dtype, as the
    reference's fp16 autocast computes."""
    sd = {k: (v if "control" in k else v.half()) for k, v in state_dict.items()}
    model, _ = load_dit4sr(sd, config_json)
    assert {p.dtype for p in model.state_dict().values()} == {torch.float16}
    model32, _ = load_dit4sr(sd, config_json, dtype=torch.float32)
    assert relative_error(run(model32.eval(), io), io["out"]) < 2e-2   # F16 weights, float32 compute


# ---------------------------------------------------------------------------------------------
#                                              Tiling
# ---------------------------------------------------------------------------------------------

def test_tile_layout_follows_the_reference():
    assert grid_starts(64, 64, 24) == [0]
    assert grid_starts(100, 64, 24) == [0, 36]                      # last tile aligned to the border
    assert grid_starts(128, 64, 24) == [0, 40, 64]
    assert grid_starts(144, 64, 24) == [0, 40, 80]
    assert tile_layout(64, 64, TileSettings()) is None              # h·w ≤ 64²: a single pass
    assert tile_layout(48, 80, TileSettings()) is None              # fits, non-square: one true-grid pass
    layout = tile_layout(48, 80, TileSettings(square_only=True))
    assert layout.tile == 48 and layout.boxes == ((0, 0), (0, 24), (0, 32))
    layout = tile_layout(96, 200, TileSettings())
    assert layout.tile == 64 and layout.count == 2 * 5
    # x outer, y inner (the reference's order)
    assert [b for b in layout.boxes[:3]] == [(0, 0), (32, 0), (0, 40)]
    # a strip narrower than the overlap: the reference loops forever, we clamp the overlap to half the tile
    layout = tile_layout(16, 300, TileSettings())
    assert layout.tile == 16 and [b[1] for b in layout.boxes][:3] == [0, 8, 16]


def test_gaussian_weights_are_the_reference_formula():
    t = 10
    w = gaussian_weights(t)
    for y in range(t):
        for x in range(t):
            gy = math.exp(-(y - t / 2) ** 2 / (t * t) / 0.02) / math.sqrt(2 * math.pi * 0.01)
            gx = math.exp(-(x - (t - 1) / 2) ** 2 / (t * t) / 0.02) / math.sqrt(2 * math.pi * 0.01)
            assert w[y, x] == pytest.approx(gy * gx, rel=1e-12)


def _smooth_inputs(h, w, batch=2, seed=3):
    """Sums of a few low-frequency waves per channel: smooth at the tile scale."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")

    def field():
        scale = torch.tensor([1.0, 0.3, 0.3, 6.3])[:, None, None, None, None]
        a, fy, fx, ph = torch.rand(4, batch, 16, 1, 1, generator=g) * scale
        return a * torch.sin(fy * yy + fx * xx + ph)
    return field(), field()


def test_fitting_latent_bit_identical_with_tiling_on_and_off(model, io):
    x, lr = _smooth_inputs(16, 16)
    args = (io["timestep"], io["encoder_hidden_states"], io["pooled_projections"])
    with torch.no_grad():
        off = model(x, *args, lr, tiles=None)
        for tiles in (TileSettings(), TileSettings(tile=16, overlap=6)):
            assert torch.equal(model(x, args[0], args[1], args[2], lr, tiles=tiles), off)


@pytest.mark.parametrize("budget", [None, 1], ids=["all_tiles_in_one_call", "one_tile_per_call"])
def test_two_by_two_tiles_equal_a_hand_written_blend(model, io, budget):
    h = w = 26                                                      # tile 16, overlap 6: tiles at 0 and 10
    tiles = TileSettings(tile=16, overlap=6, memory_budget=budget)
    assert tile_layout(h, w, tiles).count == 4
    x, lr = _smooth_inputs(h, w)
    t, ctx, pooled = io["timestep"], io["encoder_hidden_states"], io["pooled_projections"]
    with torch.no_grad():
        ours = model(x, t, ctx, pooled, lr, tiles=tiles)
        num = torch.zeros_like(x, dtype=torch.float64)
        den = torch.zeros(h, w, dtype=torch.float64)
        for y0 in (0, 10):
            for x0 in (0, 10):
                pred = model.forward_single(x[..., y0:y0 + 16, x0:x0 + 16], t, ctx, pooled,
                                            lr[..., y0:y0 + 16, x0:x0 + 16])
                for yy in range(16):
                    for xx in range(16):
                        wgt = (math.exp(-(yy - 8) ** 2 / 256 / 0.02) * math.exp(-(xx - 7.5) ** 2 / 256 / 0.02)
                               / (2 * math.pi * 0.01))
                        num[..., y0 + yy, x0 + xx] += wgt * pred[..., yy, xx].double()
                        den[y0 + yy, x0 + xx] += wgt
    reference = (num / den).float()
    assert (ours - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_no_seam_step_on_a_smooth_input():
    """A tile-dependent prediction (each tile adds its own offset, as a model seeing other context would) on a
    smooth input, with the real settings (tile 64, overlap 24): no step where a tile begins or ends (its weight
    there is e^-12.5 of its peak), and the change from one tile to the next is spread over several pixels
    mid-overlap, never the hard cut's jump.

    The reference's variance 0.01 makes that cross-fade a logistic of slope Δ/σ² ≈ 40/41 per latent pixel
    (σ = 6.4 px, tile centres 40 apart): about 4 latent px (32 image px) from 12 % to 88 %, not the whole overlap."""
    h, w = 64, 104                                                  # two tiles along x: at 0 and 40
    tiles = TileSettings()
    x, lr = _smooth_inputs(h, w, batch=1)
    x = x.double() + 0.02 * torch.arange(w, dtype=torch.float64)    # a gentle ramp: the tiles' means differ
    boxes = tile_layout(h, w, tiles).boxes
    assert boxes == ((0, 0), (0, 40))

    def tile_dependent(xt, lt, k):
        out = []
        for j in range(k):                                          # offset = 3 × the tile's own mean
            out.append(xt[j:j + 1] + 3.0 * xt[j:j + 1].mean())
        return torch.cat(out)

    blended = (run_tiled(tile_dependent, x, lr.double(), tiles) - x)[0, 0]
    low, high = sorted([3.0 * x[..., :, 0:64].mean().item(), 3.0 * x[..., :, 40:104].mean().item()])
    jump = high - low
    assert jump > 1.0
    steps = (blended[:, 1:] - blended[:, :-1]).abs().amax(dim=0)    # step between column i and i + 1
    assert steps[39].item() < 1e-4 * jump                           # where the second tile begins
    assert steps[63].item() < 1e-4 * jump                           # where the first tile ends
    assert steps.max().item() < 0.3 * jump                          # a hard cut would step by the whole jump
    assert (blended[:, :36] - blended[:, :1]).abs().max().item() < 1e-4 * jump   # one tile alone: its offset


def test_float64_run_is_exact(golden, io):
    """In float64 our kernel lands where the reference itself does (~6e-8, the float32 storage of the golden):
    the port has no approximation of its own."""
    model, _ = load_dit4sr_file(str(golden / "transformer"), dtype=torch.float64)
    d = {k: v.double() for k, v in io.items()}
    with torch.no_grad():
        out = model(d["latent"], d["timestep"], d["encoder_hidden_states"], d["pooled_projections"], d["lr_latent"])
    assert (out - d["out"]).abs().max().item() <= 2e-7


def test_tiles_are_batched_to_the_memory_budget():
    x = torch.randn(2, 16, 40, 40)
    calls = []

    def spy(xt, lt, k):
        calls.append((k, xt.shape[0]))
        return xt * 2
    tiles = TileSettings(tile=16, overlap=6, memory_budget=2500)
    out = run_tiled(spy, x, x, tiles, bytes_per_tile=1000)          # 2 tiles per call
    n = tile_layout(40, 40, tiles).count
    assert n == 16 and calls == [(2, 4)] * 8
    assert torch.allclose(out, 2 * x, atol=1e-6)                    # weights normalised: a constant map stays one
    calls.clear()
    run_tiled(spy, x, x, TileSettings(tile=16, overlap=6, memory_budget=10), bytes_per_tile=1000)
    assert calls == [(1, 2)] * 16                                   # never less than one tile


def test_model_estimates_its_tile_memory(model):
    """The estimate the batching reads grows with the tile and the dtype's width."""
    small = model.activation_bytes(16, 9, torch.float32)
    assert small > 0 and model.activation_bytes(32, 9, torch.float32) > 4 * small
    assert model.activation_bytes(16, 9, torch.float16) * 2 == small


def test_layers_come_from_the_operations_namespace(golden):
    """Every weighted layer is built from `operations` (how ComfyUI's casting / offloading ops get in)."""
    import torch.nn as nn

    class Ops:
        class Linear(nn.Linear):
            pass

        class Conv2d(nn.Conv2d):
            pass

    model, _ = load_dit4sr_file(str(golden / "transformer"), operations=Ops)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(isinstance(m, (Ops.Linear, Ops.Conv2d)) for m in layers)


# ---------------------------------------------------------------------------------------------
#          Loader words: an unusable config.json, missing tensors named before config.json
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [
    ("{'num_layers': 4}", "is not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
    ("", "is empty"),
    ("  \n", "is empty"),
    ("[4, 2]", "holds a list ('[4, 2]'), not an object"),
    ('"SD3Transformer2DModel"', "holds a string"),
    ("12", "holds a number"),
])
def test_unusable_config_json_is_named_with_what_was_expected(tmp_path, text, needle):
    from dit_control.kernels.checkpoint_io import CheckpointError
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        read_json_beside(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    message = str(e.value)
    assert str(tmp_path / "config.json") in message and needle in message, message
    assert "expected the JSON object that describes the weights" in message
    assert read_json_beside(str(tmp_path / "elsewhere" / "w.safetensors")) is None       # no file: no config


@pytest.mark.parametrize("keep", ["first_half", "every_other"])
def test_missing_tensors_are_named_before_config_json_is_compared(state_dict, config_json, keep):
    """A file that lost half its tensors: the strict check names them missing (against the model config.json
    declares). Before, the shapes read as a smaller model and config.json was blamed for 'not describing' it;
    losing a required SD3 key made it 'not a DiT4SR transformer'."""
    from dit_control.kernels.checkpoint_io import CheckpointError
    from dit_control.kernels.dit4sr.checkpoint import prepare_dit4sr
    names = sorted(state_dict)
    kept = names[:len(names) // 2] if keep == "first_half" else names[::2]
    with pytest.raises(CheckpointError) as e:
        prepare_dit4sr({k: state_dict[k] for k in kept}, config_json)
    message = str(e.value)
    assert "as its config.json declares it" in message and "the weights do not match the expected layout" in message
    assert "missing: " in message and "does not describe them" not in message, message
    assert "expected a DiT4SR transformer" not in message
    lost = sorted(set(names) - set(kept) - set(dead_tensor_names(load_dit4sr(state_dict, config_json)[1])))
    assert all(k in message for k in lost[:20])


def test_complete_weights_with_a_wrong_config_json_still_blame_config_json(state_dict, config_json):
    """A complete file under a config.json that declares another model: shapes differ (the last block is
    context_pre_only, dual blocks have a wider AdaLN), so config.json is named, as before."""
    from dit_control.kernels.checkpoint_io import CheckpointError
    from dit_control.kernels.dit4sr.checkpoint import prepare_dit4sr
    for key, value, line in (("num_layers", 6, "num_layers: config.json says 6, the weights have 4"),
                             ("num_attention_heads", 8, "num_attention_heads: config.json says 8, the weights have 4"),
                             ("dual_attention_layers", [0, 1, 2], "dual_attention_layers: config.json says [0, 1, 2]")):
        with pytest.raises(CheckpointError) as e:
            prepare_dit4sr(dict(state_dict), {**config_json, key: value})
        assert "does not describe them" in str(e.value) and line in str(e.value), str(e.value)
        assert "missing" not in str(e.value)


# ---------------------------------------------------------------------------------------------
#                         Bounded end to end: tile overlap, LR encode, sizes
# ---------------------------------------------------------------------------------------------

def test_overlap_over_half_the_tile_is_reported_as_used():
    from dit_control.kernels.dit4sr.tiling import tile_and_overlap
    assert tile_and_overlap(8, 8, TileSettings(tile=8, overlap=24)) is None          # one pass: nothing clamped
    assert tile_and_overlap(8, 10, TileSettings(tile=8, overlap=24)) == (8, 4)
    assert tile_and_overlap(100, 100, TileSettings(tile=64, overlap=24)) == (64, 24)
    assert tile_and_overlap(300, 20, TileSettings(tile=64, overlap=24)) == (20, 10)   # a narrow latent


def test_lr_encode_is_exact_when_one_tile_fits_and_blends_tiles_otherwise():
    from dit_control.kernels.dit4sr.tiled_encode import encode_spans, encode_tile_side, tiled_encode

    def encode(pixels):                      # a local "VAE": 8×8 mean per latent pixel, [B, H, W, C] -> [B, C, h, w]
        return torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)

    calls = []
    small = torch.rand(1, 512, 512, 3)
    assert torch.equal(tiled_encode(small, encode, 512, on_tile=lambda d, t: calls.append((d, t))), encode(small))
    assert calls == [(0, 1), (1, 1)]
    big = torch.rand(2, 1000, 776, 3)
    calls.clear()
    out = tiled_encode(big, encode, 256, on_tile=lambda d, t: calls.append((d, t)))
    rows, cols = encode_spans(1000, 776, 256)
    assert calls[0] == (0, len(rows) * len(cols)) and calls[-1] == (len(rows) * len(cols),) * 2 and len(rows) > 1
    assert (out - encode(big)).abs().max() < 1e-6           # a local encoder: the ramps blend to the same latent
    # tiles from the budget and the VAE's own estimate: core's 1767 × 4 bytes per px in 2 GiB -> 512 px tiles
    assert encode_tile_side(1767 * 4, 2048 << 20, floor_px=512) == 512
    assert encode_tile_side(1767 * 4, 8192 << 20, floor_px=512) == 1088
    assert encode_tile_side(1767 * 4, 1, floor_px=128) == 128                          # never under the floor
    rows, cols = encode_spans(2000, 2000, 512)
    assert len(rows) * len(cols) == 25 and all(length <= 64 for _, length in rows)     # the 500 px ×4 case


@pytest.mark.parametrize("size,upscale,min_short_side,needles", [
    ((4000, 4000), 4, 512, ("16000×16000 px result", "over this node's limit of 16.8 MP (4096×4096 px)",
                            "upscale ×1 (4000×4000 px)", "at most about 1024×1024 px at ×4")),
    ((2000, 2000), 4, 512, ("8000×8000 px result", "64.0 MP", "upscale ×2 (4000×4000 px)")),
    ((1, 512), 4, 512, ("1×512 px, a strip (512:1)", "512×262144 px", "32×512 px")),
    ((512, 1), 1, 64, ("512×1 px, a strip (512:1)", "32768×64 px", "512×32 px")),
    ((100, 50), 1, 4096, ("first enlarged to 8192×4096 px by min_short_side 4096", "a lower min_short_side")),
])
def test_sizes_beyond_the_bounded_are_refused_with_what_to_do(size, upscale, min_short_side, needles):
    from dit_control.kernels.dit4sr.sizes import SizeLimitError, check_output_size
    with pytest.raises(SizeLimitError) as e:
        check_output_size(*size, upscale, min_short_side)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_sizes_within_the_limit_pass_with_the_reference_output_size():
    from dit_control.kernels.dit4sr.sizes import check_output_size
    assert check_output_size(500, 500, 4, 512) == (2000, 2000)
    assert check_output_size(1024, 1024, 4, 512) == (4096, 4096)                       # the limit itself
    assert check_output_size(2048, 128, 4, 512) == (8192, 512)                         # 16:1 is still a picture
    assert check_output_size(96, 128, 4, 512) == (512, 680)


def test_bf16_maths_stay_close(golden, io):
    """The DiT4SR Loader's compute_dtype bf16: weights and activations in bf16 run the whole kernel (LR stream and
    tiling included) within 2 % of fp32 (measured: 0.84 % relative L2 against the golden output)."""
    model, _ = load_dit4sr_file(str(golden / "transformer"), dtype=torch.bfloat16)
    d = {k: (v.to(torch.bfloat16) if k != "timestep" else v) for k, v in io.items()}
    with torch.no_grad():
        out = model(d["latent"], d["timestep"], d["encoder_hidden_states"], d["pooled_projections"], d["lr_latent"])
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - io["out"]).norm() / io["out"].norm()).item()
    assert 0 < rel <= 0.02, rel
