"""Token sampling on the device: top-k, then temperature, per slot, with counter-based noise.

For a row of logits l, per-slot temperature T, top-k K and seed s at counter c (the slot's
own frame number) and stream j, the sampled token is
    argmax_{v in top-K(l)} ( l_v / T + g_v ),   g_v = -log(-log(u(s, c, j, v)))
i.e. a Gumbel-max draw from softmax(l / T) restricted to the K largest logits, which is the
distribution the reference samples from. `u` is a hash of (seed, counter, stream, token id)
mapped to (0, 1), so a slot's draws depend on nothing else in the batch. Greedy rows (or
T <= 0) take argmax(l).
"""
from __future__ import annotations

import torch

from .dispatch import triton_enabled

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 without leaving int64's range: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """u in (0, 1), float32, shape [B, vocab], from per-row seed and counter ([B] int64)."""
    v = torch.arange(vocab, device=seed.device, dtype=torch.int64).view(1, -1)
    h = _mix32((seed.view(-1, 1) & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ (counter.view(-1, 1) & _M32))
    h = _mix32(h ^ (stream * 0x85EBCA6B & _M32))
    return hash_to_unit(_mix32(h ^ v))


def hash_to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in [2^-24, 1 - 2^-24]: 23 high bits, so k + 0.5 is exact in
    float32 (with 24 bits, k + 0.5 rounds up to 2^24 and u = 1 makes an infinite Gumbel draw)."""
    return ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)


def sample_tokens_ref(logits, temperature, top_k, greedy, seed, counter, stream: int, forced=None,
                      forced_mask=None, out=None):
    """logits: [B, V] (any float dtype, read as float32); temperature: [B] float; top_k: [B]
    int; greedy: [B] bool; seed, counter: [B] int64 -> tokens [B] int64. Rows where
    forced_mask ([B] bool) is set take forced ([B]) instead (teacher forcing). With `out`
    ([B] int64, maybe a strided column), the tokens are written there and it is returned."""
    B, V = logits.shape
    logits = logits.float()
    k = top_k.clamp(1, V).long()
    sorted_vals = torch.sort(logits, dim=-1, descending=True).values
    thresh = sorted_vals.gather(1, (k - 1).view(B, 1))
    u = uniform_noise(seed, counter, stream, V)
    gumbel = -torch.log(-torch.log(u))
    t = temperature.float().clamp_min(1e-6).view(B, 1)
    score = torch.where(logits >= thresh, logits / t + gumbel, torch.full_like(logits, float("-inf")))
    sampled = score.argmax(dim=-1)
    is_greedy = greedy | (temperature <= 0)
    tok = torch.where(is_greedy, logits.argmax(dim=-1), sampled)
    if forced is not None:
        tok = torch.where(forced_mask, forced, tok)
    if out is None:
        return tok
    out.copy_(tok)
    return out


def sample_tokens(logits, temperature, top_k, greedy, seed, counter, stream: int, forced=None, forced_mask=None,
                  out=None):
    if triton_enabled(logits):
        from . import triton_ops
        return triton_ops.sample_tokens(logits, temperature, top_k, greedy, seed, counter, stream, forced=forced,
                                        forced_mask=forced_mask, out=out)
    return sample_tokens_ref(logits, temperature, top_k, greedy, seed, counter, stream, forced, forced_mask, out)
