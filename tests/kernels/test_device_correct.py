"""Device correctness of every kernel family, checked without a GPU (issue 25).

Users run the pack on NVIDIA GPUs; the rest of the suite runs on the CPU, where a tensor a kernel makes on the
CPU by mistake (an index, mask, position id, tile weight, permutation, int8 scale or noise tensor made without
`device=`) goes unnoticed. Two checks here:

- Meta device: each family's kernel runs its forward with the released configs (widths, heads, layouts; the
  full depth except FLUX and one T5, see there) and every weight and input on the `meta` device, inside
  `no_cpu_tensors()`. Meta tensors have shapes but no storage, so a full-size forward costs only its Python.
  Mixing a CPU tensor into a meta op does NOT always raise in torch (`test_meta_alone_misses_these_cpu_operands`
  lists what slips through: indexing and index_select with CPU indices, F.linear with a CPU weight, in-place ops
  with a CPU operand, einsum/bmm, which even return a CPU tensor, and 0-dim CPU tensors), so `no_cpu_tensors()`
  watches every aten op through a TorchDispatchMode and fails at the first one that makes a CPU tensor or is
  handed one, naming the op and the pack's source line.
- Half precision on the CPU: each family once in float16 and once in bfloat16 on the golden tests' tiny
  weights: the output has the documented dtype, is finite and stays near the same run in float32.

Deliberate CPU work, allowed where it happens and nowhere else: RelaCtrl draws its TDSM permutations from a CPU
torch.Generator (the same permutations on every device, and the reference's global-RNG stream; they are
uploaded once per draw); uploads of host tensors (`.to(device)`, `copy_`) are explicit and pass. Value reads
(`bool(t)`, `int(t)`: a host sync on a GPU) fail on meta unless a test answers them (`meta_reads=`), which two
do, where a kernel reads a count or an all-valid flag once per call.
"""
from __future__ import annotations

import contextlib
import functools
import json
import linecache
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dit_control
from dit_control.kernels import int8
from dit_control.kernels.checkpoint_io import read_state_dict
from dit_control.kernels.controlar.checkpoint import load_gpt_file, load_vq_file
from dit_control.kernels.controlar.dinov2 import Dinov2Config
from dit_control.kernels.controlar.gpt import GPT, GPTConfig
from dit_control.kernels.controlar.pipeline import text_to_image
from dit_control.kernels.controlar.sampling import SamplingSettings, generate
from dit_control.kernels.controlar.text import encode_caption
from dit_control.kernels.controlar.vq import VQConfig, VQModel
from dit_control.kernels.dit4sr.checkpoint import load_dit4sr_file
from dit_control.kernels.dit4sr.model import DiT4SR, DiT4SRConfig
from dit_control.kernels.dit4sr.tiled_encode import tiled_encode
from dit_control.kernels.dit4sr.tiling import TileSettings, tile_layout
from dit_control.kernels.flux_easycontrol.checkpoint import load_flux
from dit_control.kernels.flux_easycontrol.condition import Condition, EasyControl
from dit_control.kernels.flux_easycontrol.lora import EasyControlLoRA, EasyControlLoRAConfig, load_lora
from dit_control.kernels.flux_easycontrol.model import Flux, FluxConfig
from dit_control.kernels.hed import HEDNetwork, hed_edges
from dit_control.kernels.int8 import Int8Linear, int8_ops, quantize_model_linears
from dit_control.kernels.pixart.control_file import load_bundled_base
from dit_control.kernels.pixart.controlnet import (
    PixArtControlNet,
    block_config,
    combine_controls,
    load_pixart_controlnet,
    prepare_pixart_controlnet,
)
from dit_control.kernels.pixart.model import PixArt, pixart_xl2_1024_ms
from dit_control.kernels.pixart.relactrl import RelaCtrl, RelaCtrlConfig, load_relactrl, prepare_relactrl
from dit_control.kernels.t5 import T5Config, T5Encoder
from dit_control.kernels.tiled_decode import tiled_decode
from dit_control.tests.kernels.golden_data import golden_config, golden_io, one_intra_op_thread, relative_error

META = torch.device("meta")
HALF_DTYPES = [torch.float16, torch.bfloat16]
PACK = Path(dit_control.__file__).resolve().parent
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
#                                  The check: no_cpu_tensors()
# ---------------------------------------------------------------------------------------------

