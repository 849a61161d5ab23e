"""Reading checkpoint files and strict key checking, shared by every model family.

Errors here say what was expected and what was found, so that a node can show them as they are.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import torch


class CheckpointError(ValueError):
    """A file that is not the checkpoint a loader expects, or is damaged."""


class PreparedCheckpoint(NamedTuple):
    """What a family's `prepare_*` hands its loader: the weights checked against the config read from them."""
    state_dict: dict     # in the family's own names (converted from the file's layout), checked strictly
    config: Any          # the family's config dataclass, inferred from the shapes (PixArtConfig, FluxConfig)
    layout: str          # the layout the file came in ("original", "native", "diffusers", ...)


@contextlib.contextmanager
def naming_file(name: str):
    """The one way a loader names its file in errors: a CheckpointError raised inside gets `name: ` in front
    (unless it already begins with the name, as read_state_dict's own errors do)."""
    try:
        yield
    except CheckpointError as e:
        if str(e).startswith(name):
            raise
        raise CheckpointError(f"{name}: {e}") from None


class DamagedWeightsError(CheckpointError):
    """A checkpoint whose floating tensors hold NaN or Inf: it would sample black images."""


# -- damaged weights: NaN / Inf found while reading ---------------------------------------------------
#
# Every reader below checks each floating tensor as it reads it, so every loader of every family gets
# the check. The fast test is one sum per tensor in its own dtype (NaN and Inf propagate through a
# sum; ~0.4 ns per value, 2 s for T5-XXL): only when a sum is not finite — damage, or a legitimate
# overflow of a low-precision sum — are the values counted exactly.

_COUNT_CHUNK = 1 << 24


def nonfinite_counts(t: torch.Tensor) -> tuple:
    """(NaN count, Inf count) of a tensor; (0, 0) for integer tensors."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0, 0
    wide = t.dtype.itemsize == 1   # fp8: no native sum / isnan kernels on every device; widen to fp16
    total = t.sum(dtype=torch.float32) if wide else t.sum()
    if bool(torch.isfinite(total)):
        return 0, 0
    nan = inf = 0
    for chunk in t.reshape(-1).split(_COUNT_CHUNK):
        chunk = chunk.to(torch.float16) if wide else chunk
        nan += int(torch.isnan(chunk).sum())
        inf += int(torch.isinf(chunk).sum())
    return nan, inf


def _damage_note(key: str, t: torch.Tensor, nan: int, inf: int) -> str:
    return f"{key} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}: {nan} NaN, {inf} Inf of {t.numel()} values"


def check_finite(tensors: Mapping[str, torch.Tensor], name: str, stopped_early: bool = False) -> None:
    """Raise DamagedWeightsError naming every tensor of `tensors` with NaN or Inf values."""
    damaged = []
    for key, t in tensors.items():
        nan, inf = nonfinite_counts(t)
        if nan or inf:
            damaged.append(_damage_note(key, t, nan, inf))
    if damaged:
        more = " (reading stopped at this tensor)" if stopped_early else ""
        raise DamagedWeightsError(
            f"{name} is damaged: {len(damaged)} tensor(s) hold NaN/Inf values{more}; a model with such weights "
            f"samples black images. Download or copy the file again.\n" + "\n".join(damaged[:40])
            + (f"\n… ({len(damaged) - 40} more)" if len(damaged) > 40 else ""))


WRAPPER_KEYS = ("state_dict", "model", "module", "ema")


def read_state_dict(path: str) -> dict:
    """A state dict from .safetensors, .pth/.pt/.bin/.ckpt, or a diffusers / HF folder."""
    if os.path.isdir(path):
        return _read_folder(path)
    if _shard_index(path) is not None:
        # one shard picked from a dropdown: the index json beside it lists the whole checkpoint
        return _read_folder(os.path.dirname(path))
    return _read_file(path)


def _read_file(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size == 0:
        raise CheckpointError(f"{name} is empty (0 bytes): the download or copy did not finish")
    if path.endswith(".safetensors"):
        import safetensors.torch
        try:
            sd = safetensors.torch.load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own types for truncated headers/bodies
            raise CheckpointError(f"{name} ({size} bytes) is not a readable safetensors file; it may be "
                                  f"truncated or damaged: {type(e).__name__}: {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{name} ({size} bytes) is not a readable PyTorch checkpoint (loaded with "
                                  f"weights_only=True); it may be truncated, damaged or pickle-only: "
                                  f"{type(e).__name__}: {str(e)[:300]}") from None
        sd = unwrap_state_dict(obj, name)
    check_finite(sd, name)
    return sd


def unwrap_state_dict(obj, name: str = "checkpoint") -> dict:
    """Take the tensors from `ckpt["state_dict"]` / `{"model": ...}` wrappers."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        found = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{name} holds no tensors at the top level or under {WRAPPER_KEYS}: found {found}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


SINGLE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                      "diffusion_pytorch_model.bin", "pytorch_model.bin")
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
               "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")


