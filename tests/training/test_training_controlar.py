"""tests/training/train_controlar.py: its whole-sequence training pass is the sampler's computation. Teacher-forced
logits over the last 48 of the 120 left-padded caption rows (pads masked) equal the KV-cache prefill + one-token
decode the ControlAR Sampler runs over all 120 rows, control injection included, on both files' RoPE grids."""
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
