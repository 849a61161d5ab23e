"""FLUX blocks by attribute name, with and without EasyControl conditions.

Every function here takes a block object and reads only the names ComfyUI's native Flux
(`comfy/ldm/flux/layers.py`, = BFL's layout) gives it:

  double block: num_heads, img_mod.lin, img_norm1, img_attn.{qkv, norm.query_norm, norm.key_norm, proj},
                img_norm2, img_mlp, and the same txt_* set
  single block: num_heads, hidden_size, modulation.lin, pre_norm, linear1 (= [q; k; v; mlp_in]),
                norm.{query_norm, key_norm}, linear2 (= [attn; mlp] -> D), mlp_act (optional)

so the same code runs on our own `model.Flux` and, duck-typed, on core's block modules (a block
replace patch calls these with `flux.double_blocks[i]`). Nothing here imports ComfyUI.

Conditions ride along in a `run` (`condition.ConditionRun`): `run=None` is the plain FLUX block. In
a run, condition tokens use the IMAGE stream's weights with their own modulation (t = 0), their LoRA
deltas, and attend only to their own slot; text and noise rows see every condition. Two modes:

- "cached": the condition stream was run once (`condition_double_block` / `condition_single_block`,
  driven by `condition.fill_bank`) and its per-block K (after LoRA, before qk-norm and RoPE) and V sit in
  the bank; text+noise queries attend over [text, noise, banked conditions] with no mask.
- "joint": all tokens in one sequence with the block-diagonal mask, conditions carried block to block
  in `run.cond_hidden` (EasyControl's training/uncached processor, recomputed every call).

The two give the same numbers: a condition row never sees text or noise, so its stream does not depend
on them, nor (t = 0 modulation) on the timestep.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..adaln import modulate
from .primitives import attention, modulation, split_heads, timestep_embedding


def _qk_norm(norm, q, k, v):
    """QKNorm module (query_norm, key_norm) on q and k; back to v's dtype as BFL does."""
    return norm.query_norm(q).to(v), norm.key_norm(k).to(v)


def _mlp_act(block):
    act = getattr(block, "mlp_act", None)
    return act if act is not None else (lambda x: F.gelu(x, approximate="tanh"))


def _single_mlp_width(block) -> int:
    # core names the first MLP width mlp_hidden_dim_first (2x for SiLU-gated variants)
    return getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim)


def check_flux1_block(block, kind: str) -> None:
    """The blocks these functions understand: FLUX.1 (own modulation, GELU MLP). Chroma / FLUX.2-style
    blocks (global modulation, SiLU-gated MLPs) have other maths."""
    if kind == "double" and getattr(block, "modulation", True) is False:
        raise TypeError("EasyControl needs FLUX.1 double blocks with their own modulation (img_mod/txt_mod); "
                        "this block uses global modulation")
    if kind == "single" and (getattr(block, "modulation", None) is None or getattr(block, "yak_mlp", False)
                             or _single_mlp_width(block) != block.mlp_hidden_dim):
        raise TypeError("EasyControl needs FLUX.1 single blocks (own modulation, GELU MLP)")


# ---------------------------------------------------------------------------------------------
#                        Masked LoRA: deltas on the rows of their own slot
# ---------------------------------------------------------------------------------------------
#
# EasyControl's LoRALinearLayer computes up(down(h ⊙ mask_i)) with mask_i = 1 on the tokens of condition
# i: every other row is exactly 0. So each slot's LoRA runs on its own rows only — the same numbers, and
# the noise/text rows never pay for it.

def _slot_deltas(h: torch.Tensor, run, fn) -> torch.Tensor:
    """cat over slots of w_i · fn(slot_i, h[:, rows of slot i]) -> [B, M, ·], slots in token order."""
    return torch.cat([slot.strength * fn(slot, h[:, a:b]) for slot, (a, b) in zip(run.slots, run.ranges)], dim=1)


def _qkv_lora(proc, h: torch.Tensor) -> torch.Tensor:
    """[q; k; v] LoRA deltas of one slot's processor (one LoRA slot per file: index 0)."""
    return torch.cat([proc.q_loras[0](h), proc.k_loras[0](h), proc.v_loras[0](h)], dim=-1)