def _shard_index(path: str) -> Optional[str]:
    """The index json that lists `path` as one of its shards, if there is one."""
    folder, name = os.path.split(path)
    for index_name in INDEX_NAMES:
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    if name in set(json.load(f).get("weight_map", {}).values()):
                        return index
            except (OSError, ValueError):
                return None
    return None


def _read_folder(path: str) -> dict:
    """diffusers / HF folder: weight shards listed by an index json, or the single weights file."""
    for index_name in INDEX_NAMES:
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(_read_file(os.path.join(path, shard)))
            return sd
    for single in SINGLE_WEIGHT_FILES:
        if os.path.exists(os.path.join(path, single)):
            return read_state_dict(os.path.join(path, single))
    raise CheckpointError(f"folder {path} has no weights file: expected diffusion_pytorch_model.safetensors, "
                          f"model.safetensors or a sharded index json; found {sorted(os.listdir(path))[:12]}")


def read_json_beside(path: str, name: str = "config.json") -> Optional[dict]:
    """A diffusers config.json in the folder or next to the file, if there is one (None if there is none).

    A file that is there but unusable — unreadable, empty, not JSON, or JSON that is not an object — is a
    CheckpointError naming the file, what is wrong and what was expected, instead of json's bare message."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidate = os.path.join(folder, name)
    if not os.path.exists(candidate):
        return None
    expected = (f"expected the JSON object that describes the weights beside it (a diffusers {name}: "
                f"{{\"_class_name\": …, \"num_layers\": …, …}}); restore it from the model's download")
    try:
        with open(candidate, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{candidate}: cannot be read as text ({e}); {expected}") from None
    if not text.strip():
        raise CheckpointError(f"{candidate} is empty; {expected}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{candidate} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              f"{expected}") from None
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise CheckpointError(f"{candidate} holds {kind} ({text.strip()[:60]!r}), not an object; {expected}")
    return value


def meta_shapes(build) -> dict:
    """{name: shape} of the module `build()` makes, built on the meta device (costs no memory)."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assign_load(build, state_dict: dict, dtype=None, device=None):
    """`build()` on the meta device, then take the (checked) tensors as its parameters: no random
    init and no second copy; floats cast to `dtype` when given."""
    with torch.device("meta"):
        module = build()
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    if device is not None:
        module.to(device)
    return module


