"""Golden parity of the ControlAR kernel (specs/controlar.md, specs/golden.md, golden/controlar): a tiny T2I
LlamaGen GPT with a DINOv2 control encoder and a tiny VQ-16, loaded strictly through our loaders from the files
in the released naming.

- every float output within 1e-4 · max |golden|: the 14-px resizes, adapter tokens (nearest and bicubic paths),
  adapter MLP, condition tokens, prefill and teacher-forced decode logits (cond and uncond halves, through the
  static KV cache), CFG logits, VQ quant and both images;
- the token sequences EXACTLY: greedy, sampled (seed 1234) and filtered (T 0.8, top-k 32, top-p 0.9, seed 4321),
  from a generator of our own (no global RNG), which draws exactly one multinomial per token; every pick is also
  redrawn from logits moved 10x as far as different CPUs' kernels move them, so the exact ids hold on any CPU;
- the caption rule (left padding, zeroed pads), the RoPE table's zero prefix rows and sequence-position indexing
  (the MR models' wrap on the 48-wide grid), the callback API.
"""

import pytest
import torch

from dit_control.kernels.controlar.checkpoint import load_gpt_file, load_vq_file
from dit_control.kernels.controlar.dinov2 import resize_mode, to_patch14
from dit_control.kernels.controlar.gpt import rope_table_2d
from dit_control.kernels.controlar.sampling import SamplingSettings, combine_cfg, filter_logits, generate, sample_token
from dit_control.kernels.controlar.text import left_pad
from dit_control.tests.kernels.golden_data import golden_fixtures, relative_error

TOL = 1e-4
# The token ids are compared exactly with the reference's (computed on another machine), so each pick must not sit
# on a near-tie that CPU-dependent rounding could tip. Our CFG logits (max |logit| 14-17) move by at most 1.4e-5
# between kernel sets (measured: this AVX-512/AMX machine vs ATEN_CPU_CAPABILITY=avx2 or default,
# ONEDNN_MAX_CPU_ISA=AVX2 or SSE41, MKL_ENABLE_INSTRUCTIONS=AVX2, all three at once, 1 or 2 threads); every pick
# must survive 10x that (a move of ±slack narrows a gap by 2·slack). Closest decisions measured (runner-up gap in
# logit units): greedy 4.5e-4 (token 7; flips from slack 3e-4), sampled 0.08, filtered 0.008.
CPU_LOGIT_SPREAD = 1.4e-5
PICK_SLACK = 10 * CPU_LOGIT_SPREAD


one_thread, golden, io, config = golden_fixtures("controlar")


@pytest.fixture(scope="module")
def gpt(golden, config):
    # heads are not in the weights: the tiny model is outside the known tables, so they are given
    model, cfg = load_gpt_file(str(golden / "weights.safetensors"), n_head=config["gpt"]["n_head"],
                               adapter_heads=config["dinov2_config"]["num_attention_heads"])
    return model, cfg


@pytest.fixture(scope="module")
def vq(golden):
    return load_vq_file(str(golden / "vq.safetensors"))


@pytest.fixture(scope="module")
def control(gpt, io):
    model, _ = gpt
    with torch.no_grad():
        features = model.adapter_features(io["control_image"], resize_mode("canny"))
        return features, model.control_tokens(features)


def settings(config, key, sample=True):
    s = {**config["sampling"], **config.get(key, {})}
    return SamplingSettings(cfg_scale=config["sampling"]["cfg_scale"], cfg_interval=config["sampling"]["cfg_interval"],
                            temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], sample=sample,
                            control_strength=config["sampling"]["control_strength"]), s["seed"]


def test_config_from_weights(gpt, vq, config):
    _, cfg = gpt
    g, d = config["gpt"], config["gpt_derived"]
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.vocab_size) == (g["dim"], g["n_layer"], g["n_head"], g["vocab_size"])
    assert (cfg.ffn_hidden, cfg.cls_token_num, cfg.caption_dim, cfg.block_size) == \
        (d["ffn_hidden"], g["cls_token_num"], g["caption_dim"], g["block_size"])
    assert cfg.injection_layers == tuple(d["control_injection_layers"]) and cfg.grid == d["grid"]
    c, dc = cfg.control, config["dinov2_config"]
    assert (c.hidden_size, c.num_layers, c.num_heads, c.patch_size, c.kind) == \
        (dc["hidden_size"], dc["num_hidden_layers"], dc["num_attention_heads"], dc["patch_size"], "dinov2")
    _, vcfg = vq
    v = config["vq"]
    assert (vcfg.codebook_size, vcfg.codebook_embed_dim, vcfg.ch, vcfg.ch_mult, vcfg.z_channels) == \
        (v["codebook_size"], v["codebook_embed_dim"], v["ch"], tuple(v["ch_mult"]), v["z_channels"])


