"""Make the tiny/random checkpoints the tests and the demo run on, in the real released layouts and
under the real file names, so that the shipped workflow JSON runs unchanged.

No weights can be downloaded here: every file is made by our own code from fixed seeds.
- the PixArt files — diffusion_models/PixArt-XL-2-512x512.pth, PixArt-XL-2-1024-MS.pth (original .pth layout:
  `state_dict` wrapper, stale `pos_embed`, learned null caption), PixArt-LCM-XL-2-1024-MS/transformer/
  (diffusers layout + config.json), controlnet/PixArt-XL-2-1024-ControlNet.pth — are the micro demo model
  trained here (tests/training/weights/, installed by tests/training/install.py) with the pixel VAE as
  vae/sd-vae-ft-ema.safetensors; without the committed weights, random tiny files and a FULL-SIZE random SD VAE;
- text_encoders/t5xxl_fp16.safetensors: the tiny T5-v1.1 encoder (HF/ComfyUI key names, fp16) with hand-set
  positional attention (save_context_t5), the one the micro model's captions were encoded with;
- annotators/ControlNetHED.pth: the FULL-SIZE HED annotator (ControlNetHED_Apache2) with random weights, fp16.
- diffusion_models/flux1-dev.safetensors: FLUX.1-dev layout (ComfyUI/BFL names), full width 3072, 1 double +
  1 single block, bf16 — core's UNETLoader detects and loads it (EasyControl API tests);
- loras/canny.safetensors, loras/subject.safetensors: rank-4 EasyControl LoRAs in the released naming for 1 + 1 blocks;
- vae/ae.safetensors: a FULL-SIZE FLUX VAE (16 latent channels) with random weights;
- text_encoders/clip_l.safetensors: a placeholder (the DualCLIPLoader name of the EasyControl workflows; never loaded).
- controlar/ (canny_MR, hed, LlamaGen base, VQ-16) and text_encoders/flan-t5-xl/: the micro ControlAR trained here
  (tests/training/weights/controlar/, installed by tests/training/install_controlar.py) with the palette VQ-16 and
  the contextual tiny T5; random tiny ControlAR files in the released layouts beside them under controlar/random/
  and text_encoders/flan-t5-xl-random/ (tests/generators/make_controlar_checkpoints.py).

Usage: python tests/generators/make_checkpoints.py [models_dir]   (default .comfy_host/models; cached by a stamp)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from dit_control.kernels.pixart.model import PixArt, PixArtConfig, pos_embed_2d  # noqa: E402
from dit_control.tests.generators.make_controlar_checkpoints import make_controlar_files, write_controlar_inputs  # noqa: E402
from dit_control.tests.generators.make_dit4sr_checkpoints import make_dit4sr_files, write_dit4sr_inputs  # noqa: E402
from dit_control.tests.training.install import available as micro_model_available  # noqa: E402
from dit_control.tests.training.install import digest as micro_model_digest  # noqa: E402
from dit_control.tests.training.install import install_micro_model  # noqa: E402

STAMP_VERSION = "13"
TINY_T5 = dict(vocab_size=32128, d_model=64, d_kv=32, num_heads=2, d_ff=128, num_layers=2)
# 72-wide heads like XL/2 (so the head count is inferred as for real files); hidden % 3 == 0 for the
# size embedders; caption width = the tiny T5's d_model
TINY_PIXART = dict(hidden_size=144, depth=2, num_heads=2, caption_channels=TINY_T5["d_model"])


def random_pixart_state_dict(cfg: PixArtConfig, seed: int) -> dict:
    """Seeded random weights with every tensor non-zero (zero-init projections would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = PixArt(cfg)
    sd = {}
    for name, t in model.state_dict().items():
        fan_in = t.shape[1] * (t[0, 0].numel() if t.ndim > 2 else 1) if t.ndim >= 2 else t.shape[-1]
        std = 0.02 if name.endswith("bias") else 1.0 / fan_in ** 0.5
        sd[name] = torch.randn(t.shape, generator=gen) * std
    return sd


def random_pixart_pth_state_dict(cfg: PixArtConfig, seed: int) -> dict:
    """Random weights plus the stale square `pos_embed` table the released .pth files carry
    (the loader recomputes it per size)."""
    sd = random_pixart_state_dict(cfg, seed)
    grid = cfg.sample_size // cfg.patch_size
    sd["pos_embed"] = pos_embed_2d(cfg.hidden_size, grid, grid, cfg.base_size, cfg.pe_interpolation)[None]
    return sd


def save_pixart_pth(path: Path, cfg: PixArtConfig, seed: int):
    sd = random_pixart_pth_state_dict(cfg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd}, path)


