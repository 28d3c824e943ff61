"""Activations: the gated SiLU of the feed-forward blocks, y = silu(a) * b for x = [a | b] on
the last dim (silu rounded to x's dtype before the product, as torch computes it); Mimi's ELU,
y = x for x > 0, exp(x) - 1 otherwise."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import triton_enabled


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return F.silu(x[..., :h]) * x[..., h:]


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    if triton_enabled(x):
        from . import triton_ops
        return triton_ops.silu_mul(x)
    return silu_mul_ref(x)


def elu_ref(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x)


def elu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """elu(x), written into `out` (x's shape, any layout: a transposed view, say) when given."""
    if triton_enabled(x) and x.dim() <= 3:
        from . import triton_ops
        return triton_ops.elu(x, out)
    return elu_ref(x) if out is None else out.copy_(elu_ref(x))