def test_caption_left_padding(io):
    emb, mask = left_pad(io["caption_emb_raw"], io["caption_mask_raw"])
    assert torch.equal(mask, io["emb_mask"])
    assert torch.equal(emb, io["caption_emb"])          # a row move and a multiply by 0/1: exact


def test_control_resize(io):
    assert torch.equal(to_patch14(io["control_image"], "nearest"), io["control_resized"])
    assert relative_error(to_patch14(io["control_image"], "bicubic"), io["control_resized_bicubic"]) <= TOL
    assert resize_mode("canny") == resize_mode("seg") == "nearest"
    assert resize_mode("hed") == resize_mode("depth") == resize_mode("lineart") == "bicubic"


def test_adapter_and_condition_tokens(gpt, io, control):
    model, _ = gpt
    features, tokens = control
    with torch.no_grad():
        assert relative_error(model.adapter(io["control_image"], "nearest"), io["adapter_tokens"]) <= TOL
        assert relative_error(model.adapter(io["control_image"], "bicubic"), io["adapter_tokens_bicubic"]) <= TOL
        # zero features (the CFG uncond half) give exactly zero control: bias-free MLPs
        assert torch.count_nonzero(model.control_tokens(torch.zeros_like(features))) == 0
    assert relative_error(features, io["adapter_mlp_out"]) <= TOL
    assert relative_error(tokens, io["condition_tokens"]) <= TOL


def teacher_forced(model, io, tokens, strength, teacher=None):
    """The reference's CFG batch [cond; uncond] through prefill + 15 one-token decodes of `teacher` (default the
    golden's teacher_tokens): the calls generate() makes when it draws those tokens."""
    teacher = io["teacher_tokens"] if teacher is None else teacher
    cap, mask = io["caption_emb"], io["emb_mask"]
    with torch.no_grad():
        prefix = torch.cat([model.embed_prefix(cap), model.embed_prefix(model.cls_embedding.uncond_embedding[None])])
        ctl = torch.cat([tokens, torch.zeros_like(tokens)], dim=1)
        cache = model.new_cache(2, 16, torch.cat([mask, mask]))
        assert cache.length == 24                       # round_up(T + N, 8)
        pre = model.prefill(prefix, cache, ctl, strength)
        dec = [model.decode(teacher[:, j:j + 1].repeat(2, 1), 8 + j, cache, ctl, strength) for j in range(15)]
    return pre, torch.cat(dec, dim=1)


def test_prefill_decode_and_cfg_logits(gpt, io, control, config):
    model, _ = gpt
    pre, dec = teacher_forced(model, io, control[1], config["sampling"]["control_strength"])
    assert relative_error(pre[:1], io["prefill_logits_cond"]) <= TOL
    assert relative_error(pre[1:], io["prefill_logits_uncond"]) <= TOL
    assert relative_error(dec[:1], io["decode_logits_cond"]) <= TOL
    assert relative_error(dec[1:], io["decode_logits_uncond"]) <= TOL
    cfg_logits = torch.cat([combine_cfg(pre[:, -1:], 4.0), combine_cfg(dec, 4.0)], dim=1)
    assert relative_error(cfg_logits, io["cfg_logits"]) <= TOL


@pytest.mark.parametrize("name,key,sample", [("greedy_tokens", "sampling", False),
                                             ("sampled_tokens", "sampling", True),
                                             ("sampled_tokens_filtered", "sampling_filtered", True)])
