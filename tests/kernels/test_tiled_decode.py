"""kernels/tiled_decode.py: tile layout, exactness on a local decoder, closeness on the SD VAE decoder."""
import pytest
import torch
import torch.nn.functional as F

from dit_control.kernels.tiled_decode import edge_ramp, tile_spans, tiled_decode


@pytest.mark.parametrize("size, tile, overlap", [(128, 64, 16), (100, 64, 16), (64, 64, 16), (40, 64, 8),
                                                 (129, 32, 8), (96, 32, 0)])
def test_tiles_cover_the_latent_with_at_least_the_overlap(size, tile, overlap):
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == size
    assert len({n for _, n in spans}) == 1 and all(0 < n <= tile for _, n in spans)   # one length, <= tile
    assert all(a + n - b >= overlap for (a, n), (b, _) in zip(spans, spans[1:]))      # enough overlap
    # the fewest tiles: one fewer could not cover the size with that overlap
    k = len(spans) - 1
    assert k == 0 or k * tile - (k - 1) * overlap < size


def test_a_1024_image_in_512_tiles_decodes_about_1_3x_its_pixels():
    spans = tile_spans(128, 64, 8)
    assert [n for _, n in spans] == [48, 48, 48]
    assert (sum(n for _, n in spans) / 128) ** 2 < 1.3


def test_ramps_are_positive_and_cross_fade_to_one():
    w = edge_ramp(16, 4, 4)
    assert w.min() > 0 and w.max() == 1 and torch.equal(w, w.flip(0)) and torch.equal(w[4:12], torch.ones(8))
    # two neighbouring tiles' ramps across their overlap sum to one
    a, b = edge_ramp(8, 0, 4), edge_ramp(8, 4, 0)
    assert torch.allclose(a[4:] + b[:4], torch.ones(4))


def pointwise_decoder(z):
    """Local decoder: each output pixel depends on one latent pixel (tiling must be exact)."""
    return torch.tanh(F.interpolate(z[:, :3] * 0.7 + z[:, 3:4], scale_factor=8, mode="nearest"))


@pytest.mark.parametrize("shape", [(1, 4, 128, 128), (2, 4, 96, 160), (1, 4, 40, 72)])
def test_tiled_equals_untiled_for_a_local_decoder(shape):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    calls = []
    out = tiled_decode(z, pointwise_decoder, tile=32, overlap=8, on_tile=lambda d, t: calls.append((d, t)))
    assert out.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
    assert torch.allclose(out, pointwise_decoder(z), atol=1e-6)
    assert calls[-1][0] == calls[-1][1] == len(calls) > 1


def test_sd_vae_decoder_tiles_stay_close_to_the_untiled_decode():
    """A conv + GroupNorm + attention decoder is not tile-local; the blended result stays close."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    z = torch.randn(1, 4, 48, 80)
    def rel(overlap, tile=24):
        with torch.no_grad():
            tiled = tiled_decode(z, lambda t: vae.decode(t).sample, tile=tile, overlap=overlap, scale=2)
        assert tiled.shape == full.shape
        return ((tiled - full).norm() / full.norm()).item()

    with torch.no_grad():
        full = vae.decode(z).sample
    seams = rel(0)                       # hard seams: tiles side by side, no blending
    assert rel(8) < 0.5 * seams          # ramps across an overlap take out more than half of it
    assert rel(16, tile=40) < 0.25 * seams < rel(8)   # bigger tiles see more context: closer still
