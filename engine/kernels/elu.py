"""Mimi's ELU: y = x for x > 0, exp(x) - 1 otherwise."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, triton_enabled


def elu_ref(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x)


@triton.jit
def elu_f32(x):
    """ELU of a float32 block (also used by the convolution-input kernel)."""
    return tl.where(x > 0, x, tl.exp(x) - 1.0)


@triton.jit
def _elu_kernel(x_ptr, y_ptr, n, C, T, sxb, sxc, sxt, syb, syc, syt, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # element i of [B, C, T]: (i // (C T), i // T mod C, i mod T), at each tensor's strides
    pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t = offs % T
    c = (offs // T) % C
    b = offs // (T * C)
    y = elu_f32(tl.load(x_ptr + b * sxb + c * sxc + t * sxt, mask=m, other=0.0).to(tl.float32))
    tl.store(y_ptr + b * syb + c * syc + t * syt, y.to(y_ptr.dtype.element_ty), mask=m)


def elu_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """elu(x) for x of up to 3 dims, into `out` (any layout of x's shape) when given."""
    assert x.dim() <= 3 and (out is None or (out.shape == x.shape and out.dtype == x.dtype))
    y = torch.empty_like(x) if out is None else out
    x3, y3 = (t.view((1,) * (3 - t.dim()) + tuple(t.shape)) for t in (x, y))
    n = x.numel()
    _elu_kernel[(triton.cdiv(n, 1024),)](x3, y3, n, x3.shape[1], x3.shape[2], *x3.stride(), *y3.stride(), BLOCK=1024,
                                         num_warps=4, **pdl_kw(x))
    return y


def elu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """elu(x), written into `out` (x's shape, any layout: a transposed view, say) when given."""
    if triton_enabled(x) and x.dim() <= 3:
        return elu_triton(x, out)
    return elu_ref(x) if out is None else out.copy_(elu_ref(x))
