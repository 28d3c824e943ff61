"""Mimi's LayerNorm, fused with the layer-scaled residual add in front of it:
x' = x + scale * delta (the product rounded to x's dtype, then the sum, as torch computes
them), y = (x' - mean) / sqrt(var + eps) * weight + bias, in float32, cast back to x's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .common import pdl_kw, pdl_start, pow2, rows2d, triton_enabled


def scale_add_layer_norm_ref(x: torch.Tensor, delta: torch.Tensor | None, scale: torch.Tensor | None,
                             weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """(x + scale * delta, layer_norm of it); delta None: (x, layer_norm(x)); weight None: no
    norm, (x + scale * delta, None)."""
    if delta is not None:
        x = x + scale * delta
    if weight is None:
        return x, None
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@triton.jit
def _scale_add_ln_kernel(x_ptr, d_ptr, s_ptr, w_ptr, b_ptr, xo_ptr, y_ptr, N, eps, sx, sd, sxo, sy,
                         HAS_DELTA: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr, RN_MUL: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * sd + offs, mask=m, other=0.0)
        sc = tl.load(s_ptr + offs, mask=m, other=0.0)
        # scale * delta rounds to x's dtype, then the sum does, as torch computes them (mul_rn:
        # a rounded product the compiler may not contract with the add into one FMA)
        if RN_MUL:
            t = libdevice.mul_rn(sc.to(tl.float32), d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        else:  # the interpreter (numpy) never contracts
            t = (sc.to(tl.float32) * d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        x = (x.to(tl.float32) + t.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * sxo + offs, x, mask=m)
    if NORM:
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / N
        c = tl.where(m, xf - mean, 0.0)
        var = tl.sum(c * c, axis=0) / N
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = c * tl.rsqrt(var + eps) * w + b
        tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def scale_add_layer_norm_triton(x, delta, scale, weight, bias, eps: float):
    """`scale_add_layer_norm_ref` in one launch."""
    N = x.shape[-1]
    x2 = rows2d(x)
    d2 = rows2d(delta) if delta is not None else x2
    xo = torch.empty_like(x2) if delta is not None else x2
    norm = weight is not None
    y = torch.empty_like(x2) if norm else xo
    nw = 4 if N <= 2048 else 8
    _scale_add_ln_kernel[(x2.shape[0],)](x2, d2, scale if delta is not None else x2, weight if norm else x2,
                                         bias if norm else x2, xo, y, N, eps, x2.stride(0), d2.stride(0),
                                         xo.stride(0), y.stride(0), HAS_DELTA=delta is not None, NORM=norm,
                                         BLOCK=pow2(N), RN_MUL=x.is_cuda, num_warps=nw, **pdl_kw(x2))
    return xo.view(x.shape), (y.view(x.shape) if norm else None)


def scale_add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, scale: torch.Tensor | None,
                         weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    if (triton_enabled(x) and x.stride(-1) == 1 and (delta is None or delta.stride(-1) == 1)
            and (weight is None or bias is not None)):
        return scale_add_layer_norm_triton(x, delta, scale, weight, bias, eps)
    return scale_add_layer_norm_ref(x, delta, scale, weight, bias, eps)