def save_pixart_diffusers(folder: Path, cfg: PixArtConfig, seed: int):
    """The diffusers transformer layout: renamed keys, split q/k/v, no pos_embed / null caption."""
    import safetensors.torch

    from dit_control.kernels.pixart.checkpoint import original_to_diffusers, to_diffusers_config
    out = original_to_diffusers(random_pixart_state_dict(cfg, seed))
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(out, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(cfg), indent=1))


def random_t5_tensor(name: str, shape: tuple, cfg, gen: torch.Generator) -> torch.Tensor:
    """One T5-v1.1 tensor drawn as HF's T5 initialisation draws it (layer norms jittered around 1 so
    they matter). The query's extra 1/sqrt(d_kv) is the attention scale T5 folds into its weights:
    without it a deep random T5 is chaotic (softmax saturates; even bf16 rounding changes the output
    completely), which no trained T5 is."""
    if "layer_norm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name in ("shared.weight", "encoder.embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    if "relative_attention_bias" in name:
        return torch.randn(shape, generator=gen) * cfg.d_model ** -0.5
    std = shape[-1] ** -0.5                                   # fan-in: k, v, o, wi_0, wi_1, wo
    if name.endswith("SelfAttention.q.weight"):
        std = (cfg.d_model * cfg.d_kv) ** -0.5
    return torch.randn(shape, generator=gen) * std


def save_tiny_t5(path: Path, seed: int, **config):
    """HF T5EncoderModel key names, fp16 like ComfyUI's t5xxl_fp16.safetensors; `config` overrides TINY_T5."""
    from dit_control.kernels.t5 import T5Config, T5Encoder
    gen = torch.Generator().manual_seed(seed)
    cfg = T5Config(**{**TINY_T5, **config})
    with torch.device("meta"):
        model = T5Encoder(cfg)
    sd = {name: random_t5_tensor(name, tuple(t.shape), cfg, gen) for name, t in model.state_dict().items()}
    save_t5_file(sd, path)


def save_t5_file(sd: dict, path: Path):
    """Write a T5 encoder state dict as ComfyUI's t5xxl_fp16.safetensors is: fp16, and the embedding tied to
    `shared.weight` stored once (safetensors refuses shared storage)."""
    import safetensors.torch
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))


# the embedded T5's two heads attend by position alone (q = k = 0, the relative bias decides): head 0 to the
# LEFT_CONTEXT words before each token, head 1 to the RIGHT_CONTEXT words after it, with a strong bias
LEFT_CONTEXT, RIGHT_CONTEXT, CONTEXT_BIAS, CONTEXT_GAIN = 6, 2, 10.0, 1.5


def save_context_t5(path: Path, seed: int):
    """The embedded tiny T5 (TINY_T5 config, HF key names, fp16): random token embeddings, as a random T5's,
    but attention set by hand so that each token's output also carries its neighbours' words.

    Why: a caption names several colours ("a big red circle ... on a blue background"); a random 2-layer T5
    mixes so little context into a token that the micro demo model could not tell the background's colour
    from a shape's (a third of its wrong backgrounds were a shape's colour). Here q = k = 0, so each head's
    attention is its relative-position bias alone: head 0 averages the LEFT_CONTEXT tokens before a token
    (a position word then carries the shape and colour it belongs to), head 1 the RIGHT_CONTEXT after it (a
    colour carries its "circle" or "background"); both blocks do it (T5 shares block 0's bias), so context
    reaches twice as far. Values and outputs are random orthonormal maps (gain CONTEXT_GAIN) into the
    residual stream; the feed-forwards are zero; norms are 1. The T5 kernel and loaders see a T5 like any."""
    from dit_control.kernels.t5 import T5Config, T5Encoder, relative_position_bucket
    gen = torch.Generator().manual_seed(seed)
    cfg = T5Config(**TINY_T5)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    sd = {}
    rel = torch.arange(-64, 65)
    buckets = relative_position_bucket(rel, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    table = torch.full((cfg.relative_attention_num_buckets, cfg.num_heads), -CONTEXT_BIAS)
    for r, b in zip(rel.tolist(), buckets.tolist()):
        if -LEFT_CONTEXT <= r <= -1:
            table[b, 0] = CONTEXT_BIAS
        if 1 <= r <= RIGHT_CONTEXT:
            table[b, 1] = CONTEXT_BIAS

    def orthonormal(rows, cols):
        q = torch.linalg.qr(torch.randn(max(rows, cols), max(rows, cols), generator=gen)).Q
        return q[:rows, :cols]
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name in ("shared.weight", "encoder.embed_tokens.weight"):
            sd[name] = torch.randn(shape, generator=gen)
        elif "layer_norm" in name:
            sd[name] = torch.ones(shape)
        elif "relative_attention_bias" in name:
            sd[name] = table.clone()
        elif name.endswith(("SelfAttention.q.weight", "SelfAttention.k.weight", "DenseReluDense.wo.weight")):
            sd[name] = torch.zeros(shape)
        elif name.endswith("SelfAttention.v.weight"):
            sd[name] = orthonormal(*shape)
        elif name.endswith("SelfAttention.o.weight"):
            sd[name] = CONTEXT_GAIN * orthonormal(*shape)
        else:                                           # wi_0, wi_1: unused behind wo = 0
            sd[name] = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    save_t5_file(sd, path)


def save_random_sd_vae(path: Path, seed: int):
    """Full-size SD kl-f8 VAE (sd-vae-ft-ema architecture), random weights, ldm key layout, fp16."""
    import safetensors.torch
    shapes = sd_vae_shapes()
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and "norm" in name and name.endswith("weight"):
            sd[name] = torch.ones(shape)
        elif len(shape) == 1:
            sd[name] = torch.zeros(shape)
        else:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            sd[name] = torch.randn(shape, generator=gen) * (1.0 / fan_in) ** 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.to(torch.float16) for k, v in sd.items()}, str(path))