def _summarise(keys: list, limit: int = 400) -> str:
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    return text + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_strict(expected: Mapping[str, tuple], found: Mapping[str, torch.Tensor], what: str,
                 tolerated: Iterable[str] = ()) -> None:
    """Raise CheckpointError naming every missing key, unexpected key and shape mismatch."""
    tolerated = set(tolerated)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in tolerated]
    mismatched = [f"{k}: expected {tuple(expected[k])}, found {tuple(found[k].shape)}"
                  for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        parts = [f"{what}: the weights do not match the expected layout"]
        if missing:
            parts.append(f"{len(missing)} missing: {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_summarise(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {_summarise(mismatched)}")
        raise CheckpointError("\n".join(parts))


def describe_foreign(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the model family a state dict most likely belongs to, for 'wrong file' errors."""
    keys = list(sd.keys())

    def has(prefix):
        return any(k.startswith(prefix) or ("." + prefix) in k for k in keys)

    if has("double_blocks.") or has("single_blocks.") or has("single_transformer_blocks."):
        family = "a FLUX transformer"
    elif has("joint_blocks.") or has("context_embedder.") and has("transformer_blocks."):
        family = "an SD3 MMDiT"
    elif any(k.startswith("model.diffusion_model.input_blocks") for k in keys) or has("input_blocks."):
        family = "a Stable Diffusion UNet checkpoint"
    elif has("encoder.block.") and has("SelfAttention"):
        family = "a T5 text encoder"
    elif has("decoder.up.") or has("encoder.down."):
        family = "a VAE"
    elif has("tok_embeddings") or has("layers.0.attention"):
        family = "an autoregressive transformer"
    else:
        family = "an unrecognised model"
    sample = ", ".join(sorted(keys)[:5])
    return f"{family} ({len(keys)} tensors, e.g. {sample})"


# -- streaming: tensors read one at a time with plain file reads -------------------------------------
#
# safetensors' own loader maps the file: every page it touches counts in the process's resident memory
# until the mapping goes, so a 10 GB T5 would be resident twice over while it is converted. Reading
# each tensor into its own buffer with readinto keeps only the converted weights resident (the OS page
# cache is not ours).

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsStream:
    """The tensors of one .safetensors file or a set of shards, read on demand.

    `meta_state_dict()` gives every tensor as a meta tensor (names, shapes, dtypes: enough for strict
    checks and config inference at no memory cost); `read(name)` reads one tensor from disk.
    """

    def __init__(self, paths: Iterable[str]):
        self.entries = {}   # name -> (path, dtype, shape, absolute byte offset, nbytes)
        for path in paths:
            self._read_header(path)

    def _read_header(self, path: str):
        name = os.path.basename(path)
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint not found: {path}")
        size = os.path.getsize(path)
        if size < 8:
            raise CheckpointError(f"{name} is {size} bytes: too short for a safetensors header; "
                                  f"the download or copy did not finish")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{name} is not a safetensors file (header length {n}, file {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{name} has an unreadable safetensors header: {e}") from None
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{name}: tensor {key} has dtype {info.get('dtype')!r}, which is not supported")
            begin, end = info["data_offsets"]
            if base + end > size:
                raise CheckpointError(f"{name} ({size} bytes) is truncated: tensor {key} ends at byte "
                                      f"{base + end}; the download or copy did not finish")
            self.entries[key] = (path, dtype, tuple(info["shape"]), base + begin, end - begin)

    def keys(self):
        return self.entries.keys()

    def meta_state_dict(self) -> dict:
        return {k: torch.empty(shape, dtype=dtype, device="meta")
                for k, (_, dtype, shape, _, _) in self.entries.items()}

    def read(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        view = out.reshape(-1).view(torch.uint8).numpy() if nbytes else None
        if nbytes:
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(view))
            if got != nbytes:
                raise CheckpointError(f"{os.path.basename(path)}: short read of {name} ({got} of {nbytes} bytes)")
        check_finite({name: out}, os.path.basename(path), stopped_early=True)
        return out


def safetensors_paths(path: str) -> Optional[list]:
    """The .safetensors file(s) that make up the checkpoint at `path` (a file, one shard of an indexed
    set, or a folder), or None when it is not safetensors (then read_state_dict is the way)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    index = None
    if os.path.isdir(path):
        index = next((os.path.join(path, n) for n in INDEX_NAMES if n.endswith(".safetensors.index.json")
                      and os.path.exists(os.path.join(path, n))), None)
        if index is None:
            single = next((os.path.join(path, n) for n in SINGLE_WEIGHT_FILES
                           if n.endswith(".safetensors") and os.path.exists(os.path.join(path, n))), None)
            return [single] if single else None
    elif path.endswith(".safetensors"):
        index = _shard_index(path)
        if index is None:
            return [path]
    if index is None or not index.endswith(".safetensors.index.json"):
        return None
    with open(index) as f:
        return [os.path.join(folder, shard) for shard in sorted(set(json.load(f)["weight_map"].values()))]


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None off glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap():
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Loading layer by layer allocates a float tensor, keeps a smaller converted one and frees the float:
    glibc serves such 1-32 MB blocks from its heap, and the freed holes between kept blocks stay
    resident. Measured: quantising 440 MB of floats to 110 MB of int8 grew RSS by 290 MB without this.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load_consuming(module: torch.nn.Module, state_dict: dict, dtype=None, assign: bool = False) -> tuple:
    """Move a checked state dict into a built `module` one layer at a time, taking each tensor out of the dict
    (the caller's dict ends empty): floats are cast to `dtype` per layer and the file's tensor is let go as soon
    as its layer holds it. A load that changes dtype (a 6.6 GB fp16 DiT4SR stored as fp32 on a CPU) thus holds
    one layer's converted copy beside the file, never a second copy of the whole model (which took a 24 GiB
    machine past its memory). `assign` takes the tensors as the parameters (v0.33's dynamic patcher) instead
    of copying into the allocated ones. Returns (missing, unexpected) keys as `load_state_dict` does."""
    missing = []
    for prefix, layer in module.named_modules():
        own = [n for n, _ in layer.named_parameters(recurse=False)] + \
              [n for n, _ in layer.named_buffers(recurse=False) if n not in layer._non_persistent_buffers_set]
        local = {}
        for key in own:
            t = state_dict.pop(f"{prefix}.{key}" if prefix else key, None)
            if t is not None:
                local[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        if own:
            # children are loaded on their own; a layer may make a tensor itself on the way in (an int8
            # layer's weight_scale from its float weight), so what is missing is what the layer says
            result = layer.load_state_dict(local, strict=False, assign=assign)
            missing += [f"{prefix}.{k}" if prefix else k for k in result.missing_keys
                        if "." not in k]
            del local
    unexpected = list(state_dict)
    state_dict.clear()
    release_free_heap()
    return missing, unexpected


def stream_into(module: torch.nn.Module, fetch, dtype=None, device=None):
    """Fill a meta-built `module` one layer at a time: each layer's tensors are fetched (`fetch(name)`,
    None for a tensor the layer makes itself, e.g. an int8 layer's scale), cast (floats to `dtype`),
    handed to the layer (which may convert them, e.g. quantise), then let go.

    The caller has checked the names and shapes already. A module shared under two names (tied
    weights) is visited once. Raises if any parameter or buffer is still on the meta device after.
    """
    for prefix, layer in module.named_modules():
        own = [n for n, _ in layer.named_parameters(recurse=False)] + \
              [n for n, _ in layer.named_buffers(recurse=False) if n not in layer._non_persistent_buffers_set]
        local = {}
        for key in own:
            t = fetch(f"{prefix}.{key}" if prefix else key)
            if t is None:
                continue
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            local[key] = t if device is None else t.to(device)
        if local:
            layer.load_state_dict(local, strict=False, assign=True)   # children are loaded on their own
            del local
            release_free_heap()
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{len(left)} tensors were not loaded: {_summarise(left, 20)}")
    return module