# Explicit uploads: a host tensor copied to the device on purpose (its source may be on the CPU, the copy not).
UPLOADS = {aten._to_copy.default, aten.copy_.default}
# Reads of a tensor's values into Python (bool(t), int(t), t.item(), torch.equal): on meta there are none.
DATA_READS = {aten._local_scalar_dense.default, aten.equal.default}


class CpuTensorError(AssertionError):
    pass


TORCH = Path(torch.__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _resolved(filename: str) -> Path:
    # the venv imports the pack through a link (.venv/pack/dit_control): compare real paths
    return Path(filename).resolve()


def _source_line() -> str:
    """Where the op came from: the innermost line of the pack's own code (kernels/, nodes/) on the Python stack,
    else the innermost line outside torch."""
    frame, found = sys._getframe(2), None
    while frame is not None:
        path = _resolved(frame.f_code.co_filename)
        if path.is_relative_to(PACK) and path.parts[len(PACK.parts)] in ("kernels", "nodes"):
            found = frame
            break
        if found is None and not path.is_relative_to(TORCH):
            found = frame
        frame = frame.f_back
    if found is None:
        return "(no line outside torch)"
    path = _resolved(found.f_code.co_filename)
    name = path.relative_to(PACK) if path.is_relative_to(PACK) else path
    source = linecache.getline(str(path), found.f_lineno).strip()
    return f"{name}:{found.f_lineno} in {found.f_code.co_name}: {source}"


class _NoCpuTensors(TorchDispatchMode):
    def __init__(self, allow: tuple, meta_reads):
        super().__init__()
        self.allow = set(allow)
        self.meta_reads = meta_reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in DATA_READS and any(t.is_meta for t in tensors):
            if self.meta_reads is None:
                raise CpuTensorError(f"{func} reads a meta tensor's values into Python (a host sync on a GPU) at "
                                     f"{_source_line()}; meta tensors hold none: pass meta_reads= to answer it")
            return self.meta_reads
        if func not in UPLOADS and func not in self.allow:
            cpu = [tuple(t.shape) for t in tensors if t.device.type == "cpu"]
            others = sorted({str(t.device) for t in tensors if t.device.type != "cpu"})
            if cpu and others:
                raise CpuTensorError(f"{func} was handed CPU tensor(s) of shape {cpu} next to {', '.join(others)} "
                                     f"ones at {_source_line()}")
        out = func(*args, **kwargs)
        if func not in self.allow:
            made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            cpu = [tuple(t.shape) for t in made if t.device.type == "cpu"]
            if cpu:
                raise CpuTensorError(f"{func} made CPU tensor(s) of shape {cpu} at {_source_line()}")
        return out


@contextlib.contextmanager
def no_cpu_tensors(allow: tuple = (), meta_reads=None):
    """Fail at the first aten op inside that makes a CPU tensor or is handed one next to tensors elsewhere
    (explicit uploads excepted), naming the op and the pack's source line. `allow`: ops whose CPU tensors are
    deliberate (say why where it is used). `meta_reads`: the answer to a value read of a meta tensor (bool(t),
    t.item(), torch.equal), for a kernel that branches on data; None fails such a read."""
    with torch.no_grad(), _NoCpuTensors(allow, meta_reads):
        yield


def meta_tensor(*shape, dtype=torch.float32):
    """An input on the meta device: a shape and a dtype, no values."""
    return torch.empty(*shape, dtype=dtype, device=META)


def assert_on_meta(out: torch.Tensor, shape: tuple, dtype=torch.float32):
    assert (out.device, tuple(out.shape), out.dtype) == (META, shape, dtype), \
        f"expected a meta tensor {shape} {dtype}, got {out.device} {tuple(out.shape)} {out.dtype}"


# ---------------------------------------------------------------------------------------------
#                               What meta alone lets through
# ---------------------------------------------------------------------------------------------

# CPU operands made outside the check, so that the op mixing them in is the one named
_m, _c = meta_tensor(4, 6), torch.randn(4, 6)
_index, _mask, _scalar = torch.tensor([0, 2]), torch.tensor([True, False, True, False]), torch.tensor(2.0)
_c3 = torch.randn(1, 6, 4)
_meta_index = torch.zeros(2, dtype=torch.long, device=META)
# op kinds where torch 2.14 accepts a CPU operand next to meta tensors without a word: {kind: (op named, run)}
SILENT_MIXES = {
    "index with CPU indices": ("aten.index.Tensor", lambda: _m[_index]),
    "index with a CPU bool mask": ("aten.index.Tensor", lambda: _m[_mask]),
    "index_select with a CPU index": ("aten.index_select", lambda: _m.index_select(1, _index)),
    "index_put_ with a CPU index": ("aten.index_put_", lambda: _m.clone().index_put_((_index,), _m[:1])),
    "F.linear with a CPU weight": ("aten.t.default", lambda: F.linear(_m, _c)),
    "in-place mul_ by a CPU tensor": ("aten.mul_.Tensor", lambda: _m.clone().mul_(_c)),
    "0-dim CPU tensor operand": ("aten.mul.Tensor", lambda: _m * _scalar),
    "einsum (returns a CPU tensor)": ("aten.permute", lambda: torch.einsum("ab,ab->a", _m, _c)),
    "bmm (returns a CPU tensor)": ("aten.bmm", lambda: torch.bmm(_m[None], _c3)),
    "embedding of a CPU table (returns CPU)": ("aten.embedding", lambda: F.embedding(_meta_index, _c)),
    "a CPU tensor made and never mixed": ("aten.arange", lambda: torch.arange(3)),
}
# op kinds where torch raises on its own (its message names no line; the check's does, and comes first)
RAISING_MIXES = {
    "elementwise add": lambda: _m + _c,
    "cat": lambda: torch.cat([_m, _c]),
    "addcmul": lambda: torch.addcmul(_m, _c, _m),
    "SDPA with a CPU mask": lambda: F.scaled_dot_product_attention(_m[None, None], _m[None, None], _m[None, None],
                                                                   attn_mask=_mask[:, None] & _mask[None]),
    "index_copy_ with a CPU index": lambda: torch.empty_like(_m).index_copy_(0, _index, _m[:2]),
}


def _slug(kind: str) -> str:
    return re.sub(r"\W+", "_", kind).strip("_")


@pytest.mark.parametrize("kind", sorted(SILENT_MIXES), ids=_slug)
def test_meta_alone_misses_these_cpu_operands(kind):
    """Each op kind runs on meta with a CPU operand and no error (why the dispatch-mode check exists: if torch
    starts refusing one, this test says the list is out of date); inside no_cpu_tensors() it fails, naming it."""
    op, run = SILENT_MIXES[kind]
    run()
    with pytest.raises(CpuTensorError, match=re.escape(op)):
        with no_cpu_tensors():
            run()


@pytest.mark.parametrize("kind", sorted(RAISING_MIXES), ids=_slug)
def test_meta_raises_on_its_own_for_these(kind):
    with pytest.raises(RuntimeError, match="device"):
        RAISING_MIXES[kind]()
    with pytest.raises(CpuTensorError, match="CPU tensor"):
        with no_cpu_tensors():
            RAISING_MIXES[kind]()


def test_value_reads_of_meta_tensors_are_named_or_answered():
    flag = meta_tensor(3) > 0
    with pytest.raises(CpuTensorError, match="_local_scalar_dense"):
        with no_cpu_tensors():
            bool(flag.all())
    with no_cpu_tensors(meta_reads=False):
        assert bool(flag.all()) is False and int(flag.sum()) == 0


def test_uploads_and_allowed_ops_pass():
    host = torch.arange(4)
    with no_cpu_tensors():
        assert host.to(META).device == META
        meta_tensor(4).copy_(host)
    with no_cpu_tensors(allow=(aten.randperm.generator,)):
        assert torch.randperm(5, generator=torch.Generator()).to(META).device == META


# ---------------------------------------------------------------------------------------------
#                             Meta device, the released configs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relactrl_widths(shared):
    """The release's expert widths per RGLC block (G = 6, 2, 6, 4, ... experts of D/G)."""
    manifest = json.loads((shared / "manifests/pixart/relactrl_pixart_1024_controlnet_only.json").read_text())
    return tuple(tuple(w) for w in manifest["expert_hidden_sizes"])


def test_pixart_controlnet_relactrl_on_meta(relactrl_widths):
    """PixArt-XL-2-1024-MS with the 13-block ControlNet-Transformer, RelaCtrl's 11 RGLC blocks, and both at once.
    No img_hw / aspect_ratio: the kernel makes the micro-conditions itself."""
    base = PixArt(pixart_xl2_1024_ms(), device=META).eval()
    controlnet = PixArtControlNet(13, block_config(1152, 16), device=META).eval()
    relactrl = RelaCtrl(RelaCtrlConfig(hidden_size=1152, expert_widths=relactrl_widths), device=META).eval()
    x, latent = meta_tensor(2, 4, 16, 24), meta_tensor(1, 4, 16, 24)
    t, caption, mask = meta_tensor(2), meta_tensor(2, 1, 120, 4096), meta_tensor(2, 120, dtype=torch.long)
    # embed_conditions asks bool(mask.all()) to stay on the unmasked attention when every caption token is
    # valid; answering False takes the masked path, so the mask's device is checked too
    with no_cpu_tensors(meta_reads=False):
        assert_on_meta(base(x, t, caption, mask), (2, 8, 16, 24))
        assert_on_meta(base(x, t, caption, mask, control=controlnet.branch(latent, strength=0.7)), (2, 8, 16, 24))
    # RelaCtrl's permutations come from a CPU generator on purpose (see the module docstring)
    with no_cpu_tensors(allow=(aten.randperm.generator,), meta_reads=False):
        both = combine_controls(controlnet.branch(latent), relactrl.branch(latent, strength=0.8, seed=3, step=1))
        assert_on_meta(base(x, t, caption, mask, control=both), (2, 8, 16, 24))


# FLUX.1-dev's widths, heads and RoPE axes, and the LoRAs' rank 128, with 2 + 3 of its 19 + 38 blocks: every block
# of a kind runs the same code, and on meta a forward costs per op (57 blocks: ~4 s a forward here)
FLUX_META = FluxConfig(depth=2, depth_single_blocks=3)
LORA_META = EasyControlLoRAConfig(double_blocks=2, single_blocks=3)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_flux_easycontrol_on_meta(cache):
    """FLUX.1-dev with a spatial and a subject EasyControl condition: the KV bank filled and read (cached) or
    EasyControl's joint masked attention (uncached); an odd latent side pads."""
    flux = Flux(FLUX_META, device=META).eval()
    loras = [EasyControlLoRA(LORA_META, device=META) for _ in range(2)]
    conditions = EasyControl([Condition(meta_tensor(1, 16, 8, 8), loras[0], 1.0, "spatial"),
                              Condition(meta_tensor(1, 16, 8, 12), loras[1], 0.8, "subject")], cache=cache)
    x = meta_tensor(2, 16, 12, 15)
    args = (meta_tensor(2), meta_tensor(2, 7, 4096), meta_tensor(2, 768), meta_tensor(2))
    with no_cpu_tensors():
        assert_on_meta(flux(x, *args), (2, 16, 12, 15))
        assert_on_meta(flux(x, *args, conditions=conditions, condition_key=("cfg", (0, 1))), (2, 16, 12, 15))
    assert conditions.bank.builds == (1 if cache else 0)


def test_dit4sr_tiled_on_meta():
    """The released DiT4SR (SD3.5-medium MMDiT + LR stream) on a latent of 3 x 2 tiles, and the LR image's tiled
    VAE encode of DiT4SR Conditioning."""
    model = DiT4SR(DiT4SRConfig(), device=META).eval()
    tiles = TileSettings(tile=16, overlap=4, memory_budget=None)
    assert tile_layout(40, 24, tiles).count == 6
    x = meta_tensor(1, 16, 40, 24)
    with no_cpu_tensors():
        out = model(x, meta_tensor(1), meta_tensor(1, 9, 4096), meta_tensor(1, 2048), meta_tensor(1, 16, 40, 24),
                    tiles=tiles)
        assert_on_meta(out, (1, 16, 40, 24))
        encode = lambda image: F.avg_pool2d(image.movedim(-1, 1), 8).repeat(1, 6, 1, 1)[:, :16]   # noqa: E731
        assert_on_meta(tiled_encode(meta_tensor(1, 320, 192, 3), encode, tile=128), (1, 16, 40, 24))


def test_controlar_on_meta():
    """ControlAR T2I GPT-XL with its DINOv2-S control encoder through the nodes' one call (text_to_image): control
    tokens, prefill and three decode steps with CFG, top-k and top-p, the VQ-16 decode; and the caption rule on
    a FLAN-T5-XL-wide encoder (2 of its 24 blocks: the T5 test runs a full-depth encoder)."""
    gpt = GPT(GPTConfig(control=Dinov2Config()), device=META).eval()
    vq = VQModel(VQConfig(), device=META).eval()
    flan = T5Encoder(T5Config(vocab_size=32128, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=2),
                     device=META).eval()
    ids, mask = meta_tensor(1, 120, dtype=torch.long), meta_tensor(1, 120, dtype=torch.long)
    # left_pad reads each caption's token count (int(mask.sum())): answered 0, a whole caption of pads
    with no_cpu_tensors(meta_reads=0):
        caption, caption_mask = encode_caption(flan, ids, mask)
    assert_on_meta(caption, (1, 120, 2048))
    settings = SamplingSettings(top_k=100, top_p=0.9, control_strength=0.6)
    with no_cpu_tensors():
        tokens, image = text_to_image(gpt, vq, caption, caption_mask, meta_tensor(1, 3, 32, 32), "hed", settings,
                                      generator=None)
    assert_on_meta(tokens, (1, 4), torch.long)
    assert_on_meta(image, (1, 3, 32, 32))


def test_t5_on_meta():
    encoder = T5Encoder(T5Config.xxl(), device=META).eval()
    ids, mask = meta_tensor(2, 20, dtype=torch.long), meta_tensor(2, 20, dtype=torch.long)
    with no_cpu_tensors():
        assert_on_meta(encoder(ids, mask), (2, 20, 4096))
        assert_on_meta(encoder(ids, mask, dtype=torch.bfloat16), (2, 20, 4096), torch.bfloat16)


def test_hed_on_meta():
    with torch.device(META):
        net = HEDNetwork()
    with no_cpu_tensors():
        assert_on_meta(hed_edges(net, meta_tensor(1, 3, 32, 48)), (1, 1, 32, 48))


def test_tiled_decode_on_meta():
    latent = meta_tensor(1, 4, 40, 24)
    decode = lambda z: F.interpolate(z[:, :3], scale_factor=8.0)   # noqa: E731
    with no_cpu_tensors():
        assert_on_meta(tiled_decode(latent, decode, tile=16, overlap=4), (1, 3, 320, 192))


def test_int8_layers_on_meta():
    """Int8Linear's default route on a non-CPU device (dequant), the int8 GEMM route's maths (CUDA's pick),
    a float layer quantised in place, and a model built from the int8 `operations`."""
    layer = Int8Linear(64, 96, device=META)
    x = meta_tensor(2, 24, 64)
    assert layer.route_for(x) == "dequant"
    float_model = nn.Sequential(nn.Linear(64, 64, device=META), nn.GELU(), nn.Linear(64, 8, device=META))
    with no_cpu_tensors():
        assert_on_meta(layer(x), (2, 24, 96))
        assert_on_meta(int8._int8_mm_linear(x.reshape(-1, 64), layer.weight, layer.weight_scale, layer.bias),
                       (48, 96))
        assert quantize_model_linears(float_model) == ["0", "2"]
        assert_on_meta(float_model(x), (2, 24, 8))
        pixart = PixArt(pixart_xl2_1024_ms(depth=2), operations=int8_ops(), device=META).eval()
        assert_on_meta(pixart(meta_tensor(1, 4, 8, 8), meta_tensor(1), meta_tensor(1, 120, 4096)), (1, 8, 8, 8))


# ---------------------------------------------------------------------------------------------
#                     float16 / bfloat16 on the CPU, the golden tests' tiny weights
# ---------------------------------------------------------------------------------------------
#
# Every op these kernels use runs in float16 and bfloat16 on the CPU in torch 2.14 (conv2d incl. depthwise,
# nearest / bilinear / bicubic interpolate, group / layer / rms norm, SDPA with bool and float masks, pooling,
# circular / replicate pad, topk, sort, cumsum, multinomial, bmm, einsum, embedding, pixel_shuffle): no kernel
# needs an upcast for the CPU's sake. The float32 islands that exist are for accuracy and cast back (RMSNorm
# statistics, RoPE, the positional tables and sinusoids, VQ's nearest upsample as the reference does it, int8
# dequantisation on CPUs without a native half GEMM); three outputs are float32 by contract (ControlAR's
# logits, HED's edges, tiled decode's image).
#
# Each run is compared with the same kernel in float32 (max |half − fp32| / max |fp32|): a path that leaks a
# wrong cast or overflows fails here even when its output stays finite. The bound is about ten units of the
# dtype's rounding (eps 9.8e-4 / 7.8e-3); measured at most 5.2e-3 in float16 (int8 qlinear, whose 7-bit
# activations see the rounded input) and 4.4e-2 in bfloat16 (the VQ-16 decoder's stack of convolutions).
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 8e-2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_intra_op_thread():
        yield


def assert_half_run(run, dtype: torch.dtype, what: str, out_dtype=None):
    """run(dtype) -> output: in `dtype` (or the documented `out_dtype`), finite, and near run(torch.float32)."""
    with torch.no_grad():
        ours, reference = run(dtype), run(torch.float32)
    want = out_dtype or dtype
    assert ours.dtype == want, f"{what}: expected a {want} output in {dtype}, got {ours.dtype}"
    bad = (~torch.isfinite(ours)).sum().item()
    assert bad == 0, f"{what}: {bad} of {ours.numel()} values are NaN/Inf in {dtype}"
    error = relative_error(ours, reference)
    assert error <= HALF_TOLERANCE[dtype], f"{what}: {dtype} is {error:.2e} from float32 (max |diff| / max |fp32|), " \
                                           f"more than {HALF_TOLERANCE[dtype]:.0e}"


def _pixart_golden(shared, folder: str, prepare, load_control, dtype):
    """(base, control branch, golden io) from a golden's full original file (bundled base + control)."""
    folder = shared / "golden" / folder
    cfg = golden_config(folder)["config_original"]
    control_sd, base_sd, info = prepare(read_state_dict(str(folder / "weights_orig.safetensors")),
                                        num_heads=cfg["num_heads"], sample_size=cfg["input_size"],
                                        pe_interpolation=cfg["lewei_scale"])
    base = load_bundled_base(base_sd, info, dtype=dtype).eval()
    return base, load_control(control_sd, base.config, dtype=dtype, info=info).eval(), golden_io(folder)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_pixart_controlnet_half(shared, dtype):
    def run(dt):
        base, controlnet, io = _pixart_golden(shared, "pixart_controlnet", prepare_pixart_controlnet,
                                              load_pixart_controlnet, dt)
        return base(io["x"].to(dt), io["t"], io["y"].to(dt), io["mask"], img_hw=io["img_hw"],
                    aspect_ratio=io["aspect_ratio"], control=controlnet.branch(io["c"].to(dt), strength=0.7))
    assert_half_run(run, dtype, "PixArt + ControlNet-Transformer")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_relactrl_half(shared, dtype):
    def run(dt):
        base, relactrl, io = _pixart_golden(shared, "relactrl", prepare_relactrl, load_relactrl, dt)
        return base(io["x"].to(dt), io["t"], io["y"].to(dt), io["mask"], img_hw=io["img_hw"],
                    aspect_ratio=io["aspect_ratio"], control=relactrl.branch(io["c"].to(dt), seed=1))
    assert_half_run(run, dtype, "PixArt + RelaCtrl")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_flux_easycontrol_half(shared, dtype, cache):
    """The golden's multi-condition case: subject x0.8 and spatial x1.25."""
    folder = shared / "golden/easycontrol"
    io, weights = golden_io(folder), golden_config(folder)["scalars"]["lora_weights"]["multi"]

    def run(dt):
        flux = load_flux(read_state_dict(str(folder / "flux_tiny_comfy.safetensors")), dtype=dt).eval()
        lora = {k: load_lora(read_state_dict(str(folder / f"lora_{k}.safetensors")), dtype=dt)
                for k in ("subject", "spatial")}
        conditions = EasyControl([Condition(io["subject_cond"].to(dt), lora["subject"], weights[0][0], "subject"),
                                  Condition(io["spatial_cond"].to(dt), lora["spatial"], weights[1][0], "spatial")],
                                 cache=cache)
        return flux(io["noise"].to(dt), io["sigmas"][:1], io["txt"].to(dt), io["pooled"].to(dt), io["guidance"],
                    conditions=conditions)
    assert_half_run(run, dtype, f"FLUX + EasyControl ({'cached' if cache else 'uncached'})")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_dit4sr_tiled_half(shared, dtype):
    io = golden_io(shared / "golden/dit4sr")
    tiles = TileSettings(tile=8, overlap=2)
    assert tile_layout(16, 16, tiles).count == 9

    def run(dt):
        model, _ = load_dit4sr_file(str(shared / "golden/dit4sr/transformer"), dtype=dt)
        return model.eval()(io["latent"].to(dt), io["timestep"], io["encoder_hidden_states"].to(dt),
                            io["pooled_projections"].to(dt), io["lr_latent"].to(dt), tiles=tiles)
    assert_half_run(run, dtype, "DiT4SR (tiled)")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("part", ["control_tokens", "prefill_logits", "vq_image"])
def test_controlar_half(shared, dtype, part):
    folder = shared / "golden/controlar"
    config, io = golden_config(folder), golden_io(folder)

    def run(dt):
        if part == "vq_image":
            return load_vq_file(str(folder / "vq.safetensors"), dtype=dt)[0].decode_code(io["vq_tokens"], 4, 4)
        gpt, _ = load_gpt_file(str(folder / "weights.safetensors"), dtype=dt, n_head=config["gpt"]["n_head"],
                               adapter_heads=config["dinov2_config"]["num_attention_heads"])
        control = gpt.control_tokens(gpt.adapter_features(io["control_image"], "bicubic"))
        if part == "control_tokens":
            return control
        logits = gpt.prefill(gpt.embed_prefix(io["caption_emb"]), gpt.new_cache(1, 16, io["emb_mask"]), control)
        # a few sampled tokens through the KV cache in this dtype: ids within the vocabulary
        tokens = generate(gpt, gpt.embed_prefix(io["caption_emb"]), 16, SamplingSettings(top_k=32, top_p=0.9),
                          torch.Generator().manual_seed(0), io["emb_mask"], control)
        assert tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < gpt.cfg.vocab_size
        return logits
    # logits are float32 by contract (forward_hidden ends in .float(): the sampler's softmax and top-p sums)
    assert_half_run(run, dtype, f"ControlAR {part}", torch.float32 if part == "prefill_logits" else None)


TINY_T5 = T5Config(vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_t5_half(dtype):
    torch.manual_seed(0)
    encoder = T5Encoder(TINY_T5).eval()
    ids = torch.randint(0, TINY_T5.vocab_size, (2, 140), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 140, dtype=torch.long)
    mask[1, 57:] = 0                                   # a right-padded caption: the finfo.min padding bias
    assert_half_run(lambda dt: encoder.to(dt)(ids, mask), dtype, "T5 encoder")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_hed_half(dtype):
    torch.manual_seed(0)
    net = HEDNetwork().eval()
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    # hed_edges returns float32 whatever the network computes in (its documented output)
    assert_half_run(lambda dt: hed_edges(net.to(dt), image), dtype, "HED edges", torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_tiled_decode_half(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3 * 64, 1)
    latent = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(0))

    def run(dt):
        decoder = conv.to(dt)
        return tiled_decode(latent.to(dt), lambda z: F.pixel_shuffle(decoder(z), 8), tile=16, overlap=4)
    # the blend is float32 by contract (kernels/tiled_decode.py: "The result is float32")
    assert_half_run(run, dtype, "tiled decode", torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("route", int8.available_routes("cpu"))
def test_int8_layers_half(dtype, route):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 96), route=route)
    x = torch.randn(3, 24, 64)                        # 72 rows: int8_mm's shape limits are met
    assert layer.route_for(x.to(dtype)) == route
    assert_half_run(lambda dt: layer(x.to(dt)), dtype, f"Int8Linear ({route})")
