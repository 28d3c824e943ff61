"""Rotary embedding on interleaved pairs (x[2i], x[2i+1]), computed in float32.

For pair i of a head of size D at position t: angle = t * max_period^(-2i/D),
(a, b) -> (a cos - b sin, a sin + b cos), cast back to the input dtype.
"""
from __future__ import annotations

import math

import torch

from .dispatch import triton_enabled


def rope_ref(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, max_period: float):
    """q, k: [N, H, D]; pos: [N] (int). Returns the rotated q and k."""
    N, H, D = q.shape
    ds = torch.arange(D // 2, device=q.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / D))
    angle = pos.float().view(N, 1, 1) * freqs.view(1, 1, -1)
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rot(x):
        xr = x.view(N, -1, D // 2, 2)
        a, b = xr[..., 0].float(), xr[..., 1].float()
        out = torch.stack([(a * cos - b * sin).to(x.dtype), (a * sin + b * cos).to(x.dtype)], dim=-1)
        return out.view(N, -1, D)

    return rot(q), rot(k)


def rope(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, max_period: float):
    if triton_enabled(q):
        from . import triton_ops
        return triton_ops.rope(q, k, pos, max_period)
    return rope_ref(q, k, pos, max_period)
