"""diffusers parity: the same weights in diffusers' PixArtTransformer2DModel give the same output
(diffusers is a test dependency only)."""
import pytest
import torch

from dit_control.kernels.pixart.checkpoint import load_pixart, original_to_diffusers
from dit_control.kernels.pixart.model import PixArtConfig
from dit_control.tests.generators.make_checkpoints import random_pixart_state_dict

diffusers = pytest.importorskip("diffusers", reason="diffusers is installed by .ci/setup (test dependency)")


def diffusers_model(cfg: PixArtConfig, sd_diffusers: dict):
    from diffusers import PixArtTransformer2DModel
    model = PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, num_layers=cfg.depth, norm_type="ada_norm_single",
        cross_attention_dim=cfg.hidden_size, caption_channels=cfg.caption_channels, sample_size=cfg.sample_size,
        patch_size=cfg.patch_size, use_additional_conditions=cfg.micro_condition,
        interpolation_scale=cfg.pe_interpolation, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6)
    model.load_state_dict(sd_diffusers, strict=True)
    return model.eval()


CASES = {
    # non-square 1024-MS-style latent, padded captions of different lengths
    "ms_nonsquare_padded": dict(cfg=dict(sample_size=32, pe_interpolation=0.5, micro_condition=True),
                                latent=(2, 4, 24, 40), valid=(11, 4)),
    "ms_square_full_caption": dict(cfg=dict(sample_size=32, pe_interpolation=2.0, micro_condition=True),
                                   latent=(1, 4, 32, 32), valid=(16,)),
    "non_ms_512_style": dict(cfg=dict(sample_size=16, pe_interpolation=1.0, micro_condition=False),
                             latent=(2, 4, 16, 16), valid=(16, 7)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_output_as_diffusers(case):
    spec = CASES[case]
    cfg = PixArtConfig(hidden_size=96, depth=3, num_heads=4, caption_channels=48, model_max_length=16,
                       null_caption=False, **spec["cfg"])
    sd = random_pixart_state_dict(cfg, seed=7)
    ours = load_pixart(dict(sd), num_heads=cfg.num_heads, sample_size=cfg.sample_size,
                       pe_interpolation=cfg.pe_interpolation).eval()
    theirs = diffusers_model(cfg, original_to_diffusers(dict(sd)))

    gen = torch.Generator().manual_seed(3)
    b, c, h, w = spec["latent"]
    x = torch.randn(b, c, h, w, generator=gen)
    t = torch.tensor([999.0, 259.0][:b])
    y = torch.randn(b, 16, cfg.caption_channels, generator=gen)
    mask = torch.zeros(b, 16, dtype=torch.long)
    for i, n in enumerate(spec["valid"]):
        mask[i, :n] = 1
    hw = torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1)
    ar = torch.tensor([[h / w]]).repeat(b, 1)
    with torch.no_grad():
        out = ours(x, t, y, mask, img_hw=hw, aspect_ratio=ar)
        ref = theirs(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                     added_cond_kwargs={"resolution": hw, "aspect_ratio": ar}, return_dict=False)[0]
    assert out.shape == ref.shape == (b, 8, h, w)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-4, err
