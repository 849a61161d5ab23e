"""Reading checkpoint files and strict key checking, shared by every model family.

Errors here say what was expected and what was found, so that a node can show them as they are.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional

import torch


class CheckpointError(ValueError):
    """A file that is not the checkpoint a loader expects, or is damaged."""


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
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own types for truncated headers/bodies
            raise CheckpointError(f"{name} ({size} bytes) is not a readable safetensors file; it may be "
                                  f"truncated or damaged: {type(e).__name__}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{name} ({size} bytes) is not a readable PyTorch checkpoint (loaded with "
                              f"weights_only=True); it may be truncated, damaged or pickle-only: "
                              f"{type(e).__name__}: {str(e)[:300]}") from None
    return unwrap_state_dict(obj, name)


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
    for single in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                   "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return read_state_dict(os.path.join(path, single))
    raise CheckpointError(f"folder {path} has no weights file: expected diffusion_pytorch_model.safetensors, "
                          f"model.safetensors or a sharded index json; found {sorted(os.listdir(path))[:12]}")


def read_json_beside(path: str, name: str = "config.json") -> Optional[dict]:
    """A diffusers config.json in the folder or next to the file, if there is one."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidate = os.path.join(folder, name)
    if os.path.exists(candidate):
        with open(candidate) as f:
            return json.load(f)
    return None


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