def test_tokens_exact(gpt, io, control, config, name, key, sample):
    model, _ = gpt
    s, seed = settings(config, key, sample)
    generator = torch.Generator().manual_seed(seed)
    before = torch.get_rng_state()
    seen = []
    tokens = generate(model, model.embed_prefix(io["caption_emb"]), 16, s, generator, io["emb_mask"], control[1],
                      callback=lambda j, n, so_far: seen.append((j, n, so_far.clone())))
    assert torch.equal(tokens, io[name])
    assert torch.equal(torch.get_rng_state(), before)   # the global RNG is never touched
    # exactly one multinomial draw per token on a [1, vocab] float32 tensor (greedy: none)
    probe = torch.Generator().manual_seed(seed)
    for _ in range(16 if sample else 0):
        torch.multinomial(torch.full((1, 256), 1 / 256), 1, generator=probe)
    assert torch.equal(generator.get_state(), probe.get_state())
    assert [(j, n) for j, n, _ in seen] == [(j, 16) for j in range(16)]
    assert all(torch.equal(t, tokens[:, :j + 1]) for j, _, t in seen)
    assert_picks_survive(model, io, control[1], s, seed, io[name])


def assert_picks_survive(model, io, control_tokens, s, seed, tokens, slack=PICK_SLACK):
    """Teacher-force `tokens` and redraw each one from its CFG logits moved by ±slack, with the generator state of
    its draw, in the directions that threaten it most: the pick down and every other logit up (a near-tie in the
    argmax or the multinomial race; the pick falling out of top-k / top-p), then the kept set (after top-k /
    top-p) down and the rest up (a token entering it). The pick must stay."""
    pre, dec = teacher_forced(model, io, control_tokens, s.control_strength, teacher=tokens)
    raw = torch.cat([pre[:, -1:], dec], dim=1)                          # [2, 16, V]: what generate() picks from
    generator = torch.Generator().manual_seed(seed)
    for j in range(tokens.shape[1]):
        cfg_on = j == 0 or not (s.cfg_interval > -1 and (j - 1) > s.cfg_interval)
        logits = combine_cfg(raw[:, j], s.cfg_scale) if cfg_on else raw[:1, j]
        state = generator.get_state()
        pick = sample_token(logits, s, generator)
        assert int(pick) == int(tokens[0, j]), j                         # teacher forcing redraws the sequence
        kept = torch.isfinite(filter_logits(logits / max(s.temperature, 1e-5), s.top_k, s.top_p))
        moves = [torch.full_like(logits, slack).scatter(1, pick, -slack)]
        if not bool(kept.all()):
            moves.append(torch.where(kept, -slack, slack))
        for move in moves:
            again = torch.Generator()
            again.set_state(state)
            assert int(sample_token(logits + move, s, again)) == int(pick), \
                f"token {j} flips under a {slack:g} logit change: a near-tie, its exact id depends on the CPU"


def test_control_strength_zero_is_no_control(gpt, io, control):
    model, _ = gpt
    s = SamplingSettings(cfg_scale=4.0, top_k=0, sample=False, control_strength=0.0)
    prefix = model.embed_prefix(io["caption_emb"])
    # the same computation: strength 0 adds control × 0, exact zeros, to the same hidden states
    assert torch.equal(generate(model, prefix, 16, s, None, io["emb_mask"], control[1]),
                       generate(model, prefix, 16, s, None, io["emb_mask"], None))


def test_cfg_interval_drops_guidance_after_the_interval(gpt, io, control):
    """cfg_interval 2: decode steps i > 2 (tokens 4…) use the cond logits only, the prefill always guides."""
    model, _ = gpt
    prefix = model.embed_prefix(io["caption_emb"])
    pre, dec = teacher_forced(model, io, control[1], 1.0)
    guided = generate(model, prefix, 16, SamplingSettings(cfg_scale=4.0, cfg_interval=2, top_k=0, sample=False),
                      None, io["emb_mask"], control[1])
    full = generate(model, prefix, 16, SamplingSettings(cfg_scale=4.0, top_k=0, sample=False), None,
                    io["emb_mask"], control[1])
    assert torch.equal(guided[:, :4], full[:, :4])     # the same calls until the interval ends
    assert not torch.equal(guided, full)                # with these weights guidance changes later tokens


