"""kernels/pixart/lcm.py against specs/lcm.md and against diffusers' LCMScheduler (0.42.1, a test dependency)."""


import math

import pytest
import torch

from dit_control.kernels.pixart.lcm import (
    ddpm_alphas_cumprod,
    lcm_boundary_scalings,
    lcm_sample,
    lcm_sample_kdiffusion,
    lcm_schedule,
    lcm_sigmas,
    lcm_step,
    lcm_timesteps,
    sigma_to_timestep,
)

# specs/lcm.md, "Timestep rules".
EVEN = {1: [999], 2: [999, 499], 3: [999, 679, 339], 4: [999, 759, 499, 259],
        5: [999, 799, 599, 399, 199], 6: [999, 839, 679, 499, 339, 179],
        8: [999, 879, 759, 639, 499, 379, 259, 139]}
STRIDE = {1: [999], 2: [999, 499], 3: [999, 679, 359], 4: [999, 759, 519, 279],
          5: [999, 799, 599, 399, 199], 6: [999, 839, 679, 519, 359, 199],
          8: [999, 879, 759, 639, 519, 399, 279, 159]}

# specs/lcm.md, "Reference values": t -> (ᾱ_t, c_skip, c_out).
REFERENCE = {999: (4.0358e-5, 2.505e-9, 0.9999999987), 759: (2.8768e-3, 4.340e-9, 0.9999999978),
             499: (7.8587e-2, 1.004e-8, 0.9999999950), 259: (0.497614, 3.727e-8, 0.9999999814),
             139: (0.812190, 1.294e-7, 0.9999999353)}

STEPS = [1, 2, 4, 8]
DTYPES = [torch.float32, torch.float64]


def eps_linear(x, t):
    """The fake ε-model of lcm.md."""
    return 0.1 * x + 0.01 * t / 1000


def eps_tanh(x, t):
    """A nonlinear fake ε-model that also depends on t."""
    return torch.tanh(0.8 * x + 0.2 * math.sin(t / 100.0))


MODELS = [eps_linear, eps_tanh]


def latent(dtype, seed=0):
    """A seeded [1,4,8,8] initial latent, identical bits for every consumer."""
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def noise_stream(seed=1):
    """A noise_fn drawing exactly what diffusers' step draws: torch.randn(shape, generator, dtype) per step."""
    gen = torch.Generator().manual_seed(seed)
    return lambda i, like: torch.randn(like.shape, generator=gen, dtype=like.dtype)


@pytest.fixture(scope="module")
def LCMScheduler():
    return pytest.importorskip("diffusers").LCMScheduler


def pixart_lcm_scheduler(cls, float64_table=True):
    """diffusers' LCMScheduler configured as scripts/inference_lcm.py does for PixArt-LCM."""
    sched = cls(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
                set_alpha_to_one=True, clip_sample=False, timestep_scaling=10.0, original_inference_steps=50)
    if float64_table:
        # diffusers builds ᾱ by a float32 cumprod (~1.5e-7 relative off at t=999, see
        # test_alphas_match_diffusers); swap in the float64 table so both sides use the same constants.
        sched.alphas_cumprod = ddpm_alphas_cumprod()
    return sched


def diffusers_sample(sched, eps_fn, x_T, steps, seed=1, int_timesteps=True, callback=None):
    """The PixArt-LCM pipeline's loop around scheduler.step; returns the last `denoised`."""
    sched.set_timesteps(steps, original_inference_steps=50)
    gen = torch.Generator().manual_seed(seed)
    x = x_T.clone()
    for i, t in enumerate(sched.timesteps):
        # The pipeline passes a LongTensor t; then `t * timestep_scaling` is a float32 tensor and c_skip/c_out
        # are rounded to float32 even for float64 latents. A Python int keeps them in double precision.
        t_arg = int(t) if int_timesteps else t
        x_in = x
        x, denoised = sched.step(eps_fn(x, int(t)), t_arg, x, generator=gen, return_dict=False)
        if callback is not None:
            callback(i, x_in, denoised)
    return denoised


# ------------------------------------------------------------------------------------------- timesteps

@pytest.mark.parametrize("n", sorted(EVEN))
def test_timesteps_match_spec_tables(n):
    assert lcm_timesteps(n) == EVEN[n]
    assert lcm_timesteps(n, rule="diffusers") == EVEN[n]
    assert lcm_timesteps(n, rule="pixart_repo") == STRIDE[n]


def test_diffusers_rule_matches_diffusers_set_timesteps(LCMScheduler):
    sched = pixart_lcm_scheduler(LCMScheduler)
    for n in range(1, 51):
        sched.set_timesteps(n, original_inference_steps=50)
        assert lcm_timesteps(n) == sched.timesteps.tolist(), n


