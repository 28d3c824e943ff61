"""Rotary embedding on interleaved pairs (x[2i], x[2i+1]), computed in float32.

For pair i of a head of size D at position t: angle = t * max_period^(-2i/D),
(a, b) -> (a cos - b sin, a sin + b cos), cast back to the input dtype.
`qkv_rope_write` fuses it with the decode step's KV-ring write: q and k rotated, k and v
stored at [slot, :, ring_idx] of one layer's rings, rotated q returned.
"""
from __future__ import annotations

import math

import torch

from .dispatch import triton_enabled


def rope_freqs_ref(D: int, max_period: float, device) -> torch.Tensor:
    ds = torch.arange(D // 2, device=device, dtype=torch.float32)
    return torch.exp(ds * (-math.log(max_period) * 2 / D))


def rope_ref(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, max_period: float):
    """q, k: [N, H, D]; pos: [N] (int). Returns the rotated q and k."""
    N, H, D = q.shape
    freqs = rope_freqs_ref(D, max_period, q.device)
    angle = pos.float().view(N, 1, 1) * freqs.view(1, 1, -1)
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rot(x):
        xr = x.view(N, -1, D // 2, 2)
        a, b = xr[..., 0].float(), xr[..., 1].float()
        out = torch.stack([(a * cos - b * sin).to(x.dtype), (a * sin + b * cos).to(x.dtype)], dim=-1)
        return out.view(N, -1, D)

    return rot(q), rot(k)


def rope_qkv(qkv: torch.Tensor, pos: torch.Tensor, max_period: float):
    """qkv: [N, 3, H, D] (a projection's output) -> rotated q, rotated k and v, each [N, H, D],
    as `rope_ref` rounds them. On a GPU one launch: the decode step's rope-and-write kernel,
    writing k and v into a one-entry "ring" per row."""
    if triton_enabled(qkv):
        from . import triton_ops

        N, _, H, D = qkv.shape
        k = torch.empty(N, H, 1, D, device=qkv.device, dtype=qkv.dtype)
        v = torch.empty_like(k)
        rows = torch.arange(N, device=qkv.device)
        q = triton_ops.qkv_rope_write(qkv, pos, max_period, rows, torch.zeros_like(rows), k, v)
        return q, k.view(N, H, D), v.view(N, H, D)
    q, k = rope_ref(qkv[:, 0], qkv[:, 1], pos, max_period)
    return q, k, qkv[:, 2]


def _rows_of(pos, slots, ring_idx, per: int, window: int):
    """Each row's (position, slot, ring index) when pos and slots are given per `per` rows (row r:
    position pos[r // per] + r % per) and the ring index is the position mod the window."""
    if per > 1:
        pos = (pos.view(-1, 1) + torch.arange(per, device=pos.device).view(1, per)).view(-1)
        slots = slots.repeat_interleave(per)
    return pos, slots, (pos % window if ring_idx is None else ring_idx)


def qkv_rope_write_ref(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale=None, v_scale=None, per=1):
    """qkv: [B, 3, H, D]; k_ring, v_ring: [S, H, W, D] of one layer. Returns rotated q [B, H, D].
    With scales ([S, H, W]), the rings are e4m3: each stored vector is quantized with its own.
    ring_idx None: each row's position mod W. per > 1: pos and slots hold one entry per `per`
    consecutive rows, row r at position pos[r // per] + r % per (a chunk of positions per slot)."""
    pos, slots, ring_idx = _rows_of(pos, slots, ring_idx, per, k_ring.shape[2])
    q, k = rope_ref(qkv[:, 0], qkv[:, 1], pos, max_period)
    v = qkv[:, 2]
    if k_scale is not None:
        from ..quant import quantize_rows
        (k, ks), (v, vs) = quantize_rows(k), quantize_rows(v)
        k_scale[slots, :, ring_idx] = ks
        v_scale[slots, :, ring_idx] = vs
    k_ring[slots, :, ring_idx] = k.to(k_ring.dtype)
    v_ring[slots, :, ring_idx] = v.to(v_ring.dtype)
    return q


def qkv_rope_write(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale=None, v_scale=None, per=1):
    if triton_enabled(qkv):
        from . import triton_ops
        return triton_ops.qkv_rope_write(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale, v_scale,
                                         per)
    return qkv_rope_write_ref(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale, v_scale, per)
