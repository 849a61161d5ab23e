"""Golden parity of the EasyControl kernel (specs/easycontrol.md, specs/golden.md, golden/easycontrol):

- our pure FLUX, loaded strictly from both file layouts, with our condition stream: the base velocity,
  the single forwards of the spatial / subject / multi cases, and the cached two-step Euler chains;
- the KV bank: cached == uncached, rebuilt on every change of what it depends on, dropped after a run,
  switched off on request;
- ComfyUI v0.33's own `comfy.ldm.flux.model.Flux` (no server) with OUR block functions applied to ITS
  block modules through core's block-replace hook — the duck-typed design the nodes use — loaded from
  the comfy-layout file and from the diffusers-layout file through core's own diffusers conversion.

Max error ≤ 1e-4 · max |golden| throughout (the default tolerance).
"""
import sys

import pytest
import torch

from dit_control.kernels.checkpoint_io import read_state_dict
from dit_control.kernels.flux_easycontrol import blocks, condition
from dit_control.kernels.flux_easycontrol.checkpoint import load_flux
from dit_control.kernels.flux_easycontrol.condition import (
    Condition,
    EasyControl,
    condition_attention_mask,
    spatial_ids,
    split_tall_latent,
    subject_ids,
)
from dit_control.kernels.flux_easycontrol.lora import load_lora
from dit_control.kernels.flux_easycontrol.model import grid_ids, pack_latents
from dit_control.tests.kernels.golden_data import golden_fixtures, relative_error

CASES = ("spatial", "subject", "multi")
LAYOUTS = {"comfy": "flux_tiny_comfy.safetensors", "diffusers": "flux_tiny_diffusers.safetensors"}
CHAIN = ("kv_v0", "kv_x1", "kv_v1", "kv_x2")


one_thread, golden, io, config = golden_fixtures("easycontrol")


@pytest.fixture(scope="module")
def loras(golden):
    return {kind: load_lora(read_state_dict(str(golden / f"lora_{kind}.safetensors")))
            for kind in ("spatial", "subject")}


@pytest.fixture(scope="module")
def models(golden):
    return {name: load_flux(read_state_dict(str(golden / file))).eval() for name, file in LAYOUTS.items()}


def make_conditions(case, io, config, loras):
    """The golden's cases. multi is given spatial-first on purpose: the kernel puts subjects first
    (slot 0 = subject ×0.8, slot 1 = spatial ×1.25, as the golden's set_multi_lora call)."""
    w = config["scalars"]["lora_weights"]
    spatial = lambda s: Condition(io["spatial_cond"], loras["spatial"], s, "spatial")     # noqa: E731
    subject = lambda s: Condition(io["subject_cond"], loras["subject"], s, "subject")     # noqa: E731
    if case == "spatial":
        return [spatial(w["spatial"][0])]
    if case == "subject":
        return [subject(w["subject"][0])]
    return [spatial(w["multi"][1][0]), subject(w["multi"][0][0])]


def ours(model, io, ec=None, x=None, sigma=None, pooled=None, guidance=None, key=None):
    with torch.no_grad():
        return model(io["noise"] if x is None else x, io["sigmas"][:1] if sigma is None else sigma, io["txt"],
                     io["pooled"] if pooled is None else pooled, io["guidance"] if guidance is None else guidance,
                     conditions=ec, condition_key=key)


def two_step_chain(forward, io):
    """forward(x, σ) -> v; the golden's Euler chain x1 = x0 + (σ1 − σ0)·v0, x2 = x1 + (σ2 − σ1)·v1."""
    s = io["sigmas"]
    v0 = forward(io["noise"], s[0:1])
    x1 = io["noise"] + (s[1] - s[0]) * v0
    v1 = forward(x1, s[1:2])
    return {"kv_v0": v0, "kv_x1": x1, "kv_v1": v1, "kv_x2": x1 + (s[2] - s[1]) * v1}


# ---------------------------------------------------------------------------------------------
#                             Config, packing, ids, mask
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_config_is_read_from_the_weights(models, config, layout):
    cfg, tiny = models[layout].config, config["model"]["tiny"]
    assert models[layout].flux_layout == {"comfy": "native", "diffusers": "diffusers"}[layout]
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.depth, cfg.depth_single_blocks) == \
        (tiny["hidden"], tiny["heads"], tiny["head_dim"], tiny["double_blocks"], tiny["single_blocks"])
    assert (cfg.context_in_dim, cfg.vec_in_dim, cfg.in_channels * 4, cfg.mlp_ratio) == \
        (tiny["context_in_dim"], tiny["vec_in_dim"], tiny["in_channels_packed"], tiny["mlp_ratio"])
    assert (list(cfg.axes_dim), cfg.theta, cfg.guidance_embed, cfg.qkv_bias) == \
        (tiny["axes_dim"], tiny["theta"], tiny["guidance_embed"], tiny["qkv_bias"])


