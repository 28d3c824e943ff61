"""RMSNorm in float32: y = x * alpha / sqrt(eps + mean(x^2)), cast back to x's dtype; and the
same fused with the residual add before it: x' = x + delta (rounded to x's dtype), y = rms(x')."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, pow2, rows2d, triton_enabled


def rms_norm_ref(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = eps + torch.mean(xf * xf, dim=-1, keepdim=True)
    return (xf * (alpha.float() * torch.rsqrt(var))).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float):
    x = x if delta is None else x + delta
    return x, rms_norm_ref(x, alpha, eps)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, xo_ptr, y_ptr, N, eps, sx, sd, sxo, sy,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * sd + offs, mask=m, other=0.0)
        # the residual add rounds to the activation dtype, as in the reference
        x = (x.to(tl.float32) + d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * sxo + offs, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N + eps
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = xf * (w * tl.rsqrt(var))
    tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)); with delta None, (x, rms_norm(x)). One launch."""
    N = x.shape[-1]
    x2 = rows2d(x)
    y = torch.empty_like(x2)
    xo = torch.empty_like(x2) if delta is not None else x2
    d2 = rows2d(delta) if delta is not None else x2
    nw = 4 if N <= 2048 else 8
    _add_rms_norm_kernel[(x2.shape[0],)](x2, d2, alpha, xo, y, N, eps, x2.stride(0), d2.stride(0), xo.stride(0),
                                         y.stride(0), HAS_DELTA=delta is not None, BLOCK=pow2(N),
                                         num_warps=nw, **pdl_kw(x2))
    return xo.view(x.shape), y.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta) * alpha); delta None: (x, rms_norm(x) * alpha)."""
    if triton_enabled(x):
        return add_rms_norm_triton(x, delta, alpha, eps)
    return add_rms_norm_ref(x, delta, alpha, eps)


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    return add_rms_norm(x, None, alpha, eps)[1]