def _project_with_lora(linear, h: torch.Tensor, run, kind: str, index: int, width: int) -> torch.Tensor:
    """linear(h) for condition tokens, with each slot's q/k/v LoRA added to output rows 0:3·width
    (`img_attn.qkv` is [q; k; v]; `linear1` is [q; k; v; mlp_in] and mlp_in gets no LoRA)."""
    out = linear(h)
    delta = _slot_deltas(h, run, lambda slot, rows: _qkv_lora(slot.lora.processor(kind, index), rows))
    out[..., :3 * width] += delta.to(out.dtype)
    return out


def _proj_lora(y: torch.Tensor, run, index: int) -> torch.Tensor:
    """Double blocks: the proj LoRA acts on the OUTPUT of img_attn.proj: y + Σ w_i · proj_lora_i(y)
    (applied one slot after another upstream; the slot masks are disjoint, so that is this sum)."""
    delta = _slot_deltas(y, run, lambda slot, rows: slot.lora.processor("double", index).proj_loras[0](rows))
    return y + delta.to(y.dtype)


# ---------------------------------------------------------------------------------------------
#                    The condition stream of one block (image-stream weights)
# ---------------------------------------------------------------------------------------------

def _condition_double_qkv(block, cond, mods, run, index):
    """-> q, k (qk-normed), k_raw (after LoRA, before qk-norm: what the bank keeps), v; each [B, H, M, hd]."""
    h = modulate(block.img_norm1(cond), mods[0], mods[1])
    qkv = _project_with_lora(block.img_attn.qkv, h, run, "double", index, cond.shape[-1])
    q, k_raw, v = split_heads(qkv, 3, block.num_heads)
    q, k = _qk_norm(block.img_attn.norm, q, k_raw, v)
    return q, k, k_raw, v


def _condition_double_out(block, cond, cond_attn, mods, run, index):
    """Residual updates of the condition tokens after attention (proj + proj LoRA, MLP)."""
    cond = cond + mods[2] * _proj_lora(block.img_attn.proj(cond_attn), run, index)
    return cond + mods[5] * block.img_mlp(modulate(block.img_norm2(cond), mods[3], mods[4]))


def _condition_single_qkv(block, cond, mods, run, index):
    h = modulate(block.pre_norm(cond), mods[0], mods[1])
    out = _project_with_lora(block.linear1, h, run, "single", index, block.hidden_size)
    qkv, mlp = torch.split(out, [3 * block.hidden_size, out.shape[-1] - 3 * block.hidden_size], dim=-1)
    q, k_raw, v = split_heads(qkv, 3, block.num_heads)
    q, k = _qk_norm(block.norm, q, k_raw, v)
    return q, k, k_raw, v, mlp


def _condition_single_out(block, cond, cond_attn, mlp, mods):
    return cond + mods[2] * block.linear2(torch.cat([cond_attn, _mlp_act(block)(mlp)], dim=-1))


def _slot_attention(q, k, v, pe, run):
    """Condition rows attend only to their own slot: one attention per slot."""
    return torch.cat([attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pe[:, :, a:b])
                      for a, b in run.ranges], dim=1)


class ConditionBlockOutput(NamedTuple):
    """The condition stream after one block on its own (`condition_double_block` / `condition_single_block`)."""
    tokens: torch.Tensor    # the condition tokens [B, M, D] after the block
    k: torch.Tensor         # K [B, H, M, hd] after LoRA, before qk-norm and RoPE: what the bank keeps
    v: torch.Tensor         # V [B, H, M, hd]


def _own_storage(k: torch.Tensor, v: torch.Tensor) -> tuple:
    """K and V are views into the fused projection output ([q; k; v] or, in single blocks, [q; k; v; mlp],
    3.5x wider): copied out so the bank does not keep the whole projection alive."""
    return k.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)


def condition_double_block(block, cond: torch.Tensor, run, index: int) -> ConditionBlockOutput:
    """The condition tokens [B, M, D] through double block `index` on their own.
    -> (condition tokens after the block, K [B, H, M, hd] after LoRA before qk-norm, V)."""
    mods = modulation(block.img_mod.lin, run.cond_vec, 6)
    q, k, k_raw, v = _condition_double_qkv(block, cond, mods, run, index)
    cond_attn = _slot_attention(q, k, v, run.cond_pe, run)
    return ConditionBlockOutput(_condition_double_out(block, cond, cond_attn, mods, run, index),
                                *_own_storage(k_raw, v))