def test_packing_and_position_ids(io, config):
    s = config["scalars"]
    noise_hw, cond_hw = tuple(io["noise"].shape[-2:]), tuple(io["spatial_cond"].shape[-2:])
    assert torch.equal(pack_latents(io["noise"]), io["noise_packed"])
    assert torch.equal(pack_latents(io["spatial_cond"]), io["spatial_cond_packed"])
    assert torch.equal(grid_ids(noise_hw[0] // 2, noise_hw[1] // 2), io["noise_img_ids"])
    # spatial ids are fractional, stretched onto the noise grid: (0, 1.5 i, 2 j) here
    assert torch.equal(spatial_ids(cond_hw, noise_hw), io["spatial_cond_ids"])
    assert torch.equal(subject_ids(cond_hw), io["subject_cond_ids"])
    assert io["subject_cond_ids"][:, 1].min() == s["subject_row_offset"]
    for case, order in (("spatial", ["spatial"]), ("subject", ["subject"]), ("multi", ["subject", "spatial"])):
        expected = torch.cat([io["noise_img_ids"]] + [io[f"{k}_cond_ids"] for k in order])
        assert torch.equal(expected, io[f"{case}_img_ids"]), case


def test_conditions_only_see_themselves(models, io, config, loras):
    """Independent of the golden: each slot's banked K/V in the multi case equal those of the slot alone
    (same strengths), and same-kind slots reuse identical ids."""
    model = models["comfy"]

    def bank(conds):
        ec = EasyControl(conds)
        ec.begin(model, io["pooled"], io["guidance"], (12, 16), 1, torch.float32)
        return ec.bank.entries[-1][1].kv

    spatial, subject = (make_conditions(case, io, config, loras)[0] for case in ("spatial", "subject"))
    alone = {"subject": bank([subject]), "spatial": bank([spatial])}
    both = bank([spatial, subject])                      # slot 0 = subject (rows 0:16), slot 1 = spatial
    # Not bit for bit: the pair runs its layers on 32 condition rows, a slot alone on 16, and BLAS picks kernels by
    # shape (measured 1.2e-6 with max |K, V| 5.8 under MKL_ENABLE_INSTRUCTIONS=AVX2, an AMD CPU's MKL path; 0 on
    # AVX-512); 1e-5 of the magnitude is 50x that, and a slot that saw the other one would move by O(1).
    tol = 1e-5 * max(t.abs().max().item() for kv in both.values() for t in kv)
    for where, (k, v) in both.items():
        for kind, rows in (("subject", slice(0, 16)), ("spatial", slice(16, 32))):
            assert torch.allclose(k[:, :, rows], alone[kind][where][0], atol=tol, rtol=0), (where, kind)
            assert torch.allclose(v[:, :, rows], alone[kind][where][1], atol=tol, rtol=0), (where, kind)
    a, b = io["spatial_cond"], io["spatial_cond"].flip(-1)
    assert all(torch.equal(x, y) for x, y in zip(split_tall_latent(torch.cat([a, b], dim=-2), 2), (a, b)))
    two = [Condition(x, loras["spatial"]) for x in (a, b)]
    assert torch.equal(two[0].position_ids((12, 16)), two[1].position_ids((12, 16)))


def test_attention_mask():
    """Text and noise rows see everything; condition i sees only itself."""
    mask = condition_attention_mask(3, [(0, 2), (2, 5)])
    assert mask.shape == (8, 8)
    assert mask[:3].all()
    assert mask[3:5, 3:5].all() and not mask[3:5, :3].any() and not mask[3:5, 5:].any()
    assert mask[5:, 5:].all() and not mask[5:, :5].any()


# ---------------------------------------------------------------------------------------------
#                                 Our kernel against the golden
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_base_velocity(models, io, layout):
    v = ours(models[layout], io)
    assert v.shape == io["base_v"].shape
    assert relative_error(v, io["base_v"]) <= 1e-4


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_single_forward(models, io, config, loras, layout, case, cache):
    ec = EasyControl(make_conditions(case, io, config, loras), cache=cache)
    with ec.sampling_run():
        v = ours(models[layout], io, ec)
    assert relative_error(v, io[f"{case}_v_single"]) <= 1e-4
    # the conditions matter far beyond the tolerance (golden: 0.17 without any)
    assert relative_error(v, io["base_v"]) > 1e-2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cached_two_step_chain(models, io, config, loras, layout, case):
    """The golden's cached chain. The bank is filled by running the condition stream on its own (no
    warm-up call on 32 noise tokens is needed: the condition rows never see the noise) and is reused by
    step 2; the uncached path gives the same numbers to float32 rounding."""
    model = models[layout]
    ec = EasyControl(make_conditions(case, io, config, loras))
    with ec.sampling_run():
        cached = two_step_chain(lambda x, s: ours(model, io, ec, x=x, sigma=s), io)
        assert (ec.bank.builds, ec.bank.hits, len(ec.bank)) == (1, 1, 1)
    assert len(ec.bank) == 0, "the bank outlived its sampling run"
    plain = EasyControl(make_conditions(case, io, config, loras), cache=False)
    uncached = two_step_chain(lambda x, s: ours(model, io, plain, x=x, sigma=s), io)
    for name in CHAIN:
        assert relative_error(cached[name], io[f"{case}_{name}"]) <= 1e-4, name
        assert relative_error(cached[name], uncached[name]) <= 1e-6, name


# ---------------------------------------------------------------------------------------------
#                         The bank: rebuilt on every change, never stale
# ---------------------------------------------------------------------------------------------

CHANGES = ("pooled", "guidance", "condition", "strength")


def _change(what, io, ec):
    """Apply one change; -> forward kwargs for the changed call."""
    if what == "pooled":
        return {"pooled": io["pooled"].flip(-1)}
    if what == "guidance":
        return {"guidance": io["guidance"] - 1.5}
    if what == "condition":
        ec.conditions[0].latent = io["spatial_cond"].flip(-1)
    if what == "strength":
        ec.conditions[0].strength = 0.6
    return {}


@pytest.mark.parametrize("what", CHANGES)
def test_bank_is_rebuilt_when_an_input_changes(models, io, config, loras, what):
    model = models["comfy"]
    ec = EasyControl(make_conditions("spatial", io, config, loras))
    with ec.sampling_run():
        first = ours(model, io, ec)
        old_entry = ec.bank.entries[-1][1]
        kwargs = _change(what, io, ec)
        changed = ours(model, io, ec, **kwargs)
        assert ec.bank.builds == 2, f"a changed {what} did not rebuild the bank"
        # what a stale bank would have given: a wrong velocity, far beyond the tolerance
        ec.bank.lookup = lambda key: old_entry
        stale = ours(model, io, ec, **kwargs)
    fresh = ours(model, io, EasyControl(ec.conditions, cache=False), **kwargs)
    assert relative_error(changed, fresh) <= 1e-6
    assert relative_error(stale, fresh) > 1e-3
    if what != "guidance":      # guidance also changes the noise tokens' own vec
        assert relative_error(first, fresh) > 1e-3


def test_batch_elements_and_cfg_branches(models, io, config, loras):
    """A CFG-style batch [cond, uncond] (different pooled vectors) gets each element's own condition
    stream; separate calls per branch keep one bank entry each (and a key of their own)."""
    model = models["comfy"]
    uncond_pooled = torch.zeros_like(io["pooled"])
    alone = {name: ours(model, io, EasyControl(make_conditions("spatial", io, config, loras), cache=False),
                        pooled=p) for name, p in (("cond", io["pooled"]), ("uncond", uncond_pooled))}
    ec = EasyControl(make_conditions("spatial", io, config, loras))
    with ec.sampling_run():
        both = ours(model, io, ec, x=io["noise"].repeat(2, 1, 1, 1), pooled=torch.cat([io["pooled"], uncond_pooled]),
                    guidance=io["guidance"].repeat(2))
        assert relative_error(both[:1], alone["cond"]) <= 1e-6
        assert relative_error(both[1:], alone["uncond"]) <= 1e-6
    builds, hits = ec.bank.builds, ec.bank.hits
    with ec.sampling_run():
        for _ in range(2):
            for branch, p in (("cond", io["pooled"]), ("uncond", uncond_pooled)):
                v = ours(model, io, ec, pooled=p, key=branch)
                assert relative_error(v, alone[branch]) <= 1e-6
        assert (ec.bank.builds - builds, ec.bank.hits - hits, len(ec.bank)) == (2, 2, 2)
        # same inputs under another key (another CFG branch) never share an entry
        ours(model, io, ec, key="other branch")
        assert ec.bank.builds - builds == 3


def test_cache_switch_off_runs_the_uncached_path(models, io, config, loras, monkeypatch):
    def no_bank(*a, **k):
        raise AssertionError("the bank was filled with the cache switched off")

    monkeypatch.setattr(condition, "fill_bank", no_bank)
    ec = EasyControl(make_conditions("multi", io, config, loras), cache=False)
    run = ec.begin(models["comfy"], io["pooled"], io["guidance"], (12, 16), 1, torch.float32)
    assert run.mode == "joint" and run.entry is None
    with ec.sampling_run():
        for _ in range(2):
            v = ours(models["comfy"], io, ec)
    assert relative_error(v, io["multi_v_single"]) <= 1e-4
    assert ec.bank.builds == 0 and len(ec.bank) == 0


# ---------------------------------------------------------------------------------------------
#             ComfyUI v0.33's own Flux, with our block functions on its block modules
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def core_flux(request, golden, config):
    """comfy.ldm.flux.model.Flux built from the golden's parameters and loaded strictly, in this process
    (no server), from either golden file. The diffusers-layout file goes through the conversion core's
    UNETLoader applies to a diffusers FLUX transformer (`load_diffusion_model_state_dict` →
    `model_detection.convert_diffusers_mmdit`, `flux_to_diffusers`: fused qkv, swapped norm_out halves).
    ComfyUI goes at the END of sys.path so that it cannot shadow this repo's packages."""
    from dit_control.tests.comfy_host import comfy_dir
    root = str(comfy_dir("0.33"))
    sys.path.append(root)
    from comfy.cli_args import args
    args.cpu = True            # before model_management is imported: no CUDA probing
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops
    import comfy.supported_models
    sd = read_state_dict(str(golden / LAYOUTS[request.param]))
    if request.param == "diffusers":
        assert comfy.model_detection.model_config_from_unet(sd, "") is None     # not native: converted
        sd = comfy.model_detection.convert_diffusers_mmdit(sd, "")
        assert sd is not None, "core does not recognise the diffusers FLUX layout"
    # core's own load rule: the file's `*_norm.scale` are its RMSNorms' `.weight`
    sd = comfy.supported_models.Flux.process_unet_state_dict(None, sd)
    flux = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **config["comfy_flux_params"])
    flux.load_state_dict(sd, strict=True)
    yield flux.eval()
    sys.path.remove(root)


def block_replace_patches(flux, run):
    """transformer_options for core's Flux: every block replaced by our function on core's block module
    (the hook the nodes will register: patches_replace['dit'][('double_block' | 'single_block', i)])."""
    replace = {}
    for i, block in enumerate(flux.double_blocks):
        def double(args, extra, block=block, i=i):
            img, txt = blocks.double_block(block, args["img"], args["txt"], args["vec"], args["pe"], run=run,
                                           index=i, attn_mask=args.get("attn_mask"))
            return {"img": img, "txt": txt}
        replace[("double_block", i)] = double
    for i, block in enumerate(flux.single_blocks):
        def single(args, extra, block=block, i=i):
            return {"img": blocks.single_block(block, args["img"], args["vec"], args["pe"], run=run, index=i,
                                               attn_mask=args.get("attn_mask"))}
        replace[("single_block", i)] = single
    return {"patches_replace": {"dit": replace}}


def core(flux, io, ec=None, x=None, sigma=None):
    """One call of core's Flux.forward; the condition state is begun per call, as a model wrapper would."""
    x = io["noise"] if x is None else x
    sigma = io["sigmas"][:1] if sigma is None else sigma
    options = {}
    if ec is not None:
        run = ec.begin(flux, io["pooled"], io["guidance"], tuple(x.shape[-2:]), x.shape[0], torch.float32)
        options = block_replace_patches(flux, run)
    with torch.no_grad():
        return flux(x, sigma, io["txt"], io["pooled"], io["guidance"], transformer_options=options)


def test_core_flux_base_velocity(core_flux, io):
    plain = core(core_flux, io)
    assert relative_error(plain, io["base_v"]) <= 1e-4
    # our block functions on core's blocks, with no condition: core's own numbers
    with torch.no_grad():
        through_ours = core_flux(io["noise"], io["sigmas"][:1], io["txt"], io["pooled"], io["guidance"],
                                 transformer_options=block_replace_patches(core_flux, None))
    assert relative_error(through_ours, plain) <= 1e-6


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("case", CASES)
def test_core_flux_single_forward(core_flux, io, config, loras, case, cache):
    ec = EasyControl(make_conditions(case, io, config, loras), cache=cache)
    with ec.sampling_run():
        v = core(core_flux, io, ec)
    assert relative_error(v, io[f"{case}_v_single"]) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_core_flux_cached_two_step_chain(core_flux, models, io, config, loras, case):
    ec = EasyControl(make_conditions(case, io, config, loras))
    with ec.sampling_run():
        chain = two_step_chain(lambda x, s: core(core_flux, io, ec, x=x, sigma=s), io)
        assert (ec.bank.builds, ec.bank.hits) == (1, 1)
    for name in CHAIN:
        assert relative_error(chain[name], io[f"{case}_{name}"]) <= 1e-4, name


@pytest.mark.parametrize("case", ["spatial", "multi"])
def test_core_flux_attn1_patch_route(core_flux, io, config, loras, case):
    """The lighter hook v0.33 also offers (not 0.3.75): core's blocks run unchanged and an attn1_patch only
    appends the banked condition K/V (core's RoPE trims `pe` to the shorter queries)."""
    ec = EasyControl(make_conditions(case, io, config, loras))
    run = ec.begin(core_flux, io["pooled"], io["guidance"], (12, 16), 1, torch.float32)

    def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        kind, i = extra_options["block_type"], extra_options["block_index"]
        norm = core_flux.double_blocks[i].img_attn.norm if kind == "double" else core_flux.single_blocks[i].norm
        k_c, v_c, pe_k = blocks.condition_keys(run, kind, i, norm.key_norm, pe)
        return {"k": torch.cat([k, k_c], 2), "v": torch.cat([v, v_c], 2), "pe": pe_k}

    with torch.no_grad():
        v = core_flux(io["noise"], io["sigmas"][:1], io["txt"], io["pooled"], io["guidance"],
                      transformer_options={"patches": {"attn1_patch": [attn1_patch]}})
    assert relative_error(v, io[f"{case}_v_single"]) <= 1e-4


# ---------------------------------------------------------------------------------------------
#        Quantized FLUX (ComfyUI-GGUF, fp8-scaled): weights dequantised inside each layer's call
# ---------------------------------------------------------------------------------------------

class DequantisedPerCall(torch.nn.Module):
    """A linear layer as ComfyUI-GGUF's (and core's fp8-scaled ops) hold one: `.weight` is the stored
    low-precision tensor with the layer's shape, and only the layer's own call turns it into the float
    weight. Code that reads `.weight` and multiplies with it itself gets int8 and fails (F.linear refuses
    a float input against an int8 weight); code that calls the layer gets the dequantised product."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.weight = torch.nn.Parameter(torch.round(w / scale[:, None]).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def dequantised(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantised().to(x.dtype),
                                          None if self.bias is None else self.bias.to(x.dtype))


def quantised_copy(flux):
    """(a copy of core's Flux with every block linear dequantised per call, the same Flux in float holding
    exactly the dequantised weights): the pair differs only in where the weight becomes a float."""
    import copy
    quant, plain = copy.deepcopy(flux), copy.deepcopy(flux)
    for blocks_q, blocks_p in ((quant.double_blocks, plain.double_blocks), (quant.single_blocks, plain.single_blocks)):
        for block_q, block_p in zip(blocks_q, blocks_p):
            for name, layer in list(block_q.named_modules()):
                if isinstance(layer, torch.nn.Linear):
                    parent, _, leaf = name.rpartition(".")
                    q = DequantisedPerCall(layer)
                    setattr(block_q.get_submodule(parent) if parent else block_q, leaf, q)
                    block_p.get_submodule(name).weight.data.copy_(q.dequantised())
    return quant, plain


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_easycontrol_on_a_flux_whose_layers_dequantise_per_call(core_flux, io, config, loras, cache):
    """EasyControl on a GGUF / fp8-scaled FLUX: every EasyControl path (condition bank, LoRA'd projections,
    joint attention) reaches block weights only through the layers' own calls, so it composes with any
    quantisation that dequantises inside the layer — and equals the float model holding the same weights."""
    quant, plain = quantised_copy(core_flux)
    layer = quant.double_blocks[0].img_attn.qkv
    with pytest.raises(RuntimeError):          # the stand-in catches a direct read of the stored weight
        torch.nn.functional.linear(io["noise"].new_zeros(1, layer.weight.shape[1]), layer.weight)
    results = []
    for flux in (quant, plain):
        ec = EasyControl(make_conditions("multi", io, config, loras), cache=cache)
        with ec.sampling_run():
            results.append(core(flux, io, ec))
    assert torch.isfinite(results[0]).all()
    assert relative_error(results[0], results[1]) <= 1e-5
    # and the quantised model still follows the golden closely (int8 per-row weights)
    assert relative_error(results[0], io["multi_v_single"]) <= 5e-2
