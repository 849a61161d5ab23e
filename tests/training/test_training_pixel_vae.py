"""tests/training/pixel_vae.py: core's own SD VAE class (what VAELoader builds) loads the hand-set file, and
encode∘decode is the identity on 8×-constant images; our one-pass tiled decode gives the same picture."""
import sys

import pytest
import torch

from dit_control.kernels.tiled_decode import tiled_decode
from dit_control.tests.training.pixel_vae import SD15_SCALE, decode_model_latent, encode_model_latent, save_pixel_vae


@pytest.fixture(scope="module")
def core_vae(tmp_path_factory):
    """comfy.sd.VAE from the saved file, exactly as core's VAELoader does (load_torch_file -> VAE(sd=...)).
    ComfyUI goes at the END of sys.path so that it cannot shadow this repo's packages."""
    from dit_control.tests.comfy_host import comfy_dir
    root = str(comfy_dir("0.33"))
    sys.path.append(root)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.sd
    import comfy.utils
    path = save_pixel_vae(tmp_path_factory.mktemp("vae") / "pixel-vae.safetensors")
    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    yield vae
    sys.path.remove(root)


def blocky(b, h, w, seed):
    small = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(small, scale_factor=8, mode="nearest")


def test_core_reads_it_as_the_sd_vae(core_vae):
    assert type(core_vae.first_stage_model).__name__ == "AutoencoderKL"
    assert core_vae.latent_channels == 4 and core_vae.spacial_compression_decode() == 8


def test_encode_decode_is_the_identity_on_8x_constant_images(core_vae):
    img = blocky(1, 12, 16, seed=0)                                  # 96 x 128 px
    latent = core_vae.encode(img.movedim(1, -1))                      # IMAGE is BHWC
    assert latent.shape == (1, 4, 12, 16)
    # what the MODEL sees (latent · 0.18215): the 8× block means mapped to [-1, 1], channel 3 zero
    model_latent = latent * SD15_SCALE
    assert (model_latent - encode_model_latent(img)).abs().max() <= 1e-5
    assert model_latent[:, 3].abs().max() <= 1e-6
    out = core_vae.decode(latent).movedim(-1, 1)
    assert out.shape == img.shape
    assert (out - img).abs().max() <= 1e-3


def test_encode_is_the_average_pool_and_decode_the_nearest_upsample(core_vae):
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))   # not blocky
    latent = core_vae.encode(img.movedim(1, -1)) * SD15_SCALE
    pooled = torch.nn.functional.avg_pool2d(img, 8) * 2 - 1
    assert (latent[:, :3] - pooled).abs().max() <= 1e-5
    z = torch.rand(2, 4, 6, 10, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z[:, 3] = 0
    out = core_vae.decode(z / SD15_SCALE).movedim(-1, 1)
    assert (out - decode_model_latent(z)).abs().max() <= 1e-4        # float32 GroupNorm statistics: ~1e-5


def test_our_tiled_decode_gives_the_same_picture(core_vae):
    """Our DiTControl_VAEDecodeTiledOnePass route (kernels.tiled_decode on vae.decode, as the node calls it)."""
    img = blocky(1, 24, 24, seed=3)
    latent = core_vae.encode(img.movedim(1, -1))
    tiled = tiled_decode(latent, lambda z: core_vae.decode(z).movedim(-1, 1), tile=16, overlap=4)
    assert (tiled - img).abs().max() <= 1e-3