def condition_single_block(block, cond: torch.Tensor, run, index: int) -> ConditionBlockOutput:
    """As condition_double_block for single block `index` (q/k/v LoRA only)."""
    mods = modulation(block.modulation.lin, run.cond_vec, 3)
    q, k, k_raw, v, mlp = _condition_single_qkv(block, cond, mods, run, index)
    cond_attn = _slot_attention(q, k, v, run.cond_pe, run)
    return ConditionBlockOutput(_condition_single_out(block, cond, cond_attn, mlp, mods), *_own_storage(k_raw, v))


# ---------------------------------------------------------------------------------------------
#                 Attention of the text+noise rows with the conditions present
# ---------------------------------------------------------------------------------------------

class ConditionKeys(NamedTuple):
    """What a block's attention appends for the banked conditions (`condition_keys`)."""
    k: torch.Tensor     # [B, H, M, hd], qk-normed by the block's key_norm
    v: torch.Tensor     # [B, H, M, hd]
    pe: torch.Tensor    # positions of [the queries' rows; condition rows]


def condition_keys(run, kind: str, index: int, key_norm, pe: torch.Tensor) -> ConditionKeys:
    """What a block's attention appends for the conditions: (K [B, H, M, hd] qk-normed by the block's
    `key_norm`, V, positions of [pe rows; condition rows]). The bank keeps K before the norm (as
    upstream); the norm is per token, so normalising it here gives the same keys."""
    k_raw, v_c = run.bank_kv(kind, index)
    pe_k = torch.cat([pe, run.cond_pe.expand(pe.shape[0], *run.cond_pe.shape[1:])], dim=2)
    return ConditionKeys(key_norm(k_raw).to(v_c), v_c, pe_k)


def _cached_attention(q, k, v, pe, run, kind, index, key_norm, mask):
    """Text+noise queries over [text, noise, banked condition keys]; no mask is needed: text and noise
    rows see everything."""
    if mask is not None:
        raise NotImplementedError("EasyControl with an attention mask on the text tokens is not supported")
    k_c, v_c, pe_k = condition_keys(run, kind, index, key_norm, pe)
    return attention(q, torch.cat([k, k_c], dim=2), torch.cat([v, v_c], dim=2), pe, pe_k=pe_k)


def _joint_attention(q, k, v, pe, run, cq, ck, cv, mask):
    """Everything in one sequence [main rows, condition rows] with EasyControl's mask.
    -> (main rows' output, condition rows' output)."""
    if mask is not None:
        raise NotImplementedError("EasyControl with an attention mask on the text tokens is not supported")
    n = q.shape[2]
    pe_all = torch.cat([pe, run.cond_pe.expand(pe.shape[0], *run.cond_pe.shape[1:])], dim=2)
    out = attention(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2), pe_all,
                    mask=run.joint_mask(n))
    return out[:, :n], out[:, n:]


# ---------------------------------------------------------------------------------------------
#                                        The blocks
# ---------------------------------------------------------------------------------------------

