"""Train the micro ControlAR on procedural scenes: pure torch on our kernels, CPU, resumable, seeded.

    python tests/training/train_controlar.py --out DIR             # train (resumes from DIR/controlar/ckpt.pt)
    python tests/training/train_controlar.py --out DIR --probe 10  # timing probe: 10 steps, nothing saved

One network, two released files (tests/training/README.md, "ControlAR micro"): a LlamaGen T2I GPT with ControlAR's
DINOv2-style control encoder at tiny size (width 128, 6 layers, control at 0, 2, 4; encoder 64 wide, 2 layers),
whose image tokens are the palette VQ's 10 colours (palette_vq.py: one token per 16×16 patch), its captions the
contextual tiny T5's (make_checkpoints.save_context_t5, the micro PixArt's), its control Canny maps. The two files
differ only in their token budget, the rows of `condition_mlp.uncond_embedding`, and so in the width of the 2-D
RoPE grid that image tokens are indexed on (LlamaGen's quirk: token j sits at cell (j // g, j % g)):

- controlar/canny_MR.safetensors, block 2304 (g = 48): trained at 384×256 (24×16 tokens, the scene drawn at 384
  and squeezed to 256 high: a non-square size), control resized `nearest` (control_type canny);
- controlar/hed.safetensors, block 1024 (g = 32): trained at 256×256 (16×16 tokens), control resized `bicubic`
  (control_type hed). Its control maps are Canny maps too: no HED weights can be had here (the embedded HED
  annotator is random), so the hed file follows edges, and its test feeds it our Canny node's map.

Steps alternate between the two (even: MR, odd: hed). Per row: the caption without its places for
`--without-places` of the rows (the layout must then come from the control), the null caption (the file's random
`cls_embedding.uncond_embedding`, as LlamaGen) for `--caption-dropout`, zero control (what strength 0 and the
CFG half give) for `--control-dropout`. Captions are T5-encoded at 48 tokens and left-padded as the node does; the
prefix is the last 48 of the 120 rows (the pads are masked and their RoPE rows are zero, so this is exactly the
120-row prefix). Loss: cross-entropy of every image token, teacher-forced.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dit_control.kernels.controlar.dinov2 import Dinov2Config
from dit_control.kernels.controlar.gpt import GPT, GPTConfig, rope_table_2d
from dit_control.kernels.controlar.sampling import SamplingSettings, generate
from dit_control.kernels.controlar.text import MAX_LENGTH, left_pad
from dit_control.tests.training.palette_vq import PALETTE, PATCH, VQ_CONFIG, decode_tokens
from dit_control.tests.training.train import ensure_t5, load_t5, progress, tokenize, tokenizer, write_loss_curves

MICRO_GPT = dict(dim=128, n_layer=6, n_head=2, ffn_hidden=384, vocab_size=VQ_CONFIG["codebook_size"],
                 cls_token_num=MAX_LENGTH, caption_dim=64)
MICRO_DINOV2 = dict(hidden_size=64, num_layers=2, num_heads=1, mlp_hidden=256, patch_size=14, num_positions=1370)
CAPTION_ROWS = 48              # the longest caption has 37 T5 tokens
# mode -> (file, block size, (width, height) trained, control resize)
MODES = {"mr": ("canny_MR.safetensors", 2304, (384, 256), "nearest"),
         "hed": ("hed.safetensors", 1024, (256, 256), "bicubic")}
EVAL_SCENES = 6
EVAL_SEED = 42


def gpt_config(block_size: int = 2304) -> GPTConfig:
    return GPTConfig(**MICRO_GPT, block_size=block_size, control=Dinov2Config(**MICRO_DINOV2))


# ---------------------------------------------------------------------------------------------
#                                            Data
# ---------------------------------------------------------------------------------------------

def draw(scene, width: int, height: int) -> np.ndarray:
    """HWC [0, 1]: the scene drawn at `width` px square, squeezed to `height` (area-averaged) when not square."""
    from dit_control.tests.training.scenes import render
    img = render(scene, width)
    return img if height == width else cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)


def tokens_np(img: np.ndarray) -> np.ndarray:
    """palette_vq.encode_tokens in numpy (per-scene torch calls are slow on a busy machine): [N] uint8, each
    16×16 patch's nearest palette colour to its mean."""
    h, w, _ = img.shape
    mean = img.reshape(h // PATCH, PATCH, w // PATCH, PATCH, 3).mean(axis=(1, 3))
    d = ((mean[:, :, None, :] - PALETTE.numpy()[None, None]) ** 2).sum(-1)
    return d.argmin(-1).reshape(-1).astype(np.uint8)


def plurality_tokens_np(img: np.ndarray) -> np.ndarray:
    """[N] uint8: each 16×16 patch's most common colour, every pixel read as its nearest palette colour. Unlike the
    VQ's encode (the nearest colour to the patch's mean) a patch across an edge takes one of the two colours it
    holds, never a third one its mean is nearer to (a red-yellow edge patch is orange there): training targets
    without such halo tokens (1 % of the tokens, in 55 % of the pictures), a colour the caption does not name that
    a sampled shape can start with and keep."""
    h, w, _ = img.shape
    pixel = ((img[:, :, None, :] - PALETTE.numpy()[None, None]) ** 2).sum(-1).argmin(-1)
    counts = np.eye(len(PALETTE), dtype=np.int32)[pixel].reshape(h // PATCH, PATCH, w // PATCH, PATCH, -1).sum((1, 3))
    return counts.argmax(-1).reshape(-1).astype(np.uint8)


TARGETS = {"mean": tokens_np, "plurality": plurality_tokens_np}


def build_dataset(out: Path, count: int, targets: str = "plurality") -> dict:
    """Scenes 0…count-1 (training_scene): per mode the tokens (`targets`: TARGETS) and packed Canny bits; caption
    ids both ways."""
    from dit_control.tests.training.scenes import edge_map, training_scene
    name = f"controlar_scenes_{count}.pt" if targets == "mean" else f"controlar_scenes_{count}_{targets}.pt"
    cache = out / "data" / name
    if cache.exists():
        return torch.load(cache, weights_only=True)
    data = {f"{m}_{k}": [] for m in MODES for k in ("tokens", "edges")}
    captions, unplaced = [], []
    t0 = time.time()
    for i in range(count):
        scene = training_scene(i)
        for mode, (_, _, (w, h), _) in MODES.items():
            img = draw(scene, w, h)
            data[f"{mode}_tokens"].append(TARGETS[targets](img))
            data[f"{mode}_edges"].append(np.packbits(edge_map(img) > 0.5))
        captions.append(scene.caption)
        unplaced.append(scene.caption_without_places)
        if (i + 1) % 500 == 0 or i + 1 == count:
            progress("data", i + 1, count, t0)
    data = {k: torch.from_numpy(np.stack(v)) for k, v in data.items()}
    tok = tokenizer()
    for key, caps in (("", captions), ("unplaced_", unplaced)):
        ids, mask = tokenize(tok, caps, CAPTION_ROWS)
        data[key + "ids"], data[key + "mask"] = ids.int(), mask.bool()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def control_image(bits: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Packed Canny bits [B, H·W/8] -> the sampler's control input [B, 3, H, W] in [−1, 1]."""
    edges = np.unpackbits(bits.numpy(), axis=1)[:, : width * height].reshape(-1, 1, height, width)
    return torch.from_numpy(edges).float().mul(2).sub(1).expand(-1, 3, -1, -1)


# ---------------------------------------------------------------------------------------------
#                                        Model pieces
# ---------------------------------------------------------------------------------------------

# the projections between the encoder and the GPT, and the caption's: initialised to keep their signal's scale
# (normal, std 1/√fan_in). At LlamaGen's 0.02 the four linears from the encoder to the condition layers shrink it
# ~1000× (0.02·√128 ≈ 0.23 each): a first run's control path had not moved after 200 steps (edge F1 the same at
# strength 1 and 0).
SCALE_KEEPING = ("adapter_mlp.", "condition_mlp.cap_proj.", "condition_layers.", "cls_embedding.cap_proj.")


def new_model(gen: torch.Generator) -> GPT:
    """LlamaGen's init (normal 0.02, output layer 0) for the GPT, scale-keeping projections (SCALE_KEEPING), torch's
    default for the encoder's layers; ControlAR zero-initialises the projection into the GPT (here the condition
    layers' second linear, so gradients still reach the rest)."""
    model = GPT(gpt_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("adapter.") and p.dim() > 1 and "embeddings" not in name:
                continue                                                # torch's default init
            if name.startswith(SCALE_KEEPING):
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
            elif p.dim() > 1 or "embeddings" in name or name.endswith(("cls_token", "mask_token")):
                p.normal_(0.0, 0.02, generator=gen)
            if name.endswith("lambda1"):
                p.fill_(0.1)
        model.output.weight.zero_()
        for layer in model.condition_layers:
            layer.fc2.weight.zero_()
        model.cls_embedding.uncond_embedding.copy_(
            torch.randn(model.cls_embedding.uncond_embedding.shape, generator=gen) / MICRO_GPT["caption_dim"] ** 0.5)
        model.condition_mlp.uncond_embedding.zero_()
    return model


class RopeGrids:
    """The RoPE tables of both files' grids: the one network is trained under either."""

    def __init__(self, model: GPT):
        cfg = model.cfg
        self.tables = {mode: rope_table_2d(int(round(block ** 0.5)), cfg.head_dim, cfg.cls_token_num, cfg.rope_base)
                       for mode, (_, block, _, _) in MODES.items()}

    def use(self, model: GPT, mode: str):
        model._rope = self.tables[mode]


def sequence_mask(caption_mask: torch.Tensor, image_len: int) -> torch.Tensor:
    """[B, 1, S, S] bool: causal, caption pad columns closed for every row, the diagonal open (as KVCache)."""
    b, t = caption_mask.shape
    s = t + image_len
    cols = torch.cat([caption_mask.bool(), torch.ones(b, image_len, dtype=torch.bool)], dim=1)
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool))[None] & cols[:, None, :]
    return (mask | torch.eye(s, dtype=torch.bool)[None])[:, None]


def token_weights(tokens: torch.Tensor, shape_weight: float, start_weight: float) -> torch.Tensor:
    """[B, N] loss weights of the target tokens: 1, plus `shape_weight` on a shape's tokens (not the picture's most
    common token, its background), plus `start_weight` on the first token in raster order of each other colour
    (a shape's first token). Which caption colour a shape takes is decided there, at ~1 % of the tokens: unweighted,
    binding colours to shapes is a sliver of the loss, and the first runs left it at chance when sampling."""
    background = tokens.mode(dim=1).values[:, None]
    shape = tokens != background
    first = F.one_hot(tokens, MICRO_GPT["vocab_size"]).cumsum(dim=1).gather(2, tokens[..., None])[..., 0] == 1
    start = shape & first
    return 1.0 + shape_weight * shape.float() + start_weight * start.float()


def teacher_forced_logits(model: GPT, caption: torch.Tensor, caption_mask: torch.Tensor, tokens: torch.Tensor,
                          control: torch.Tensor) -> torch.Tensor:
    """caption [B, L, C] left-padded (the last L of the 120 rows), tokens [B, N] (the inputs: targets shifted by
    one, possibly corrupted), control [3, B, N, dim] -> logits [B, N, vocab] of every image token given the ones
    before it."""
    cfg = model.cfg
    b, n = tokens.shape
    t = caption.shape[1]
    h = torch.cat([model.embed_prefix(caption), model.tok_embeddings(tokens[:, :-1])], dim=1)
    pos = torch.cat([torch.arange(cfg.cls_token_num - t, cfg.cls_token_num),
                     cfg.cls_token_num + torch.arange(n - 1)])
    logits = model.forward_hidden(h, pos, None, control, 1.0, mask=sequence_mask(caption_mask, n - 1))
    return logits[:, t - 1:]


# ---------------------------------------------------------------------------------------------
#                                      In-process evaluation
# ---------------------------------------------------------------------------------------------

def encode_prompts(t5, tok, prompts) -> tuple:
    """The node's conditioning: 120 rows, left-padded with zero pads, and its mask."""
    ids, mask = tokenize(tok, prompts, MAX_LENGTH)
    with torch.no_grad():
        emb = t5(ids, mask, dtype=torch.float32)
    return left_pad(emb, mask)


@torch.no_grad()
def evaluate(model: GPT, grids: RopeGrids, t5, tok, count: int = EVAL_SCENES, sizes: dict | None = None,
             first: int = 0) -> dict:
    """Held-out scenes through the sampler's own loop (KV cache, CFG 4 against the null caption and zero control,
    temperature 1, seeded): edge F1 of the output's Canny against the control at strength 1 and 0 (prompt: the
    caption without places), caption agreement of the strength-1 output (full caption, read at 256 px).
    sizes: mode -> (width, height) to draw at instead of the trained size (the scene drawn at that size)."""
    from dit_control.tests.training.metrics import caption_agreement, image_edge_f1
    from dit_control.tests.training.scenes import edge_map, heldout_scenes
    scenes = heldout_scenes()[first:first + count]
    caption, cmask = encode_prompts(t5, tok, [s.caption_without_places for s in scenes])
    out = {}
    for mode, (_, _, (w, h), resize) in MODES.items():
        if sizes is not None:
            if mode not in sizes:
                continue
            w, h = sizes[mode]
        grids.use(model, mode)
        imgs = [draw(s, w, h) for s in scenes]
        controls = [edge_map(i) for i in imgs]
        ctrl = torch.from_numpy(np.stack(controls))[:, None].mul(2).sub(1).expand(-1, 3, -1, -1)
        tokens = model.control_tokens(model.adapter_features(ctrl, resize))
        for strength in (1.0, 0.0):
            gen = torch.Generator().manual_seed(EVAL_SEED)
            s = SamplingSettings(cfg_scale=4.0, top_k=0, control_strength=strength)
            ids = generate(model, model.embed_prefix(caption), (w // 16) * (h // 16), s, gen, cmask, tokens)
            pics = decode_tokens(ids, h // 16, w // 16).permute(0, 2, 3, 1).numpy()
            out[f"{mode}_f1_s{strength:g}"] = float(np.mean([image_edge_f1(p, c) for p, c in zip(pics, controls)]))
            if strength == 1.0:
                sq = [cv2.resize(p, (256, 256), interpolation=cv2.INTER_AREA) for p in pics]
                out[f"{mode}_caption"] = float(np.mean([caption_agreement(p, sc.caption)
                                                        for p, sc in zip(sq, scenes)]))
    return {k: round(v, 3) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
#                                           Trainer
# ---------------------------------------------------------------------------------------------

def fp16_files(model: GPT, folder: Path) -> list:
    """The EMA network as both released files (fp16, flat .safetensors, no prefix)."""
    import safetensors.torch
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    files = []
    for name, block, _, _ in MODES.values():
        sd["condition_mlp.uncond_embedding"] = torch.zeros(block, MICRO_GPT["dim"], dtype=torch.float16)
        safetensors.torch.save_file(sd, str(folder / name))
        files.append(folder / name)
    return files


class Trainer:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.dir = self.out / "controlar"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.order = np.random.default_rng(args.seed)
        self.t5 = load_t5(ensure_t5(self.out))
        self.tok = tokenizer()
        self.data = build_dataset(self.out, args.scenes, args.targets)
        self.model = new_model(torch.Generator().manual_seed(args.seed + 1))
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.grids = RopeGrids(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
        self.step, self.rows, self.evals = 0, [], []

    def lr_at(self, step: int) -> float:
        warm = min(100, self.args.steps // 10 + 1)
        lr = self.args.lr * min(1.0, (step + 1) / warm)
        decay_from = int(self.args.steps * 0.6)
        if step >= decay_from:
            lr *= 1 - 0.9 * (step - decay_from) / max(self.args.steps - decay_from, 1)
        return lr

    def loss(self, mode: str) -> torch.Tensor:
        _, _, (w, h), resize = MODES[mode]
        d, a = self.data, self.args
        idx = torch.from_numpy(self.order.integers(0, len(d["ids"]), size=a.batch))
        n = len(idx)
        u = torch.rand(3, n, generator=self.gen)
        unplaced = (u[0] < a.without_places)[:, None]
        ids = torch.where(unplaced, d["unplaced_ids"][idx], d["ids"][idx]).long()
        mask = torch.where(unplaced, d["unplaced_mask"][idx], d["mask"][idx])
        with torch.no_grad():
            caption, cmask = left_pad(self.t5(ids, mask.long(), dtype=torch.float32), mask.long())
        null = self.model.cls_embedding.uncond_embedding[-caption.shape[1]:]
        caption = torch.where((u[1] < a.caption_dropout)[:, None, None], null[None], caption)
        keep = (u[2] >= a.control_dropout).float()[:, None, None]
        features = self.model.adapter_features(control_image(d[f"{mode}_edges"][idx], w, h), resize) * keep
        tokens = d[f"{mode}_tokens"][idx].long()
        # input corruption (LlamaGen drops 10 % of the token embeddings): a share of the input tokens replaced by
        # random ones, so the model cannot draw by copying its left neighbour alone (a first run at step 200 did:
        # right shapes teacher-forced, horizontal streaks sampled) and leans on the control and the caption
        flip = torch.rand(tokens.shape, generator=self.gen) < a.input_corruption
        inputs = torch.where(flip, torch.randint(0, MICRO_GPT["vocab_size"], tokens.shape, generator=self.gen), tokens)
        self.grids.use(self.model, mode)
        logits = teacher_forced_logits(self.model, caption, cmask, inputs, self.model.control_tokens(features))
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
        weights = token_weights(tokens, a.shape_weight, a.start_weight).reshape(-1)
        return (per_token * weights).sum() / weights.sum()

    def state(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "gen": self.gen.get_state(), "order": self.order.bit_generator.state,
                "torch": torch.get_rng_state(), "rows": self.rows, "evals": self.evals,
                "args": {k: v for k, v in vars(self.args).items() if k != "out"}}

    def save_ckpt(self):
        torch.save(self.state(), self.dir / "ckpt.pt.tmp")
        os.replace(self.dir / "ckpt.pt.tmp", self.dir / "ckpt.pt")
        if self.evals and self.evals[-1]["step"] == self.step:      # keep every evaluated EMA to pick from
            torch.save(self.ema.state_dict(), self.dir / f"ema_{self.step}.pt")

    def init_from(self, path: Path):
        """Start model and EMA from a released file (fp16; the committed run's weights): a continued run."""
        import safetensors.torch
        sd = {k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()}
        sd["condition_mlp.uncond_embedding"] = self.model.condition_mlp.uncond_embedding.detach().clone()
        self.model.load_state_dict(sd)
        self.ema.load_state_dict(sd)
        print(f"initialised from {path}", file=sys.stderr)

    def try_resume(self):
        path = self.dir / "ckpt.pt"
        if self.args.probe or not path.exists():
            if self.args.init_from:
                self.init_from(Path(self.args.init_from))
            return
        ck = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["opt"])
        self.gen.set_state(ck["gen"])
        self.order.bit_generator.state = ck["order"]
        torch.set_rng_state(ck["torch"])
        self.step, self.rows, self.evals = ck["step"], ck["rows"], ck["evals"]
        print(f"resumed at step {self.step} from {path}", file=sys.stderr)

    def write_curves(self):
        write_loss_curves(self.dir, self.rows)
        (self.dir / "evals.json").write_text(json.dumps(self.evals, indent=1))

    def run(self):
        a = self.args
        self.try_resume()
        steps = min(a.steps, self.step + a.probe) if a.probe else a.steps
        t_start, elapsed0 = time.time(), (self.rows[-1][4] if self.rows else 0.0)
        while self.step < steps:
            t0 = time.time()
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            self.model.train()
            loss = self.loss("mr" if self.step % 2 == 0 else "hed")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            decay = a.ema if a.init_from else min(a.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1 - decay)
            self.step += 1
            dt = time.time() - t0
            self.rows.append([self.step, float(loss), self.lr_at(self.step - 1), round(dt, 3),
                              round(elapsed0 + time.time() - t_start, 1)])
            progress("controlar", self.step, steps, t_start - elapsed0,
                     f"loss {np.mean([r[1] for r in self.rows[-20:]]):.4f} {dt:.2f}s/step")
            if a.probe:
                continue
            if self.step % a.eval_every == 0 or self.step == a.steps:
                te = time.time()
                metrics = evaluate(self.ema, self.grids, self.t5, self.tok, a.eval_scenes, first=a.eval_first)
                self.evals.append({"step": self.step, **metrics, "eval_s": round(time.time() - te, 1)})
                print(f"\nstep {self.step} eval {json.dumps(self.evals[-1])}", file=sys.stderr)
            if self.step % a.ckpt_every == 0 or self.step == a.steps:
                self.save_ckpt()
                self.write_curves()
        if a.probe:
            times = [r[3] for r in self.rows[1:]]
            print(json.dumps({"sec_per_step": round(float(np.median(times)), 3), "threads": torch.get_num_threads(),
                              "params": sum(p.numel() for p in self.model.parameters()),
                              "load_avg_1min": os.getloadavg()[0]}))
            return
        self.export(self.pick())

    def export(self, pick: int):
        """The EMA evaluated at step `pick` as the released files, with the run's record (report.json)."""
        a = self.args
        self.ema.load_state_dict(torch.load(self.dir / f"ema_{pick}.pt", weights_only=True))
        files = fp16_files(self.ema, self.out / "models" / "controlar")
        self.write_curves()
        info = {"steps": self.step, "picked_step": pick, "batch": a.batch, "lr": a.lr,
                "total_seconds": self.rows[-1][4], "sec_per_step_median": float(np.median([r[3] for r in self.rows])),
                "final_loss_mean_last_100": float(np.mean([r[1] for r in self.rows[-100:]])),
                "params": sum(p.numel() for p in self.model.parameters()),
                "evals": self.evals, "files": {f.name: f.stat().st_size for f in files}}
        (self.dir / "report.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))

    def pick(self) -> int:
        """The evaluated EMA with the best score: F1 at strength 1 minus F1 at 0, plus caption agreement, both
        modes (in-process, held-out scenes)."""
        def score(e):
            return sum(e[f"{m}_f1_s1"] - e[f"{m}_f1_s0"] + e[f"{m}_caption"] for m in MODES)
        return max((e for e in self.evals if (self.dir / f"ema_{e['step']}.pt").exists()), key=score)["step"]


def measure_sizes(out: Path, step: int, count: int = EVAL_SCENES):
    """In-process scores of one evaluated EMA at the trained and the shipped graphs' sizes (README's table)."""
    model = new_model(torch.Generator().manual_seed(0))
    model.load_state_dict(torch.load(out / "controlar" / f"ema_{step}.pt", weights_only=True))
    model.eval()
    t5, tok, grids = load_t5(ensure_t5(out)), tokenizer(), RopeGrids(model)
    for sizes in ({"mr": (384, 256), "hed": (256, 256)}, {"mr": (256, 256)}, {"mr": (512, 384), "hed": (512, 512)},
                  {"mr": (768, 512)}):
        t0 = time.time()
        print(json.dumps({"sizes": sizes, **evaluate(model, grids, t5, tok, count, sizes),
                          "seconds": round(time.time() - t0, 1)}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (checkpoint, curves, data cache, models/)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.98,
                   help="EMA decay (the committed run: 0.995 for its first 300 steps)")
    p.add_argument("--scenes", type=int, default=10000, help="training scenes (seeds 0…N-1), cached in OUT/data")
    p.add_argument("--targets", choices=tuple(TARGETS), default="plurality",
                   help="training tokens: each patch's most common colour, or the VQ's encode (runs 1-3: mean)")
    p.add_argument("--without-places", type=float, default=0.5)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--control-dropout", type=float, default=0.2)
    p.add_argument("--input-corruption", type=float, default=0.15,
                   help="share of input tokens replaced by random ones (the committed run: 0 for its first 300 steps)")
    p.add_argument("--shape-weight", type=float, default=0.0, help="extra loss weight on shape tokens")
    p.add_argument("--start-weight", type=float, default=0.0,
                   help="extra loss weight on each shape's first token (where its colour is chosen)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-scenes", type=int, default=EVAL_SCENES, help="held-out scenes per evaluation")
    p.add_argument("--eval-first", type=int, default=0, help="the first of them (held-out scene index)")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default="",
                   help="continue from a released file (model and EMA), e.g. weights/controlar/canny_MR.safetensors")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe", type=int, default=0, help="timing probe: run this many steps, save nothing")
    p.add_argument("--export", type=int, default=0,
                   help="write the released files from the EMA evaluated at this step (a run stopped early)")
    p.add_argument("--measure-sizes", type=int, default=0,
                   help="score the EMA saved at this step at several sizes (in-process), then stop")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.measure_sizes:
        return measure_sizes(Path(args.out), args.measure_sizes)
    trainer = Trainer(args)
    if args.export:
        trainer.try_resume()
        return trainer.export(args.export)
    trainer.run()


if __name__ == "__main__":
    main()