def test_rope_zero_prefix_and_sequence_indexing():
    t, hd = 8, 32
    table = rope_table_2d(4, hd, t)
    assert table.shape == (8 + 16, hd // 2, 2) and table.dtype == torch.float32
    assert torch.count_nonzero(table[:t]) == 0          # zeros, not identity: prefix q and k vanish
    f = 10000.0 ** (-4 * torch.arange(hd // 4).float() / hd)
    for i in range(16):
        angles = torch.cat([(i // 4) * f, (i % 4) * f])  # row angles first, then column angles
        assert torch.allclose(table[t + i, :, 0], torch.cos(angles)) and torch.allclose(table[t + i, :, 1],
                                                                                        torch.sin(angles))
    # an MR model (48-wide grid) on a 32-wide image: token 40 sits at cell (0, 40), not at (1, 8)
    mr = rope_table_2d(48, 64, 120)
    f = 10000.0 ** (-4 * torch.arange(16).float() / 64)
    assert torch.allclose(mr[120 + 40, :, 0], torch.cos(torch.cat([0 * f, 40 * f])))


def test_vq_decode(vq, io, gpt, control, config):
    model, _ = vq
    with torch.no_grad():
        assert relative_error(model.quantize.codebook_entry(io["vq_tokens"], 4, 4), io["vq_quant"]) <= TOL
        assert relative_error(model.decode_code(io["vq_tokens"], 4, 4), io["vq_image"]) <= TOL
        # end to end: our own sampled tokens through the decoder
        gpt_model, _ = gpt
        s, seed = settings(config, "sampling")
        tokens = generate(gpt_model, gpt_model.embed_prefix(io["caption_emb"]), 16, s,
                          torch.Generator().manual_seed(seed), io["emb_mask"], control[1])
        assert relative_error(model.decode_code(tokens, 4, 4), io["sampled_image"]) <= TOL


class Interrupted(Exception):
    pass


def test_callback_can_interrupt(gpt, io, control):
    model, _ = gpt
    seen = []

    def stop_after_five(j, n, tokens):
        seen.append(j)
        if j == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        generate(model, model.embed_prefix(io["caption_emb"]), 16, SamplingSettings(top_k=0), torch.Generator(),
                 io["emb_mask"], control[1], callback=stop_after_five)
    assert seen == [0, 1, 2, 3, 4]


def test_c2i_controlar_runs_end_to_end():
    """The C2I layout (no published weights, no golden): a tiny GPT + ViT adapter runs prefill, decode and CFG
    with the null class; shapes and determinism only."""
    from dit_control.kernels.controlar.dinov2 import Dinov2Config
    from dit_control.kernels.controlar.gpt import GPT, GPTConfig
    vit = Dinov2Config(hidden_size=32, num_layers=1, num_heads=2, mlp_hidden=64, patch_size=16, num_positions=17,
                       kind="vit", layer_norm_eps=1e-12)
    cfg = GPTConfig(dim=48, n_layer=3, n_head=2, ffn_hidden=128, vocab_size=64, model_type="c2i", cls_token_num=1,
                    num_classes=10, block_size=16, control=vit, condition_norm=True)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    image = torch.rand(1, 3, 48, 32) * 2 - 1                          # 3×2 tokens: the ViT table is resized
    with torch.no_grad():
        ctl = model.control_tokens(model.adapter_features(image))
    assert ctl.shape == (3, 1, 6, 48)
    prefix = model.embed_prefix(torch.tensor([3]))
    s = SamplingSettings(cfg_scale=2.0, top_k=8)
    a = generate(model, prefix, 6, s, torch.Generator().manual_seed(7), control=ctl)
    b = generate(model, prefix, 6, s, torch.Generator().manual_seed(7), control=ctl)
    assert a.shape == (1, 6) and torch.equal(a, b) and int(a.max()) < 64


def test_pipeline_text_to_image(gpt, vq, io, config):
    """The one-call API the nodes use: control image -> tokens -> image, same as the reference end to end."""
    from dit_control.kernels.controlar.pipeline import text_to_image, token_grid
    model, _ = gpt
    s, seed = settings(config, "sampling")
    tokens, image = text_to_image(model, vq[0], io["caption_emb"], io["emb_mask"], io["control_image"], "canny", s,
                                  torch.Generator().manual_seed(seed))
    assert torch.equal(tokens, io["sampled_tokens"])       # its picks survive PICK_SLACK: test_tokens_exact
    assert relative_error(image, io["sampled_image"]) <= TOL
    with pytest.raises(ValueError, match="multiple of 16"):
        token_grid(model.cfg, 64, 72)
    with pytest.raises(ValueError, match="token budget of 16 tokens"):
        token_grid(model.cfg, 64, 80)


def test_bf16_weights(golden, config, io):
    """bf16 storage and maths (what the sampler's default `--precision bf16` runs): logits within ~1.5%."""
    model, _ = load_gpt_file(str(golden / "weights.safetensors"), dtype=torch.bfloat16,
                             n_head=config["gpt"]["n_head"],
                             adapter_heads=config["dinov2_config"]["num_attention_heads"])
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        tokens = model.control_tokens(model.adapter_features(io["control_image"], "nearest"))
        pre, dec = teacher_forced(model, io, tokens, config["sampling"]["control_strength"])
    assert pre.dtype == torch.float32                   # logits are float32, as the reference's .float()
    cfg_logits = torch.cat([combine_cfg(pre[:, -1:], 4.0), combine_cfg(dec, 4.0)], dim=1)
    assert relative_error(cfg_logits, io["cfg_logits"]) <= 0.03



# max |bf16 − fp32| of the golden model's CFG logits (|logits| up to ~17), with headroom over the 0.23 measured
BF16_LOGIT_BOUND = 0.35


def test_bf16_compute_samples_the_fp32_tokens_where_the_logits_allow(gpt, golden, config, io, control):
    """compute_dtype bf16 (bf16 weights, maths and KV cache) is not exact, so its tokens are held to fp32's only
    where the logits decide them. Teacher-forced on the fp32 greedy tokens, bf16's CFG logits stay within
    BF16_LOGIT_BOUND of fp32's; a token is decided where fp32's runner-up trails by more than twice that
    position's bf16 error (no rounding can swap them). The free-running bf16 generation (its own KV cache and
    control tokens) picks fp32's exact tokens up to the first undecided position; beyond it the two may part,
    both valid samples."""
    model, _ = gpt
    bf16, _ = load_gpt_file(str(golden / "weights.safetensors"), dtype=torch.bfloat16, n_head=config["gpt"]["n_head"],
                            adapter_heads=config["dinov2_config"]["num_attention_heads"])
    assert bf16.dtype == torch.bfloat16
    s, _ = settings(config, "sampling", sample=False)
    strength = config["sampling"]["control_strength"]

    def greedy(m):
        with torch.no_grad():
            ctl = m.control_tokens(m.adapter_features(io["control_image"], resize_mode("canny")))
        return generate(m, m.embed_prefix(io["caption_emb"]), 16, s, None, io["emb_mask"], ctl), ctl

    ref, _ = greedy(model)
    got, bf16_control = greedy(bf16)
    pre32, dec32 = teacher_forced(model, io, control[1], strength, teacher=ref)
    pre16, dec16 = teacher_forced(bf16, io, bf16_control, strength, teacher=ref)
    cfg32 = combine_cfg(torch.cat([pre32[:, -1:], dec32], dim=1), s.cfg_scale)[0]        # [16, V]
    cfg16 = combine_cfg(torch.cat([pre16[:, -1:], dec16], dim=1), s.cfg_scale)[0]
    error = (cfg16 - cfg32).abs().amax(dim=-1)                                           # [16]
    assert error.max() <= BF16_LOGIT_BOUND
    top2 = cfg32.topk(2, dim=-1).values
    undecided = ((top2[:, 0] - top2[:, 1]) <= 2 * error).nonzero()
    decided = int(undecided[0]) if len(undecided) else 16
    assert decided >= 3                                  # the check covers several tokens, not none
    assert torch.equal(got[:, :decided], ref[:, :decided])


def test_decode_linear_orders_few_bf16_rows_as_weight_times_x():
    """gpt.linear: a bf16 CPU layer with a decode step's few rows is computed as W·xᵀ (the same products, another
    order: close, not equal); more rows, other dtypes and layers that cast or are patched run their own forward."""
    import torch.nn as nn

    from dit_control.kernels.controlar.gpt import FEW_ROWS, linear
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 48).to(torch.bfloat16)
    few = torch.randn(2, 1, 64, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        got, ref = linear(layer, few), layer(few)
        assert got.shape == ref.shape == (2, 1, 48) and got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
        many = torch.randn(FEW_ROWS + 1, 64, generator=g).to(torch.bfloat16)
        assert torch.equal(linear(layer, many), layer(many))
        layer.comfy_cast_weights = True                     # ComfyUI's casting layers keep their own forward
        assert torch.equal(linear(layer, few), layer(few))