def test_diffusers_rule_matches_comfy_simple_scheduler_indices():
    # ComfyUI's `simple` scheduler over the 50 distilled sigmas picks sigmas[-(1 + int(i * 50 / n))].
    grid_desc = [20 * i - 1 for i in range(50, 0, -1)]
    for n in range(1, 51):
        assert lcm_timesteps(n) == [grid_desc[int(i * (50 / n))] for i in range(n)], n


def test_full_grid_and_app_range():
    grid = [20 * i - 1 for i in range(50, 0, -1)]
    assert lcm_timesteps(50) == grid and lcm_timesteps(50, rule="pixart_repo") == grid
    for rule in ("diffusers", "pixart_repo"):
        for n in range(1, 31):                      # the PixArt app's slider range
            ts = lcm_timesteps(n, rule=rule)
            assert len(ts) == n and ts[0] == 999 and ts == sorted(set(ts), reverse=True)
            assert set(ts) <= set(grid)


@pytest.mark.parametrize("bad", [0, -1, 51, 100, 2.5, True])
def test_bad_steps_raise(bad):
    with pytest.raises(ValueError, match="1..50"):
        lcm_timesteps(bad)
    with pytest.raises(ValueError, match="1..50"):
        lcm_sigmas(bad)


def test_bad_rule_raises():
    with pytest.raises(ValueError, match="pixart_repo"):
        lcm_timesteps(4, rule="ddim")


# -------------------------------------------------------------------------------------------- constants

@pytest.mark.parametrize("t", sorted(REFERENCE))
def test_reference_alphas_and_scalings(t):
    alpha, c_skip, c_out = REFERENCE[t]
    ac = ddpm_alphas_cumprod()
    assert ac.dtype == torch.float64
    assert float(ac[t]) == pytest.approx(alpha, rel=1e-4)
    got_skip, got_out = lcm_boundary_scalings(t)
    assert got_skip == pytest.approx(c_skip, rel=1e-4)
    assert got_out == pytest.approx(c_out, rel=1e-4)
    # c_out is 1 to 7 digits; check its distance from 1 too (the table gives c_out to 1e-10).
    assert 1.0 - got_out == pytest.approx(1.0 - c_out, abs=5e-11)


def test_alphas_match_diffusers(LCMScheduler):
    ours = ddpm_alphas_cumprod()
    theirs = pixart_lcm_scheduler(LCMScheduler, float64_table=False).alphas_cumprod
    assert theirs.dtype == torch.float32
    assert float(ours[999]) == pytest.approx(4.036e-5, rel=1e-3)
    assert torch.allclose(ours, theirs.double(), rtol=1e-6, atol=0)
    assert ddpm_alphas_cumprod(dtype=torch.float32).dtype == torch.float32


def test_scalings_match_diffusers(LCMScheduler):
    sched = pixart_lcm_scheduler(LCMScheduler)
    for t in range(19, 1000, 20):
        assert lcm_boundary_scalings(t) == pytest.approx(sched.get_scalings_for_boundary_condition_discrete(t),
                                                         rel=1e-15)
    c_skip, c_out = lcm_boundary_scalings(torch.tensor([999, 139]))   # tensors work too (batched σ)
    assert c_skip.shape == (2,) and c_out.dtype == torch.float64
    assert float(c_out[1]) == pytest.approx(REFERENCE[139][2], abs=5e-11)


def test_schedule_dataclass():
    s = lcm_schedule(4)
    assert s.steps == 4 and s.timesteps == (999, 759, 499, 259)
    assert s.alphas_prev == s.alphas[1:] + (1.0,)       # set_alpha_to_one after the last step
    assert s.alphas[0] == pytest.approx(REFERENCE[999][0], rel=1e-4)
    assert s.c_skip[3] == pytest.approx(REFERENCE[259][1], rel=1e-4)
    assert torch.equal(s.sigmas, lcm_sigmas(4))


# ---------------------------------------------------------------------------------------- diffusers form

