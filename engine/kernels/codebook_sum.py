"""The Mimi decoder's input from a frame's codes: a sum of rows of the centroids' output
projections (precomputed per codebook), times the channel-wise upsampling kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, pow2, triton_enabled


def codebook_sum_ref(codes: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes: [B, n] (may be strided; clamped to the tables' rows); tables: [n, bins, D];
    scale: [D, K] -> [B, D, K] = (sum over k of tables[k, codes[:, k]]) x scale."""
    n, bins, D = tables.shape
    ids = codes.clamp(0, bins - 1) + bins * torch.arange(n, device=codes.device)
    return F.embedding(ids, tables.reshape(n * bins, D)).sum(dim=1).unsqueeze(-1) * scale


@triton.jit
def _codebook_sum_kernel(code_ptr, tab_ptr, sc_ptr, out_ptr, NCB, BINS, D, K, scb, sck,
                         BLOCK_D: tl.constexpr, K_P: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(NCB):
        c = tl.minimum(tl.maximum(tl.load(code_ptr + b * scb + k * sck), 0), BINS - 1)
        acc += tl.load(tab_ptr + (k * BINS + c) * D + d, mask=dm, other=0.0).to(tl.float32)
    j = tl.arange(0, K_P)
    m = dm[:, None] & (j < K)[None, :]
    sc = tl.load(sc_ptr + d[:, None] * K + j[None, :], mask=m, other=0.0)
    y = acc.to(sc.dtype)[:, None] * sc
    tl.store(out_ptr + (b * D + d[:, None]) * K + j[None, :], y, mask=m)


def codebook_sum_triton(codes: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`codebook_sum_ref` in one launch."""
    B, n = codes.shape
    n2, bins, D = tables.shape
    K = scale.shape[-1]
    assert n == n2 and tables.is_contiguous() and scale.is_contiguous() and scale.shape == (D, K)
    out = torch.empty(B, D, K, device=tables.device, dtype=tables.dtype)
    block = min(pow2(D), 128)
    _codebook_sum_kernel[(B, triton.cdiv(D, block))](codes, tables, scale, out, n, bins, D, K, codes.stride(0),
                                                      codes.stride(1), BLOCK_D=block, K_P=pow2(K), num_warps=4,
                                                      **pdl_kw(tables))
    return out


def codebook_sum(codes: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if triton_enabled(tables) and tables.is_contiguous() and scale.is_contiguous():
        return codebook_sum_triton(codes, tables, scale)
    return codebook_sum_ref(codes, tables, scale)
