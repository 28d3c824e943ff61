"""The gated SiLU of the feed-forward blocks: y = silu(a) * b for x = [a | b] on the last dim
(silu rounded to x's dtype before the product, as torch computes it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, pow2, rows2d, triton_enabled


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return F.silu(x[..., :h]) * x[..., h:]


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, N, sx, sy, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + row * sx + N + offs, mask=m, other=0.0).to(tl.float32)
    # silu rounds to the activation dtype before the product, as torch computes it
    s = (a / (1.0 + tl.exp(-a))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * sy + offs, (s * g).to(y_ptr.dtype.element_ty), mask=m)


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    N = x.shape[-1] // 2
    x2 = rows2d(x)
    y = torch.empty(x2.shape[0], N, device=x.device, dtype=x.dtype)
    BLOCK = min(pow2(N), 1024)
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(N, BLOCK))](x2, y, N, x2.stride(0), y.stride(0), BLOCK=BLOCK,
                                                            num_warps=4, **pdl_kw(x2))
    return y.view(*x.shape[:-1], N)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_mul_triton(x) if triton_enabled(x) else silu_mul_ref(x)
