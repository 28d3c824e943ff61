"""Mimi's LayerNorm, fused with the layer-scaled residual add in front of it:
x' = x + scale * delta (the product rounded to x's dtype, then the sum, as torch computes
them), y = (x' - mean) / sqrt(var + eps) * weight + bias, in float32, cast back to x's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import triton_enabled


def scale_add_layer_norm_ref(x: torch.Tensor, delta: torch.Tensor | None, scale: torch.Tensor | None,
                             weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """(x + scale * delta, layer_norm of it); delta None: (x, layer_norm(x)); weight None: no
    norm, (x + scale * delta, None)."""
    if delta is not None:
        x = x + scale * delta
    if weight is None:
        return x, None
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def scale_add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, scale: torch.Tensor | None,
                         weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    if (triton_enabled(x) and x.stride(-1) == 1 and (delta is None or delta.stride(-1) == 1)
            and (weight is None or bias is not None)):
        from . import triton_ops
        return triton_ops.scale_add_layer_norm(x, delta, scale, weight, bias, eps)
    return scale_add_layer_norm_ref(x, delta, scale, weight, bias, eps)