def test_single_step_matches_scheduler_step(LCMScheduler):
    sched = pixart_lcm_scheduler(LCMScheduler)
    sched.set_timesteps(4, original_inference_steps=50)
    x = latent(torch.float32)
    eps = eps_linear(x, 999)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    want_next, want_denoised = sched.step(eps, 999, x, generator=torch.Generator().manual_seed(7),
                                          return_dict=False)
    got_next, got_denoised = lcm_step(eps, x, 999, 759, ddpm_alphas_cumprod(), noise=z)
    assert torch.allclose(got_denoised, want_denoised, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got_next, want_next, rtol=1e-6, atol=1e-6)
    # A hand-written step from lcm.md, in float64.
    a, a_prev = float(ddpm_alphas_cumprod()[999]), float(ddpm_alphas_cumprod()[759])
    xd, ed, zd = x.double(), eps.double(), z.double()
    x0 = (xd - math.sqrt(1 - a) * ed) / math.sqrt(a)
    s = 10 * 999
    d = s / math.sqrt(s * s + 0.25) * x0 + 0.25 / (s * s + 0.25) * xd
    nxt, den = lcm_step(ed, xd, 999, 759, ddpm_alphas_cumprod(), noise=zd)
    assert torch.allclose(den, d, rtol=1e-12, atol=0)
    assert torch.allclose(nxt, math.sqrt(a_prev) * d + math.sqrt(1 - a_prev) * zd, rtol=1e-12, atol=1e-12)


def test_step_last_and_variance_channels():
    ac = ddpm_alphas_cumprod()
    x = latent(torch.float64)
    eps = eps_tanh(x, 259)
    nxt, den = lcm_step(eps, x, 259, None, ac)
    assert nxt is den
    nxt, den2 = lcm_step(eps, x, 259, 139, ac, noise=None)      # no noise: the last step
    assert torch.equal(nxt, den2) and torch.equal(den, den2)
    nxt, den3 = lcm_step(eps, x, 259, -1, ac, noise=torch.ones_like(x))  # ᾱ_prev = 1: nothing is added
    assert torch.equal(nxt, den3)
    # PixArt outputs 8 channels (ε and learned variance); only the first 4 enter the update.
    _, den8 = lcm_step(torch.cat([eps, torch.full_like(eps, 9.0)], dim=1), x, 259, None, ac)
    assert torch.equal(den8, den)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("eps_fn", MODELS, ids=["linear", "tanh"])
@pytest.mark.parametrize("steps", STEPS)
def test_sample_matches_diffusers(LCMScheduler, steps, eps_fn, dtype):
    x_T = latent(dtype)
    want = diffusers_sample(pixart_lcm_scheduler(LCMScheduler), eps_fn, x_T, steps)
    seen = []
    got = lcm_sample(eps_fn, x_T, lcm_timesteps(steps), ddpm_alphas_cumprod(), noise_stream(),
                     callback=lambda i, n, x, d: seen.append((i, n)))
    assert got.dtype == dtype and got.shape == x_T.shape
    assert seen == [(i, steps) for i in range(steps)]
    assert (got - want).abs().max().item() <= 1e-5      # in practice bit-identical: same operation order


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("steps", STEPS)
def test_sample_close_to_stock_diffusers(LCMScheduler, steps, dtype):
    # Untouched diffusers: float32 ᾱ table and LongTensor timesteps, as its pipeline runs. The fake models
    # give |x0| ≈ 400 (x0 = (x − sqrt(1−ᾱ)ε)/sqrt(ᾱ) with a poor ε), so compare relative to the magnitude.
    x_T = latent(dtype)
    want = diffusers_sample(pixart_lcm_scheduler(LCMScheduler, float64_table=False), eps_tanh, x_T, steps,
                            int_timesteps=False)
    got = lcm_sample(eps_tanh, x_T, lcm_timesteps(steps), ddpm_alphas_cumprod(), noise_stream())
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()


def test_sample_pixart_repo_rule_uses_its_timesteps():
    called = []
    lcm_sample(lambda x, t: called.append(t) or eps_linear(x, t), latent(torch.float64),
               lcm_timesteps(4, rule="pixart_repo"), ddpm_alphas_cumprod(), noise_stream())
    assert called == STRIDE[4]


# -------------------------------------------------------------------------------------- k-diffusion form

def test_lcm_sigmas_values_and_snapping():
    ac = ddpm_alphas_cumprod()
    for rule in ("diffusers", "pixart_repo"):
        sig = lcm_sigmas(8, rule=rule)
        ts = lcm_timesteps(8, rule=rule)
        assert sig.dtype == torch.float64 and sig.shape == (9,) and float(sig[-1]) == 0.0
        want = [math.sqrt((1 - float(ac[t])) / float(ac[t])) for t in ts]
        assert torch.allclose(sig[:-1], torch.tensor(want, dtype=torch.float64), rtol=1e-12)
        assert [sigma_to_timestep(float(s)) for s in sig[:-1]] == ts
        assert sigma_to_timestep(sig[:-1].float(), ac.float()).tolist() == ts   # float32 σ still snap
    assert float(lcm_sigmas(4)[1]) == pytest.approx(18.62, abs=5e-3)           # lcm.md: σ at t = 759
    # sgm_uniform's interpolated σ: the distilled grid snaps it back to 759 (ComfyUI), the full table to 754.
    assert sigma_to_timestep(17.92, original_steps=50) == 759
    assert sigma_to_timestep(17.92) == 754
    assert sigma_to_timestep(torch.tensor([17.92, 18.62]), original_steps=50).tolist() == [759, 759]