def sd_vae_shapes() -> dict:
    """Tensor names and shapes of the SD kl-f8 VAE in the original (ldm) layout."""
    shapes = {}
    ch, mult, res = 128, (1, 2, 4, 4), 2

    def resnet(prefix, cin, cout):
        shapes.update({f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
                       f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
                       f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
                       f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)})
        if cin != cout:
            shapes.update({f"{prefix}.nin_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.nin_shortcut.bias": (cout,)})

    def attn(prefix, c):
        shapes.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)})
        for n in ("q", "k", "v", "proj_out"):
            shapes.update({f"{prefix}.{n}.weight": (c, c, 1, 1), f"{prefix}.{n}.bias": (c,)})

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        attn(f"{prefix}.mid.attn_1", c)
        resnet(f"{prefix}.mid.block_2", c, c)

    # encoder
    shapes.update({"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)})
    cin = ch
    for i, m in enumerate(mult):
        cout = ch * m
        for j in range(res):
            resnet(f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
        if i != len(mult) - 1:
            shapes.update({f"encoder.down.{i}.downsample.conv.weight": (cout, cout, 3, 3),
                           f"encoder.down.{i}.downsample.conv.bias": (cout,)})
    mid("encoder", cin)
    shapes.update({"encoder.norm_out.weight": (cin,), "encoder.norm_out.bias": (cin,),
                   "encoder.conv_out.weight": (8, cin, 3, 3), "encoder.conv_out.bias": (8,),
                   "quant_conv.weight": (8, 8, 1, 1), "quant_conv.bias": (8,),
                   "post_quant_conv.weight": (4, 4, 1, 1), "post_quant_conv.bias": (4,)})
    # decoder
    top = ch * mult[-1]
    shapes.update({"decoder.conv_in.weight": (top, 4, 3, 3), "decoder.conv_in.bias": (top,)})
    mid("decoder", top)
    cin = top
    for i in reversed(range(len(mult))):
        cout = ch * mult[i]
        for j in range(res + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, cout)
            cin = cout
        if i != 0:
            shapes.update({f"decoder.up.{i}.upsample.conv.weight": (cout, cout, 3, 3),
                           f"decoder.up.{i}.upsample.conv.bias": (cout,)})
    shapes.update({"decoder.norm_out.weight": (ch,), "decoder.norm_out.bias": (ch,),
                   "decoder.conv_out.weight": (3, ch, 3, 3), "decoder.conv_out.bias": (3,)})
    return shapes


def save_random_hed(path: Path, seed: int):
    """ControlNetHED.pth as released (lllyasviel/Annotators): a plain fp16 state dict, 37 tensors.

    He-initialised 3×3 convs keep the VGG activations at the input's scale (image·255 − norm); the 1×1
    side projections are scaled down so the averaged logits stay O(1): edges land in roughly 0.25..0.98
    and an outline gives higher values than flat areas, so the maps are neither saturated nor constant.
    """
    from dit_control.kernels.hed import hed_expected_shapes
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in hed_expected_shapes().items():
        if name == "norm":
            sd[name] = torch.tensor([123.675, 116.28, 103.53]).view(shape)  # ImageNet RGB mean ×255
        elif name.endswith("bias"):
            sd[name] = torch.randn(shape, generator=gen) * 0.05
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            gain = 2.0 if ".convs." in name else 1e-3
            sd[name] = torch.randn(shape, generator=gen) * (gain / fan_in) ** 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.float16) for k, v in sd.items()}, path)


