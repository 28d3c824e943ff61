"""Matrix products y = x W^T. cuBLAS does them, except for a few rows against a small
half-precision W (the depformer's per-step weights), where one Triton launch streams W once."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import triton_enabled

_SMALL_W = 16 << 20  # elements: the depformer's matrices are up to 5.8 M, the temporal's 92 M


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if (triton_enabled(x) and w.dtype in (torch.bfloat16, torch.float16) and w.numel() <= _SMALL_W
            and x.numel() // x.shape[-1] <= 16 and x.dtype == w.dtype):
        from . import triton_ops
        return triton_ops.small_linear(x, w)
    return F.linear(x, w)
