"""tests/training/train_dit4sr.py: the hand-set micro DiT4SR computes what its construction says. A linear restorer
fitted on pairs made by a known filter is that filter; set into the released architecture (`restorer_init`), the
model's 20-step Euler sample is the restorer's plain-torch estimate x̂ = W·N(L) + b (the x_t it starts from and the
text it is given change nothing), on the shipped schedule and on others."""
import torch

from dit_control.tests.training import train_dit4sr as T


def random_restorer(gen: torch.Generator) -> torch.Tensor:
    """A W with a sharpening centre tap and small random neighbours, as the fitted ones look."""
    w = T.identity_restorer() * 1.3
    w[:-1] += 0.05 * torch.randn(w.shape[0] - 1, w.shape[1], generator=gen, dtype=torch.float64)
    w[-1] = 0.02
    return w


def test_the_fit_recovers_a_known_linear_filter():
    gen = torch.Generator().manual_seed(0)
    w = random_restorer(gen)
    lr = torch.rand(40, 3, 16, 16, generator=gen) * 2 - 1
    data = {"lr": lr.half(), "hr": T.apply_restorer(w, lr.half().float())}
    fitted = T.fit_linear_restorer(data, ridge=1e-9)
    assert (fitted - w).abs().max() < 1e-3


def test_the_set_model_samples_the_restorers_estimate():
    gen = torch.Generator().manual_seed(1)
    w = random_restorer(gen)
    model = T.new_model(0)
    T.restorer_init(model, w, torch.Generator().manual_seed(0))
    model.eval()
    lr = T.full16(torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1)          # a non-square latent
    expected = T.apply_restorer(w, lr[:, :3])
    ctx, pooled = T.no_text(1)
    for steps, seed in ((20, 0), (8, 1)):
        x = T.upscale(model, lr, steps, seed)                                   # Euler from noise, as the graph
        err = (x[:, :3] - expected).abs()
        assert err.max() < 1e-2 and err.mean() < 1e-3, (steps, float(err.max()), float(err.mean()))
    # text changes nothing: its projections are zero
    s = torch.full((1,), 500.0)
    with torch.no_grad():
        a = model.forward_single(x, s, ctx, pooled, lr)
        other_ctx, other_pooled = torch.randn(ctx.shape, generator=gen), torch.randn(pooled.shape, generator=gen)
        b = model.forward_single(x, s, other_ctx, other_pooled, lr)
    assert torch.equal(a, b)


def test_the_non_linear_blocks_add_their_features_estimate():
    """Blocks 1-2 set by nonlinear_init: the sample is x̂ = W_lin·N(L) + b1 + W_nl·φ(L), φ the LR tokens' GELU
    features computed in plain torch (lr_features), with the noise half's own features cancelled in pairs."""
    gen = torch.Generator().manual_seed(2)
    model = T.new_model(0)
    lin = random_restorer(gen)
    T.restorer_init(model, lin, torch.Generator().manual_seed(0))
    a, c = T.random_features(model, torch.Generator().manual_seed(1))
    T.features_init(model, a, c)
    w_nl = 0.02 * torch.randn(a.shape[0], lin.shape[1], generator=gen, dtype=torch.float64)
    bias = lin[-1] + 0.01
    T.nonlinear_init(model, torch.cat([torch.cat([lin[:-1], bias[None]]), w_nl]), lin[-1], a, c, 0)
    model.eval()
    lr = T.full16(torch.rand(1, 3, 32, 48, generator=gen))                       # a non-square latent
    with_bias = torch.cat([lin[:-1], bias[None]])
    phi = T.lr_features(model, lr).double()
    expected = T.apply_restorer(with_bias, lr[:, :3]) + T.untokens(torch.einsum("bfhw,fo->bohw", phi, w_nl).float())
    linear_only = T.apply_restorer(with_bias, lr[:, :3])
    x = T.upscale(model, lr, 20, 0)
    err = (x[:, :3] - expected).abs()
    assert err.max() < 1e-2 and err.mean() < 1e-3, (float(err.max()), float(err.mean()))
    assert (expected - linear_only).abs().mean() > 20 * err.mean()                # the features do change it
