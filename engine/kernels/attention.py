"""Attention of the temporal transformer.

Decode: one query per slot against that slot's KV ring. The ring holds position p at index
p mod C (C = the window of keys a query sees), so after writing position p the filled entries are
0 .. min(p + 1, C) - 1, exactly the keys p - C + 1 .. p that a query at p may see:
    out[b, h] = softmax(q[b, h] . K[slot_b, h, :L_b]^T / sqrt(D)) V[slot_b, h, :L_b]
with L_b = min(pos_b + 1, C).

Prefill: all positions of one prompt at once, causal with the same sliding window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import triton_enabled


def decode_attention_ref(q, k_ring, v_ring, slots, lengths, k_scale=None, v_scale=None):
    """q: [B, H, D]; k_ring, v_ring: [S, H, C, D]; slots, lengths: [B] -> [B, H, D]. With
    scales ([S, H, C]) the rings are e4m3 and each vector is k8 * scale."""
    B, H, D = q.shape
    C = k_ring.shape[2]
    k = k_ring.index_select(0, slots).float()
    v = v_ring.index_select(0, slots).float()
    if k_scale is not None:
        k = k * k_scale.index_select(0, slots).unsqueeze(-1)
        v = v * v_scale.index_select(0, slots).unsqueeze(-1)
    scores = torch.einsum("bhd,bhcd->bhc", q.float(), k) / math.sqrt(D)
    valid = torch.arange(C, device=q.device).view(1, 1, C) < lengths.view(B, 1, 1)
    scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhc,bhcd->bhd", p, v).to(q.dtype)


def decode_attention(q, k_ring, v_ring, slots, lengths, k_scale=None, v_scale=None):
    if triton_enabled(q):
        from . import triton_ops
        return triton_ops.decode_attention(q, k_ring, v_ring, slots, lengths, k_scale=k_scale, v_scale=v_scale)
    return decode_attention_ref(q, k_ring, v_ring, slots, lengths, k_scale, v_scale)


def prefill_mask(B: int, T: int, context: int | None, lengths, device) -> torch.Tensor:
    """[B, 1, T, T] bool: query t of prompt b sees keys t - context + 1 .. t, none at or past
    lengths[b] (padding). The same for every layer, so a prefill builds it once."""
    i = torch.arange(T, device=device)
    delta = i.view(T, 1) - i.view(1, T)
    mask = delta >= 0
    if context is not None:
        mask = mask & (delta < context)
    mask = mask.view(1, 1, T, T)
    if lengths is not None:
        mask = mask & (i.view(1, 1, 1, T) < lengths.view(B, 1, 1, 1))
    return mask.expand(B, 1, T, T)


def causal_suffices(T: int, context: int | None) -> bool:
    """Whether a causal mask alone is `prefill_mask` for every query before its prompt's end
    (rows past it are padding, whose outputs nobody reads): when no prompt outgrows the window."""
    return context is None or T <= context


def prefill_attention_ref(q, k, v, context: int | None, lengths=None, mask=None):
    """q, k, v: [B, T, H, D] of prompts starting at position 0 -> [B, T, H, D].
    Query t sees keys t - context + 1 .. t; keys at or past `lengths[b]` are padding
    (`mask`, from `prefill_mask`, when already built). Outputs of padding rows are unspecified."""
    B, T, H, D = q.shape
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is None and causal_suffices(T, context):
        # a query before its prompt's end sees only keys before it, so padding needs no mask;
        # the causal form runs a flash kernel with far less host work than a masked one
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    if mask is None:
        mask = prefill_mask(B, T, context, lengths, q.device)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


def step_attention_ref(qkv, k_buf, v_buf, step: int):
    """The depformer's attention within a frame: qkv [B, 3, H, D] of step `step` is stored at
    k_buf/v_buf[:, step] ([B, steps, H, D]); the query attends over steps 0..step."""
    B, _, H, D = qkv.shape
    k_buf[:, step] = qkv[:, 1]
    v_buf[:, step] = qkv[:, 2]
    q = qkv[:, 0].float()
    s = torch.einsum("bhd,bshd->bhs", q, k_buf[:, :step + 1].float()) / math.sqrt(D)
    return torch.einsum("bhs,bshd->bhd", torch.softmax(s, -1), v_buf[:, :step + 1].float()).to(qkv.dtype)


def step_attention(qkv, k_buf, v_buf, step: int):
    if triton_enabled(qkv):
        from . import triton_ops
        return triton_ops.step_attention(qkv, k_buf, v_buf, step)
    return step_attention_ref(qkv, k_buf, v_buf, step)


def ring_chunk_attention_ref(q, k_ring, v_ring, slots, end):
    """Attention of T new queries per slot (positions end - T .. end - 1, already written to
    the ring at p mod W) over a KV ring [S, H, W, D]: query p sees every held key at a
    position <= p, the ring holding end - W .. end - 1. q: [B, T, H, D] -> [B, T, H, D]."""
    B, T, H, D = q.shape
    W = k_ring.shape[2]
    idx = torch.arange(W, device=q.device).view(1, W)
    kpos = (end - 1).view(B, 1) - ((end - 1).view(B, 1) - idx) % W                    # [B, W]
    qpos = (end - T).view(B, 1) + torch.arange(T, device=q.device).view(1, T)          # [B, T]
    mask = (kpos >= 0).view(B, 1, 1, W) & (kpos.view(B, 1, 1, W) <= qpos.view(B, 1, T, 1))
    k = k_ring.index_select(0, slots).float()
    v = v_ring.index_select(0, slots).float()
    s = torch.einsum("bthd,bhwd->bhtw", q.float(), k) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("bhtw,bhwd->bthd", p, v).to(q.dtype)


def ring_chunk_attention(q, k_ring, v_ring, slots, end):
    if triton_enabled(q):
        from . import triton_ops
        return triton_ops.ring_chunk_attention(q, k_ring, v_ring, slots, end)
    return ring_chunk_attention_ref(q, k_ring, v_ring, slots, end)