def _example_control_scene():
    from dit_control.tests.training.scenes import Scene, Shape
    return Scene("yellow", (Shape("circle", "red", "big", "top left"), Shape("square", "blue", "big", "bottom right")))


EXAMPLE_CONTROL_SCENE = _example_control_scene()


def stamp_version() -> str:
    """The cache stamp: the file makers' version and which micro demo model is installed (or random files)."""
    from dit_control.tests.training import install_controlar
    controlar = f"+controlar-{install_controlar.digest()}" if install_controlar.available() else "+controlar-random"
    return STAMP_VERSION + (f"+micro-{micro_model_digest()}" if micro_model_available() else "+random") + controlar


def make_all(models_dir: Path) -> Path:
    models_dir = Path(models_dir)
    stamp = models_dir / ".stamp"
    if stamp.exists() and stamp.read_text() == stamp_version():
        return models_dir
    dm = models_dir / "diffusion_models"
    save_context_t5(models_dir / "text_encoders" / "t5xxl_fp16.safetensors", seed=4)
    shard_t5(models_dir / "text_encoders" / "t5xxl_fp16.safetensors", models_dir / "text_encoders" / "t5-v1_1-xxl")
    save_random_hed(models_dir / "annotators" / "ControlNetHED.pth", seed=6)
    # the micro demo model trained here (tests/training/) where it is committed, else random tiny files
    if not install_micro_model(models_dir):
        save_pixart_pth(dm / "PixArt-XL-2-512x512.pth",
                        PixArtConfig(sample_size=64, pe_interpolation=1.0, micro_condition=False, **TINY_PIXART),
                        seed=1)
        save_pixart_pth(dm / "PixArt-XL-2-1024-MS.pth",
                        PixArtConfig(sample_size=128, pe_interpolation=2.0, micro_condition=True, **TINY_PIXART),
                        seed=2)
        save_pixart_diffusers(dm / "PixArt-LCM-XL-2-1024-MS" / "transformer",
                              PixArtConfig(sample_size=128, pe_interpolation=2.0, micro_condition=True,
                                           null_caption=False, **TINY_PIXART), seed=3)
        save_random_sd_vae(models_dir / "vae" / "sd-vae-ft-ema.safetensors", seed=5)
        save_pixart_controlnet_pth(models_dir / "controlnet" / "PixArt-XL-2-1024-ControlNet.pth",
                                   PixArtConfig(sample_size=128, pe_interpolation=2.0, micro_condition=True,
                                                **{**TINY_PIXART, "depth": 4}), num_blocks=2, seed=7)
    save_comfy_native_pixart(dm / "comfy-native-pixart-depth1.safetensors", seed=8)
    make_easycontrol_files(models_dir)
    make_dit4sr_files(models_dir)
    from dit_control.tests.generators.make_relactrl_checkpoints import make_relactrl  # imports this module: import here
    make_relactrl(models_dir)
    make_controlar_files(models_dir)
    stamp.write_text(stamp_version())
    return models_dir


def write_bad_checkpoints(folder: Path, made: Path):
    """Files a user might pick by mistake: other model families, a truncated and an empty file."""
    import safetensors.torch
    folder.mkdir(parents=True, exist_ok=True)
    def z():
        return torch.zeros(4, 4)
    safetensors.torch.save_file({"double_blocks.0.img_attn.qkv.weight": z(), "single_blocks.0.linear1.weight": z(),
                                 "img_in.weight": z()}, str(folder / "flux1-dev-like.safetensors"))
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": z(),
                                 "first_stage_model.decoder.conv_in.weight": z()},
                                str(folder / "sd15-like.safetensors"))
    good = (made / "diffusion_models" / "PixArt-LCM-XL-2-1024-MS" / "transformer" /
            "diffusion_pytorch_model.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    pth = (made / "diffusion_models" / "PixArt-XL-2-512x512.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(pth[: len(pth) // 3])
    (folder / "empty.pth").write_bytes(b"")


def save_pixart_controlnet_pth(path: Path, base_cfg: PixArtConfig, num_blocks: int, seed: int):
    """The released full ControlNet layout: `base_model.*` (a PixArt .pth) + `controlnet.*`, under state_dict."""
    from dit_control.kernels.pixart.controlnet import PixArtControlNet, block_config
    base = random_pixart_pth_state_dict(base_cfg, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.device("meta"):
        net = PixArtControlNet(num_blocks, block_config(base_cfg.hidden_size, base_cfg.num_heads, base_cfg.mlp_ratio))
    control = {}
    for name, t in net.state_dict().items():
        fan_in = t.shape[1] if t.ndim >= 2 else t.shape[-1]
        # before/after projections are zero at initialisation upstream; non-zero here so control shows
        std = 0.02 if name.endswith("bias") else (0.3 if "_proj" in name else 1.0) / fan_in ** 0.5
        control[name] = torch.randn(t.shape, generator=gen) * std
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {**{f"base_model.{k}": v for k, v in base.items()}, **control}}, path)


def save_comfy_native_pixart(path: Path, seed: int):
    """A model ComfyUI itself detects as PixArt-α (hidden 1152, 16 heads, depth 1): a non-pack MODEL for tests."""
    import safetensors.torch
    cfg = PixArtConfig(depth=1, null_caption=False)
    sd = {k: v.to(torch.float16) for k, v in random_pixart_state_dict(cfg, seed).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))


def write_bad_controlnets(folder: Path):
    """A file of another family and an empty file, for the ControlNet loaders' error tests."""
    import safetensors.torch
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)},
                                str(folder / "not-a-controlnet.safetensors"))
    (folder / "empty.pth").write_bytes(b"")