def comfy_denoise_fn(eps_fn, ac, skip_on_model_input):
    """A ComfyUI-style denoiser: c_in = 1/sqrt(σ²+1), snapped t, x0 = x − σ·ε, then the LCM boundary.

    ComfyUI's LCM.calculate_denoised applies c_skip to the k-diffusion x; diffusers applies it to
    x_t = x/sqrt(σ²+1). `skip_on_model_input=True` is the diffusers-exact variant.
    """
    def denoise(x, sigma):
        t = sigma_to_timestep(sigma, ac)
        x_in = x / math.sqrt(sigma * sigma + 1.0)
        x0 = x - sigma * eps_fn(x_in, t)
        c_skip, c_out = lcm_boundary_scalings(t)
        return c_out * x0 + c_skip * (x_in if skip_on_model_input else x)
    return denoise


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("eps_fn", MODELS, ids=["linear", "tanh"])
@pytest.mark.parametrize("steps", STEPS)
def test_kdiffusion_matches_diffusers_form(steps, eps_fn, dtype):
    # Exact relation, step by step, with the same z: x_kd,i = x_t,i / sqrt(ᾱ_{t_i}) = x_t,i·sqrt(1+σ_i²),
    # the denoised latents are equal, and so are the final outputs (both are the last denoised). Hence the
    # k-diffusion start is x_T·sqrt(1+σ_max²), which is ComfyUI's noise_scaling with max_denoise=True.
    ac = ddpm_alphas_cumprod()
    x_T = latent(dtype)
    ref_x, ref_d = [], []
    want = lcm_sample(eps_fn, x_T, lcm_timesteps(steps), ac, noise_stream(),
                      callback=lambda i, n, x, d: (ref_x.append(x), ref_d.append(d)))
    sigmas = lcm_sigmas(steps)
    x_start = x_T * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    kd_x, kd_d = [], []
    got = lcm_sample_kdiffusion(comfy_denoise_fn(eps_fn, ac, True), x_start, sigmas, noise_stream(),
                                callback=lambda i, n, x, d: (kd_x.append(x), kd_d.append(d)))
    got_comfy = lcm_sample_kdiffusion(comfy_denoise_fn(eps_fn, ac, False), x_start, sigmas, noise_stream())
    assert got.dtype == dtype and len(kd_x) == steps

    # Float32 ε-prediction at t = 999 cancels ~7 bits (x0 is x/sqrt(ᾱ) ≈ 157·x), and |x0| ≈ 400 here, where a
    # float32 ulp is 3e-5: two different operation orders can only agree to a few ulps of the magnitude.
    scale = want.abs().max().item()
    tol = 1e-9 if dtype == torch.float64 else max(1e-5, 2e-6 * scale)
    assert (got - want).abs().max().item() <= tol
    for i, s in enumerate(sigmas[:-1].tolist()):
        assert torch.allclose(kd_x[i] / math.sqrt(1.0 + s * s), ref_x[i], rtol=0, atol=tol)
        assert torch.allclose(kd_d[i], ref_d[i], rtol=0, atol=tol)

    # ComfyUI's own boundary (c_skip on the unscaled x) moves each denoised by c_skip·(1 − sqrt(ᾱ))·x, at
    # most c_skip·|x|; summed over the steps that bounds the drift (1.7e-5 at 8 steps for these |x| ≈ 300).
    drift = sum(lcm_boundary_scalings(t)[0] * kd_x[i].abs().max().item()
                for i, t in enumerate(lcm_timesteps(steps)))
    assert (got_comfy - want).abs().max().item() <= tol + drift


def test_kdiffusion_last_step_adds_no_noise():
    draws = []
    sig = lcm_sigmas(3)
    out = lcm_sample_kdiffusion(lambda x, s: x * 0.5, torch.ones(1, 4, 2, 2, dtype=torch.float64), sig,
                                lambda i, like: draws.append(i) or torch.zeros_like(like))
    assert draws == [0, 1] and torch.equal(out, torch.full((1, 4, 2, 2), 0.125, dtype=torch.float64))
