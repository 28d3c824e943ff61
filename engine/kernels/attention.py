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


def decode_attention_ref(q, k_ring, v_ring, slots, lengths):
    """q: [B, H, D]; k_ring, v_ring: [S, H, C, D]; slots, lengths: [B] -> [B, H, D]."""
    B, H, D = q.shape
    C = k_ring.shape[2]
    k = k_ring.index_select(0, slots).float()
    v = v_ring.index_select(0, slots).float()
    scores = torch.einsum("bhd,bhcd->bhc", q.float(), k) / math.sqrt(D)
    valid = torch.arange(C, device=q.device).view(1, 1, C) < lengths.view(B, 1, 1)
    scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhc,bhcd->bhd", p, v).to(q.dtype)


def decode_attention(q, k_ring, v_ring, slots, lengths):
    if triton_enabled(q):
        from . import triton_ops
        return triton_ops.decode_attention(q, k_ring, v_ring, slots, lengths)
    return decode_attention_ref(q, k_ring, v_ring, slots, lengths)


def prefill_attention_ref(q, k, v, context: int | None, lengths=None):
    """q, k, v: [B, T, H, D] of prompts starting at position 0 -> [B, T, H, D].
    Query t sees keys t - context + 1 .. t; keys at or past `lengths[b]` are padding."""
    B, T, H, D = q.shape
    i = torch.arange(T, device=q.device)
    delta = i.view(T, 1) - i.view(1, T)
    mask = delta >= 0
    if context is not None:
        mask = mask & (delta < context)
    mask = mask.view(1, 1, T, T)
    if lengths is not None:
        mask = mask & (i.view(1, 1, 1, T) < lengths.view(B, 1, 1, 1))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