def double_block(block, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                 run=None, index: int = 0, attn_mask: Optional[torch.Tensor] = None):
    """img [B, N, D] noise tokens, txt [B, T, D], vec [B, D], pe for [txt, img] (ComfyUI v0.33's order:
    `pe_embedder(cat(txt_ids, img_ids))`). -> (img, txt)."""
    heads = block.num_heads
    im = modulation(block.img_mod.lin, vec, 6)
    tm = modulation(block.txt_mod.lin, vec, 6)

    img_q, img_k, img_v = split_heads(block.img_attn.qkv(modulate(block.img_norm1(img), im[0], im[1])), 3, heads)
    img_q, img_k = _qk_norm(block.img_attn.norm, img_q, img_k, img_v)
    txt_q, txt_k, txt_v = split_heads(block.txt_attn.qkv(modulate(block.txt_norm1(txt), tm[0], tm[1])), 3, heads)
    txt_q, txt_k = _qk_norm(block.txt_attn.norm, txt_q, txt_k, txt_v)
    q, k, v = torch.cat([txt_q, img_q], 2), torch.cat([txt_k, img_k], 2), torch.cat([txt_v, img_v], 2)

    if run is None:
        attn = attention(q, k, v, pe, mask=attn_mask)
    elif run.mode == "cached":
        attn = _cached_attention(q, k, v, pe, run, "double", index, block.img_attn.norm.key_norm, attn_mask)
    else:
        cm = modulation(block.img_mod.lin, run.cond_vec, 6)
        cq, ck, _, cv = _condition_double_qkv(block, run.cond_hidden, cm, run, index)
        attn, cond_attn = _joint_attention(q, k, v, pe, run, cq, ck, cv, attn_mask)
        run.cond_hidden = _condition_double_out(block, run.cond_hidden, cond_attn, cm, run, index)

    t = txt.shape[1]
    txt_attn, img_attn = attn[:, :t], attn[:, t:]
    img = img + im[2] * block.img_attn.proj(img_attn)
    img = img + im[5] * block.img_mlp(modulate(block.img_norm2(img), im[3], im[4]))
    txt = txt + tm[2] * block.txt_attn.proj(txt_attn)
    txt = txt + tm[5] * block.txt_mlp(modulate(block.txt_norm2(txt), tm[3], tm[4]))
    return img, txt


def single_block(block, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor, run=None, index: int = 0,
                 attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, T+N, D]: text and noise in the order `pe` has them (v0.33: [txt, img]). Conditions are
    appended after the whole stream, so this function never needs to know where text ends."""
    d = block.hidden_size
    shift, scale, gate = modulation(block.modulation.lin, vec, 3)
    out = block.linear1(modulate(block.pre_norm(x), shift, scale))
    qkv, mlp = torch.split(out, [3 * d, out.shape[-1] - 3 * d], dim=-1)
    q, k, v = split_heads(qkv, 3, block.num_heads)
    q, k = _qk_norm(block.norm, q, k, v)

    if run is None:
        attn = attention(q, k, v, pe, mask=attn_mask)
    elif run.mode == "cached":
        attn = _cached_attention(q, k, v, pe, run, "single", index, block.norm.key_norm, attn_mask)
    else:
        cm = modulation(block.modulation.lin, run.cond_vec, 3)
        cq, ck, _, cv, c_mlp = _condition_single_qkv(block, run.cond_hidden, cm, run, index)
        attn, cond_attn = _joint_attention(q, k, v, pe, run, cq, ck, cv, attn_mask)
        run.cond_hidden = _condition_single_out(block, run.cond_hidden, cond_attn, c_mlp, cm)

    return x + gate * block.linear2(torch.cat([attn, _mlp_act(block)(mlp)], dim=-1))


# ---------------------------------------------------------------------------------------------
#                          Model-level pieces, by attribute name too
# ---------------------------------------------------------------------------------------------

def embed_vector(model, timestep: torch.Tensor, y: Optional[torch.Tensor], guidance: Optional[torch.Tensor],
                 dtype) -> torch.Tensor:
    """vec = time_in(sinusoid(t)) + guidance_in(sinusoid(g)) + vector_in(pooled) -> [B, D].

    `model` has FLUX's time_in / guidance_in / vector_in (core's Flux makes guidance_in an Identity
    and vector_in None when the model has no such input)."""
    vec = model.time_in(timestep_embedding_for(model, timestep, dtype))
    guidance_in = getattr(model, "guidance_in", None)
    if guidance is not None and guidance_in is not None and not isinstance(guidance_in, torch.nn.Identity):
        vec = vec + guidance_in(timestep_embedding_for(model, guidance, dtype))
    vector_in = getattr(model, "vector_in", None)
    if vector_in is not None:
        width = vector_in.in_layer.in_features
        if y is None:
            y = torch.zeros(vec.shape[0], width, device=vec.device, dtype=dtype)
        vec = vec + vector_in(y[:, :width].to(dtype))
    return vec


def timestep_embedding_for(model, t: torch.Tensor, dtype) -> torch.Tensor:
    width = model.time_in.in_layer.in_features
    return timestep_embedding(t.reshape(-1), width).to(dtype)
