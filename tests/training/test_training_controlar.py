"""tests/training/train_controlar.py: its whole-sequence training pass is the sampler's computation. Teacher-forced
logits over the last 48 of the 120 left-padded caption rows (pads masked) equal the KV-cache prefill + one-token
decode the ControlAR Sampler runs over all 120 rows, control injection included, on both files' RoPE grids. Its
training targets and loss weights are what they say."""
import numpy as np
import pytest
import torch

from dit_control.kernels.controlar.text import left_pad
from dit_control.tests.training.train_controlar import CAPTION_ROWS, MODES, RopeGrids, new_model, teacher_forced_logits


@pytest.mark.parametrize("mode", tuple(MODES))
def test_teacher_forced_logits_equal_the_cached_decode(mode):
    gen = torch.Generator().manual_seed(0)
    model = new_model(gen).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5, generator=gen)                  # logits that differ per token
        for layer in model.condition_layers:
            layer.fc2.weight.normal_(0, 0.1, generator=gen)                 # a control that acts
    RopeGrids(model).use(model, mode)
    rows, cols, b, t = 3, 5, 2, model.cfg.cls_token_num
    n = rows * cols
    lengths = torch.tensor([7, 19])                                          # caption tokens per row
    mask = (torch.arange(t)[None] < lengths[:, None]).long()                 # right-padded, as T5 gives it
    caption, cmask = left_pad(torch.randn(b, t, model.cfg.caption_dim, generator=gen), mask)
    tokens = torch.randint(0, model.cfg.vocab_size, (b, n), generator=gen)
    control_image = torch.rand(b, 3, 16 * rows, 16 * cols, generator=gen) * 2 - 1
    with torch.no_grad():
        control = model.control_tokens(model.adapter_features(control_image, MODES[mode][3]))
        trained = teacher_forced_logits(model, caption[:, -CAPTION_ROWS:], cmask[:, -CAPTION_ROWS:], tokens, control)
        cache = model.new_cache(b, n, cmask)
        cached = [model.prefill(model.embed_prefix(caption), cache, control)[:, -1]]
        for j in range(1, n):
            cached.append(model.decode(tokens[:, j - 1:j], t + j - 1, cache, control)[:, -1])
    cached = torch.stack(cached, dim=1)
    assert trained.shape == cached.shape == (b, n, model.cfg.vocab_size)
    assert (trained - cached).abs().max() <= 1e-4 * cached.abs().max()


def test_plurality_targets_take_one_of_a_patch_colours_never_a_third():
    """A red-yellow edge patch's mean is nearest orange (the VQ's encode: a halo token); its plurality target is
    red or yellow, and every patch of a drawn scene takes a colour the scene has."""
    from dit_control.tests.training.palette_vq import PALETTE_NAMES
    from dit_control.tests.training.scenes import COLOURS, training_scene
    from dit_control.tests.training.train_controlar import draw, plurality_tokens_np, tokens_np
    red, yellow = (np.array(COLOURS[c], np.float32) / 255 for c in ("red", "yellow"))
    patch = np.broadcast_to(yellow, (16, 16, 3)).copy()
    patch[:, :7] = red                                         # 7 of 16 columns red: the patch is yellow
    assert PALETTE_NAMES[int(tokens_np(patch)[0])] not in ("red", "yellow")
    assert PALETTE_NAMES[int(plurality_tokens_np(patch)[0])] == "yellow"
    for seed in range(20):
        scene = training_scene(seed)
        allowed = {PALETTE_NAMES.index(c) for c in [scene.background] + [s.colour for s in scene.shapes]}
        assert set(plurality_tokens_np(draw(scene, 384, 256)).tolist()) <= allowed, seed


def test_token_weights_mark_each_shape_colour_s_first_token():
    from dit_control.tests.training.train_controlar import token_weights
    tokens = torch.tensor([[0, 0, 0, 0,
                            0, 1, 1, 0,
                            0, 1, 1, 2,
                            0, 0, 0, 2]])
    w = token_weights(tokens, 1.0, 10.0).reshape(4, 4)
    assert w[1, 1] == 12 and w[2, 3] == 12                        # each shape colour's first token: shape + start
    assert w[1, 2] == 2 and w[2, 1] == 2 and w[3, 3] == 2         # the rest of the shapes
    assert (w[tokens.reshape(4, 4) == 0] == 1).all()              # the background (the most common token)