# (folder, source file made by make_all, tensor to damage) for the damaged-weights tests: one per loader
DAMAGED_SOURCES = {
    "diffusion_models": ("PixArt-XL-2-512x512.pth", "blocks.1.attn.qkv.weight"),
    "text_encoders": ("t5xxl_fp16.safetensors", "encoder.block.1.layer.0.SelfAttention.q.weight"),
    "controlnet": ("PixArt-XL-2-1024-ControlNet.pth", "controlnet.0.copied_block.attn.qkv.weight"),
    "annotators": ("ControlNetHED.pth", "block1.convs.0.weight"),
}


def write_damaged_weights(root: Path, made: Path) -> dict:
    """In each loader's folder, `damaged/nan-<file>` and `damaged/inf-<file>`: the made file with a few
    values of one tensor set to NaN / Inf (as a bad download or a broken conversion leaves them).
    Also `diffusion_models/damaged/overflow-<file>`: finite weights so large that a step overflows.
    Returns {folder: (damaged tensor name, [file names relative to the folder])}."""
    import safetensors.torch
    out = {}
    for folder, (source, key) in DAMAGED_SOURCES.items():
        src = made / folder / source
        target = root / folder / "damaged"
        target.mkdir(parents=True, exist_ok=True)
        names = []
        for kind, value in (("nan", float("nan")), ("inf", float("inf"))):
            if source.endswith(".safetensors"):
                sd = safetensors.torch.load_file(str(src))
                sd[key].view(-1)[:3] = value
                safetensors.torch.save_file(sd, str(target / f"{kind}-{source}"))
            else:
                ckpt = torch.load(src, map_location="cpu", weights_only=True)
                sd = ckpt.get("state_dict", ckpt)
                sd[key].view(-1)[:3] = value
                torch.save(ckpt, target / f"{kind}-{source}")
            names.append(f"damaged/{kind}-{source}")
        out[folder] = (key, names)
    # finite but overflowing: the final projection scaled so its output exceeds fp32's range
    ckpt = torch.load(made / "diffusion_models" / "PixArt-XL-2-512x512.pth", map_location="cpu", weights_only=True)
    # (in float32: the file may be fp16, as the micro demo model's is, whose range ends at 65504)
    sd = ckpt["state_dict"]
    sd["final_layer.linear.weight"] = torch.full_like(sd["final_layer.linear.weight"], 3e38, dtype=torch.float32)
    torch.save(ckpt, root / "diffusion_models" / "damaged" / "overflow-PixArt-XL-2-512x512.pth")
    return out


