"""RMSNorm in float32: y = x * alpha / sqrt(eps + mean(x^2)), cast back to x's dtype; and the
same fused with the residual add before it: x' = x + delta (rounded to x's dtype), y = rms(x')."""
from __future__ import annotations

import torch

from .dispatch import triton_enabled


def rms_norm_ref(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = eps + torch.mean(xf * xf, dim=-1, keepdim=True)
    return (xf * (alpha.float() * torch.rsqrt(var))).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor, alpha: torch.Tensor, eps: float):
    x = x + delta
    return x, rms_norm_ref(x, alpha, eps)


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    if triton_enabled(x):
        from . import triton_ops
        return triton_ops.rms_norm(x, alpha, eps)
    return rms_norm_ref(x, alpha, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, alpha: torch.Tensor, eps: float):
    if triton_enabled(x):
        from . import triton_ops
        return triton_ops.add_rms_norm(x, delta, alpha, eps)
    return add_rms_norm_ref(x, delta, alpha, eps)
