"""tests/training/train.py smoke runs: each stage trains a few steps on a few scenes, resumes bit for bit,
and writes files our loaders' own reading + strict checks accept (the code paths of the DiT and ControlNet
loader nodes: read_state_dict -> prepare_pixart / prepare_pixart_controlnet), fp16, in the released layouts."""
import json

import pytest
import torch

from dit_control.kernels.checkpoint_io import read_json_beside, read_state_dict
from dit_control.kernels.pixart.checkpoint import (
    from_diffusers_config,
    load_pixart,
    prepare_pixart,
    to_diffusers_config,
)
from dit_control.kernels.pixart.control_file import load_bundled_base
from dit_control.kernels.pixart.controlnet import load_pixart_controlnet, prepare_pixart_controlnet
from dit_control.tests.training import train

SMALL = ["--scenes", "48", "--batch", "4", "--seed", "3"]


def run(out, stage, steps, *extra):
    return train.main(["--stage", stage, "--out", str(out), "--steps", str(steps), "--ckpt-every", "2",
                       *SMALL, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    run(out, "base", 3)
    run(out, "lcm", 2)
    run(out, "controlnet", 2)
    return out


def loss_rows(path):
    return [line.split(",")[:2] for line in path.read_text().splitlines()[1:]]


def test_base_resumes_bit_for_bit(tmp_path, trained):
    run(tmp_path, "base", 2)            # checkpoint at step 2, then a second command continues to 3
    run(tmp_path, "base", 3)
    assert loss_rows(tmp_path / "base" / "loss.csv") == loss_rows(trained / "base" / "loss.csv")
    a = read_state_dict(str(tmp_path / "models" / "diffusion_models" / "PixArt-XL-2-1024-MS.pth"))
    b = read_state_dict(str(trained / "models" / "diffusion_models" / "PixArt-XL-2-1024-MS.pth"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_files_load_strictly_and_are_one_network(trained):
    dm = trained / "models" / "diffusion_models"
    sd_ms = read_state_dict(str(dm / "PixArt-XL-2-1024-MS.pth"))
    sd_512 = read_state_dict(str(dm / "PixArt-XL-2-512x512.pth"))
    assert all(v.dtype == torch.float16 for v in sd_ms.values())
    _, cfg_ms, layout = prepare_pixart(dict(sd_ms))
    _, cfg_512, _ = prepare_pixart(dict(sd_512))
    assert layout == "original" and cfg_ms.micro_condition and not cfg_512.micro_condition
    assert (cfg_ms.sample_size, cfg_512.sample_size, cfg_ms.hidden_size, cfg_ms.num_heads) == (128, 64, 144, 2)
    assert "y_embedder.y_embedding" in sd_ms and cfg_ms.null_caption
    ms = load_pixart({k: v.float() for k, v in sd_ms.items()}, dtype=torch.float32)
    nm = load_pixart({k: v.float() for k, v in sd_512.items()}, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for size in (32, 64, 128):           # 256, 512 and 1024 px: the same outputs (zero micro-conditions)
        x, y = torch.randn(1, 4, size, size, generator=g), torch.randn(1, 7, 64, generator=g)
        t = torch.tensor([500])
        with torch.no_grad():
            assert torch.allclose(ms(x, t, y), nm(x, t, y), atol=1e-5)


def test_lcm_file_is_the_diffusers_layout_with_config(trained):
    path = trained / "models" / "diffusion_models" / "PixArt-LCM-XL-2-1024-MS" / "transformer" / \
        "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(str(path))
    config = read_json_beside(str(path))
    assert "adaln_single.linear.weight" in sd and all(v.dtype == torch.float16 for v in sd.values())
    assert config == to_diffusers_config(prepare_pixart(sd, **from_diffusers_config(config)).config)   # one writer
    _, cfg, layout = prepare_pixart(sd, **from_diffusers_config(config))
    assert layout == "diffusers" and cfg.micro_condition and cfg.patch_size == config["patch_size"] == 4
    # the student moved away from the base it started from
    base = read_state_dict(str(trained / "models" / "diffusion_models" / "PixArt-XL-2-1024-MS.pth"))
    lcm = prepare_pixart(read_state_dict(str(path)), num_heads=2, sample_size=128).state_dict
    assert not torch.equal(lcm["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])


def test_controlnet_file_is_the_full_released_layout(trained):
    path = trained / "models" / "controlnet" / "PixArt-XL-2-1024-ControlNet.pth"
    sd = read_state_dict(str(path))
    control, base_sd, info = prepare_pixart_controlnet(sd)
    assert info.layout == "original" and info.num_blocks == train.CONTROL_BLOCKS and info.hidden_size == 144
    base = load_bundled_base(base_sd, info, dtype=torch.float32)
    net = load_pixart_controlnet(control, base, dtype=torch.float32, info=info)
    # the bundled base is the trained base, unchanged
    plain = read_state_dict(str(trained / "models" / "diffusion_models" / "PixArt-XL-2-1024-MS.pth"))
    assert all(torch.equal(sd[f"base_model.{k}"], v) for k, v in plain.items())
    x, y = torch.randn(1, 4, 32, 32), torch.randn(1, 5, 64)
    with torch.no_grad():
        out = base(x, torch.tensor([400]), y, control=net.branch(torch.randn(1, 4, 32, 32)))
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()


def test_curves_reports_and_t5(trained):
    from dit_control.tests.generators.make_checkpoints import save_context_t5
    for stage in ("base", "lcm", "controlnet"):
        rows = loss_rows(trained / stage / "loss.csv")
        assert len(rows) >= 2 and all(float(r[1]) > 0 for r in rows)
        assert (trained / stage / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        report = json.loads((trained / stage / "report.json").read_text())
        assert report["files"] and report["sec_per_step_median"] > 0
    t5 = trained / "models" / "text_encoders" / "t5xxl_fp16.safetensors"
    save_context_t5(trained / "default_t5.safetensors", seed=4)     # what make_all installs
    assert t5.read_bytes() == (trained / "default_t5.safetensors").read_bytes()


def test_data_cache_holds_the_pixel_vae_latents_of_the_scenes(trained):
    from dit_control.tests.training.pixel_vae import encode_model_latent
    from dit_control.tests.training.scenes import edge_map, render, training_scene
    data = torch.load(trained / "data" / "scenes_0_48_edges.pt", weights_only=True)
    assert data["latents"].shape == data["edges"].shape == (48, 3, 32, 32)
    tok = train.tokenizer()
    for i in (0, 17, 47):
        img = render(training_scene(i))
        want = encode_model_latent(torch.from_numpy(img).permute(2, 0, 1)[None])[0, :3]
        assert (data["latents"][i].float() - want).abs().max() < 2e-3          # stored as fp16
        e = torch.from_numpy(edge_map(img))[None, None].expand(1, 3, -1, -1)
        assert (data["edges"][i].float() - encode_model_latent(e)[0, :3]).abs().max() < 2e-3
        ids, mask = train.tokenize(tok, [training_scene(i).caption])
        assert torch.equal(data["ids"][i].long(), ids[0]) and torch.equal(data["mask"][i], mask[0].bool())


def test_evaluation_samplers_return_x0_for_an_oracle_model():
    """evaluate.py's DPM-Solver++(2M) and LCM loops on an ε that knows the answer give the answer back."""
    import math

    from dit_control.tests.training.evaluate import AC, dpmpp_2m, lcm
    x0 = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def oracle(x, t):
        a = float(AC[int(t)])
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    gen = torch.Generator().manual_seed(1)
    assert (dpmpp_2m(oracle, x0.shape, 20, gen) - x0).abs().max() < 1e-5
    assert (lcm(oracle, x0.shape, 4, gen) - x0).abs().max() < 1e-5


def test_passthrough_init_starts_at_eps_equals_x_t():
    """train.passthrough_init: before any step the DiT answers ε̂ = x_t (the high-noise optimum) to 0.5%, at
    every timestep and whatever the caption, because the final LayerNorm is made a fixed scale."""
    cfg = train.model_config()
    gen = torch.Generator().manual_seed(0)
    model = train.new_base(cfg, gen)
    train.passthrough_init(model, gen)
    x = torch.randn(3, 4, train.LATENT, train.LATENT, generator=gen)
    caption = torch.randn(3, 8, cfg.caption_channels, generator=gen)
    with torch.no_grad():
        for t in (0, 500, 999):
            eps = train.eps_of(model.eval(), x, torch.full((3,), t), caption, torch.ones(3, 8))
            assert float((eps - x).norm() / x.norm()) < 5e-3, t
    plain = train.new_base(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((train.eps_of(plain.eval(), x, torch.full((3,), 999), caption, torch.ones(3, 8)) - x).norm()
                     / x.norm()) > 0.5          # what the plain init starts from


def test_init_from_continues_committed_weights(tmp_path, trained):
    """--init-from starts a base / LCM / ControlNet run from a models folder's files (a fine-tune): with a
    negligible learning rate one step gives the same tensors back (fp16), and the place-free caption share draws
    prompts. (The LCM's teacher is this run's base, the one just written: the same tensors.)"""
    run(tmp_path, "base", 1, "--init-from", str(trained / "models"), "--lr", "1e-12")
    run(tmp_path, "lcm", 1, "--init-from", str(trained / "models"), "--lr", "1e-12")
    run(tmp_path, "controlnet", 1, "--init-from", str(trained / "models"), "--lr", "1e-12")
    for rel in ("diffusion_models/PixArt-XL-2-1024-MS.pth", "controlnet/PixArt-XL-2-1024-ControlNet.pth",
                "diffusion_models/PixArt-LCM-XL-2-1024-MS/transformer/diffusion_pytorch_model.safetensors"):
        a, b = (read_state_dict(str(d / "models" / rel)) for d in (tmp_path, trained))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-3) for k in a), rel