def write_example_inputs(input_dir: Path):
    """Control images for the ControlNet workflow, drawn here (no image is downloaded or committed)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from dit_control.tests.training.scenes import render
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    # the PixArt ControlNet / RelaCtrl example input: a procedural scene, which the micro demo model draws
    # (its caption is the shipped ControlNet graph's prompt); 4:3 so that Fit Control Image crops it
    scene = render(EXAMPLE_CONTROL_SCENE, 1024)
    frame = np.repeat(scene[:, :1], 1280, axis=1)[:, :1280]
    frame[:, 128:1152] = scene
    Image.fromarray((frame * 255).round().astype(np.uint8)).save(input_dir / "pixart_delta_controlnet_input.png")
    portrait = Image.new("RGB", (200, 300), (20, 20, 20))
    ImageDraw.Draw(portrait).ellipse([40, 60, 160, 240], fill=(230, 230, 230))
    portrait.save(input_dir / "portrait_control.png")
    write_easycontrol_inputs(input_dir)
    write_dit4sr_inputs(input_dir)
    write_controlar_inputs(input_dir)


def write_easycontrol_inputs(input_dir: Path):
    """EasyControl workflow inputs, drawn: a canny-style edge map (white lines on black) and a subject
    photo (an object on a plain background, portrait aspect so the subject padding shows); plus a
    second edge map for the changed-condition tests."""
    from PIL import Image, ImageDraw
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    for name, shift in (("easycontrol_canny_input.png", 0), ("easycontrol_canny_input_2.png", 90)):
        edges = Image.new("RGB", (768, 768), (0, 0, 0))
        d = ImageDraw.Draw(edges)
        d.line([(0, 560), (768, 560)], fill=(255, 255, 255), width=3)
        d.polygon([(200 + shift, 560), (200 + shift, 360), (380 + shift, 220), (560 + shift, 360),
                   (560 + shift, 560)], outline=(255, 255, 255), width=3)
        d.rectangle([340 + shift, 440, 420 + shift, 560], outline=(255, 255, 255), width=3)
        d.ellipse([600, 60, 700, 160], outline=(255, 255, 255), width=3)
        edges.save(input_dir / name)
    subject = Image.new("RGB", (480, 640), (235, 235, 230))
    d = ImageDraw.Draw(subject)
    d.ellipse([140, 120, 340, 320], fill=(200, 60, 50))                    # a red ball on a stand
    d.rectangle([220, 320, 260, 540], fill=(90, 70, 50))
    d.rectangle([150, 540, 330, 580], fill=(60, 60, 60))
    subject.save(input_dir / "easycontrol_subject_input.png")
    write_easycontrol_kind_inputs(input_dir)


# the example inputs of the per-kind EasyControl graphs (issue 28), by file name
EASYCONTROL_PHOTO = "easycontrol_photo_input.png"           # Ghibli, inpainting, HED sketch, canny img2img
EASYCONTROL_INPAINT_MASK = "easycontrol_inpainting_mask.png"
EASYCONTROL_MAPS = {"depth": "easycontrol_depth_input.png", "pose": "easycontrol_pose_input.png",
                    "seg": "easycontrol_seg_input.png"}
# OpenPose's 18 body keypoints (COCO order) and its limb colours, as its renderers draw them
OPENPOSE_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
                  (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
OPENPOSE_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
# ADE20K palette entries (what segmentation preprocessors colour their classes with)
ADE20K = {"sky": (6, 230, 230), "building": (180, 120, 120), "tree": (4, 200, 3), "road": (140, 140, 140),
          "grass": (4, 250, 7), "person": (150, 5, 61)}


def write_easycontrol_kind_inputs(input_dir: Path):
    """Drawn stand-ins for what users bring: a landscape 'photo' (sky gradient, hills, a house, a tree: edges
    for HED and Canny, colour for Ghibli), the inpainting mask (white = repaint), and the maps preprocessor
    packs make: a depth map (near = bright), an OpenPose skeleton and an ADE20K-coloured segmentation."""
    import numpy as np
    from PIL import Image, ImageDraw
    w, h = 960, 720
    rows = np.linspace(0, 1, h)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - rows) + np.array([235, 225, 200]) * rows).astype(np.uint8)
    photo = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).copy())
    d = ImageDraw.Draw(photo)
    d.ellipse([-200, 380, 600, 900], fill=(90, 150, 70))
    d.ellipse([400, 420, 1200, 960], fill=(70, 130, 60))
    d.rectangle([520, 330, 760, 500], fill=(230, 220, 200), outline=(60, 50, 40), width=4)
    d.polygon([(500, 335), (640, 230), (780, 335)], fill=(170, 60, 50), outline=(60, 30, 20))
    d.rectangle([610, 420, 660, 500], fill=(110, 80, 50))
    d.rectangle([180, 300, 210, 470], fill=(100, 70, 40))
    d.ellipse([110, 180, 280, 340], fill=(40, 110, 50))
    d.ellipse([780, 60, 880, 160], fill=(250, 240, 190))
    photo.save(input_dir / EASYCONTROL_PHOTO)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse([480, 200, 800, 520], fill=255)          # over the house
    mask.save(input_dir / EASYCONTROL_INPAINT_MASK)
    size = 1024
    depth = np.broadcast_to(np.linspace(20, 200, size)[:, None], (size, size)).copy()     # floor comes closer
    yy, xx = np.mgrid[:size, :size]
    ball = (yy - 560) ** 2 + (xx - 380) ** 2 < 200 ** 2
    depth[ball] = 250 - np.sqrt((yy[ball] - 560) ** 2 + (xx[ball] - 380) ** 2) / 4
    depth[300:700, 650:900] = 150
    Image.fromarray(np.repeat(depth.astype(np.uint8)[..., None], 3, axis=2)).save(input_dir / EASYCONTROL_MAPS["depth"])
    points = ((512, 200), (512, 300), (420, 300), (380, 430), (360, 560), (604, 300), (650, 420), (700, 520),
              (450, 560), (440, 740), (430, 920), (574, 560), (590, 740), (600, 920), (490, 180), (534, 180),
              (470, 195), (554, 195))
    pose = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(pose)
    for (a, b), colour in zip(OPENPOSE_LIMBS, OPENPOSE_COLOURS):
        d.line([points[a], points[b]], fill=tuple(int(c * 0.6) for c in colour), width=12)
    for (x, y), colour in zip(points, OPENPOSE_COLOURS):
        d.ellipse([x - 8, y - 8, x + 8, y + 8], fill=colour)
    pose.save(input_dir / EASYCONTROL_MAPS["pose"])
    seg = Image.new("RGB", (size, size), ADE20K["sky"])
    d = ImageDraw.Draw(seg)
    d.rectangle([0, 600, size, size], fill=ADE20K["grass"])
    d.polygon([(380, size), (480, 600), (540, 600), (640, size)], fill=ADE20K["road"])
    d.rectangle([620, 250, 950, 600], fill=ADE20K["building"])
    d.ellipse([60, 250, 360, 560], fill=ADE20K["tree"])
    d.ellipse([420, 430, 480, 490], fill=ADE20K["person"])
    d.rectangle([425, 490, 475, 640], fill=ADE20K["person"])
    seg.save(input_dir / EASYCONTROL_MAPS["seg"])


def shard_t5(single: Path, folder: Path):
    """The same T5 weights as Hugging Face shards: two files + model.safetensors.index.json."""
    import safetensors.torch
    sd = safetensors.torch.load_file(str(single))
    names = sorted(sd)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        safetensors.torch.save_file({k: sd[k] for k in part}, str(folder / shard))
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                    indent=1))


# ---------------------------------------------------------------------------------------------
#                 EasyControl (issue 11): FLUX.1 for core's loaders + condition LoRAs
# ---------------------------------------------------------------------------------------------
# Core's Flux detection fixes mlp_ratio 4 and RoPE axes (16, 56, 56); 0.3.75 also fixes 24 heads. So the
# FLUX file core's UNETLoader accepts is 3072 wide (head width 128): full width, 1 double + 1 single block
# (~0.55 B parameters, 1.1 GB in bf16). The EasyControl LoRAs use the released naming for that block count.
EASYCONTROL_FLUX = dict(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1)
EASYCONTROL_LORA_RANK = 4
# the LoRA files the shipped workflows name, with their kind (read from the name by the loader node)
# the shipped graphs' LoRA names (the released files'); rank-4 random weights each
EASYCONTROL_LORAS = {"canny.safetensors": 21, "subject.safetensors": 22, "Ghibli.safetensors": 25,
                     "inpainting.safetensors": 26, "hedsketch.safetensors": 27, "depth.safetensors": 28,
                     "pose.safetensors": 29, "seg.safetensors": 30}
# the DualCLIPLoader widget values of the shipped workflows: tiny PLACEHOLDER files, never loaded by a
# test (the API tests swap DualCLIPLoader + CLIPTextEncode for tests/host_probe's conditioning stand-in);
# they exist only so that the frontend test's dropdown check finds the names the workflows use
FLUX_TEXT_ENCODER_NAMES = ("clip_l.safetensors", "t5xxl_fp16.safetensors")


def _random_like(shapes: dict, seed: int, dtype=torch.bfloat16, gain: float = 1.0) -> dict:
    """Seeded random weights: matrices ~ N(0, gain²/fan_in), norm scales 1, biases 0."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) == 1:
            sd[name] = (torch.ones(shape) if name.endswith("scale") or "norm" in name else torch.zeros(shape)).to(dtype)
        else:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            sd[name] = (torch.randn(shape, generator=gen) * (gain / fan_in ** 0.5)).to(dtype)
    return sd


