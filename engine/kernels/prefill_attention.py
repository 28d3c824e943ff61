"""Prefill attention: all positions of one or more prompts at once, causal with the sliding
window (query t sees keys t - context + 1 .. t), padding past each prompt's length masked.
Torch's flash and masked kernels do it; there is no Triton kernel of its own."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
