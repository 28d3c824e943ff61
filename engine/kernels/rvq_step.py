"""One codebook of Mimi's residual vector quantizer: the nearest centroid by |e|^2 - 2 x.e, from
the product x.e and the precomputed |e|^2 (the first of equal distances, as torch's argmin),
and the residual x - e."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, pow2, triton_enabled


def rvq_step_ref(x: torch.Tensor, scores: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor,
                 codes: torch.Tensor) -> torch.Tensor:
    """x: [B, D] residual; scores: [B, N] = x @ codebook^T; norms: [N] = |codebook|^2. Writes
    the nearest centroid's index to codes ([B], may be a strided column) and returns x - e."""
    c = (norms.view(1, -1) - 2 * scores).argmin(dim=-1)
    codes.copy_(c)
    return x - codebook[c]


@triton.jit
def _rvq_step_kernel(x_ptr, s_ptr, n_ptr, cb_ptr, xo_ptr, code_ptr, N, D, sx, ss, sxo, scode,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    b = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    s = tl.load(s_ptr + b * ss + n, mask=nm, other=0.0)
    d = tl.where(nm, tl.load(n_ptr + n, mask=nm, other=0.0) - 2.0 * s, float("inf"))
    c = tl.argmin(d, axis=0, tie_break_left=True)
    tl.store(code_ptr + b * scode, c.to(tl.int64))
    k = tl.arange(0, BLOCK_D)
    km = k < D
    x = tl.load(x_ptr + b * sx + k, mask=km, other=0.0)
    e = tl.load(cb_ptr + c * D + k, mask=km, other=0.0)
    tl.store(xo_ptr + b * sxo + k, x - e, mask=km)


def rvq_step_triton(x: torch.Tensor, scores: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor,
                    codes: torch.Tensor) -> torch.Tensor:
    """`rvq_step_ref` in one launch."""
    B, D = x.shape
    N = codebook.shape[0]
    assert x.stride(-1) == 1 and scores.stride(-1) == 1 and codebook.is_contiguous() and norms.is_contiguous()
    assert codes.dtype == torch.long and codes.shape == (B,)
    out = torch.empty_like(x)
    _rvq_step_kernel[(B,)](x, scores, norms, codebook, out, codes, N, D, x.stride(0), scores.stride(0),
                           out.stride(0), codes.stride(0), BLOCK_N=pow2(N), BLOCK_D=pow2(D),
                           num_warps=8 if N >= 1024 else 4, **pdl_kw(x))
    return out


def rvq_step(x: torch.Tensor, scores: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor,
             codes: torch.Tensor) -> torch.Tensor:
    if triton_enabled(x) and x.stride(-1) == 1 and scores.stride(-1) == 1 and codebook.is_contiguous():
        return rvq_step_triton(x, scores, norms, codebook, codes)
    return rvq_step_ref(x, scores, norms, codebook, codes)