def save_easycontrol_flux(path: Path, seed: int, schnell: bool = False):
    """FLUX.1-dev layout in ComfyUI/BFL native names (what `flux1-dev.safetensors` holds), full width,
    1 + 1 blocks, random bf16 weights; core's UNETLoader detects it as FLUX (dev: guidance_in present).
    schnell: the same weights without guidance_in, which is what tells core (and FLUX.1-schnell's file) apart."""
    import safetensors.torch

    from dit_control.kernels.flux_easycontrol.checkpoint import expected_shapes
    from dit_control.kernels.flux_easycontrol.model import FluxConfig
    sd = _random_like(expected_shapes(FluxConfig(**EASYCONTROL_FLUX)), seed, gain=0.5)
    if schnell:
        sd = {k: v for k, v in sd.items() if not k.startswith("guidance_in.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))


def save_easycontrol_lora(path: Path, seed: int, rank: int = EASYCONTROL_LORA_RANK, double_blocks=None,
                          single_blocks=None):
    """An EasyControl condition LoRA in the released names for EASYCONTROL_FLUX's block counts (or the
    ones given: 19 + 38 is the released FLUX.1-dev layout), bf16."""
    import safetensors.torch

    from dit_control.kernels.flux_easycontrol.lora import EasyControlLoRAConfig, expected_shapes
    cfg = EasyControlLoRAConfig(hidden_size=EASYCONTROL_FLUX["hidden_size"], rank=rank,
                                double_blocks=double_blocks or EASYCONTROL_FLUX["depth"],
                                single_blocks=single_blocks or EASYCONTROL_FLUX["depth_single_blocks"])
    sd = _random_like(expected_shapes(cfg), seed, gain=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))


def flux_vae_shapes() -> dict:
    """The FLUX.1 autoencoder (`ae.safetensors`): the kl-f8 architecture with 16 latent channels and no
    quant convs, ldm names — what core's VAELoader reads as the Flux VAE."""
    shapes = sd_vae_shapes()
    for name in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"):
        shapes.pop(name)
    cin = shapes["encoder.conv_out.weight"][1]
    shapes["encoder.conv_out.weight"], shapes["encoder.conv_out.bias"] = (32, cin, 3, 3), (32,)
    top = shapes["decoder.conv_in.weight"][0]
    shapes["decoder.conv_in.weight"] = (top, 16, 3, 3)
    return shapes


def save_random_flux_vae(path: Path, seed: int):
    """Full-size FLUX VAE with random weights (fp16 would overflow nothing here; bf16 like the release)."""
    import safetensors.torch
    sd = _random_like(flux_vae_shapes(), seed, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path))


