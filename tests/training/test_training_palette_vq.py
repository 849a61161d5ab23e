"""tests/training/palette_vq.py: the hand-set VQ-16 file loads as LlamaGen's VQ-16 (strict, the VQ-16 Loader's
rules), and its decode paints each token's palette colour as a flat 16×16 patch, exactly what encode read."""
import torch

from dit_control.kernels.controlar.checkpoint import load_vq_file
from dit_control.kernels.controlar.vq import to_unit_range
from dit_control.tests.training.palette_vq import PALETTE, decode_tokens, encode_tokens, save_palette_vq


def palette_patches(rows: int, cols: int, seed: int) -> tuple:
    ids = torch.randint(0, len(PALETTE), (1, rows * cols), generator=torch.Generator().manual_seed(seed))
    return ids, decode_tokens(ids, rows, cols)


def test_the_file_loads_as_vq16_and_decode_of_encode_is_the_image(tmp_path):
    vq, cfg = load_vq_file(str(save_palette_vq(tmp_path / "vq_ds16_t2i.pt")))
    assert cfg.downsample == 16 and cfg.codebook_size == len(PALETTE) and cfg.codebook_embed_dim == 8
    ids, img = palette_patches(3, 5, seed=0)                          # 48 × 80 px, non-square
    tokens = encode_tokens(img)
    assert torch.equal(tokens, ids)
    with torch.no_grad():
        out = to_unit_range(vq.decode_code(tokens, 3, 5))
    assert out.shape == img.shape
    assert (out - img).abs().max() <= 5e-5               # float32 GroupNorm statistics; an 8-bit step is 4e-3


def test_encode_takes_the_nearest_palette_colour_of_each_patch_mean():
    ids, img = palette_patches(2, 2, seed=1)
    noise = torch.rand(img.shape, generator=torch.Generator().manual_seed(2)) * 0.1 - 0.05
    assert torch.equal(encode_tokens((img + noise).clamp(0, 1)), ids)
    grey = torch.full((1, 3, 16, 16), 0.5)                             # between white and black: some entry
    assert 0 <= int(encode_tokens(grey)) < len(PALETTE)
