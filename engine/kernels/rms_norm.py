"""RMSNorm in float32: y = x * alpha / sqrt(eps + mean(x^2)), cast back to x's dtype."""
from __future__ import annotations

import torch

from .dispatch import triton_enabled


def rms_norm_ref(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = eps + torch.mean(xf * xf, dim=-1, keepdim=True)
    return (xf * (alpha.float() * torch.rsqrt(var))).to(x.dtype)


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    if triton_enabled(x):
        from . import triton_ops
        return triton_ops.rms_norm(x, alpha, eps)
    return rms_norm_ref(x, alpha, eps)