def make_easycontrol_files(models_dir: Path):
    models_dir = Path(models_dir)
    save_easycontrol_flux(models_dir / "diffusion_models" / "flux1-dev.safetensors", seed=20)
    save_easycontrol_flux(models_dir / "diffusion_models" / "flux1-schnell.safetensors", seed=20, schnell=True)
    for name, seed in EASYCONTROL_LORAS.items():
        save_easycontrol_lora(models_dir / "loras" / name, seed=seed)
    save_random_flux_vae(models_dir / "vae" / "ae.safetensors", seed=23)
    import safetensors.torch
    te = models_dir / "text_encoders"
    te.mkdir(parents=True, exist_ok=True)
    placeholder = te / "clip_l.safetensors"
    if not placeholder.exists():
        safetensors.torch.save_file({"placeholder": torch.zeros(1)}, str(placeholder))
    # t5xxl_fp16.safetensors is already the tiny T5 (PixArt tests); the name is all the frontend checks


def write_easycontrol_bad_files(folder: Path, made: Path):
    """Wrong files for the LoRA loader: a plain FLUX LoRA (kohya names), a PixArt/SD file, a truncated LoRA."""
    import safetensors.torch
    folder.mkdir(parents=True, exist_ok=True)
    def z():
        return torch.zeros(4, 8)
    # a plain FLUX LoRA in kohya names that core's LoraLoaderModelOnly applies to the test FLUX (also the
    # composition test's core LoRA)
    gen = torch.Generator().manual_seed(25)
    d = EASYCONTROL_FLUX["hidden_size"]
    down = torch.randn(4, d, generator=gen) / d ** 0.5
    up = torch.randn(3 * d, 4, generator=gen) * 0.5
    safetensors.torch.save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
                                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                                 "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)},
                                str(folder / "flux_style_lora.safetensors"))
    safetensors.torch.save_file({"t_block.1.weight": z(), "blocks.0.attn.qkv.weight": z()},
                                str(folder / "pixart-like.safetensors"))
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": z(),
                                 "first_stage_model.decoder.conv_in.weight": z()},
                                str(folder / "sd15-like.safetensors"))
    good = (made / "loras" / "canny.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    # not broken: the released FLUX.1-dev layout (19 double + 38 single blocks) at rank 1 — it loads, and
    # applying it to the 1 + 1 block test FLUX is refused with the block counts
    save_easycontrol_lora(folder / "released_layout_rank1.safetensors", seed=24, rank=1, double_blocks=19,
                          single_blocks=38)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / ".comfy_host" / "models"
    print(make_all(target))
