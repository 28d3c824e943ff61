"""The small-batch product: y = x W^T (times a per-output scale for an e4m3 W) for up to 64 rows
in one launch streaming W once, where cuBLAS splits K and adds a reduction kernel. Its variants,
which the calibration chooses among per shape (`calibration`): `tl.dot` tiles; for up to
FEW_ROWS rows, multiply-adds on the CUDA cores instead (tl.dot pads the rows to 16); K split in
parts whose float32 partial sums a second kernel adds in order (a W of few rows fills the GPU);
and for a prefill's many rows against an e4m3 W, blocks of rows side by side."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import gdc_launch_dependents, gdc_wait, pdl_kw, pdl_start, pow2
from . import e4m3
from .e4m3 import e4m3_as

MAX_ROWS = 64   # rows up to which the kernel runs as one block (a prefill's more: in blocks)
FEW_ROWS = 4    # rows up to which it may multiply without tl.dot


@triton.jit
def _rows_linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, sxm, swn, sym, KC,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr,
                        IEEE: tl.constexpr, FMA: tl.constexpr, GELU: tl.constexpr, PDL: tl.constexpr,
                        FAST8: tl.constexpr, M_FAST: tl.constexpr):
    # IEEE: float32 rows and W, multiplied in full float32 (as cuBLAS does by default), not TF32.
    # FMA: for a few rows (BLOCK_M of them, unpadded), products and sums in float32 on the CUDA
    # cores instead of `tl.dot`, whose tiles pad the rows to 16 (and in full float32 are slow).
    # PDL: as in `_one_row_kernel`, the first tile of W is loaded before waiting for the kernel before.
    # GELU: the exact (erf) GELU of the product, in float32, as torch's gelu computes it.
    # FAST8: W is e4m3 and the rows bfloat16; tl.dot's tiles of W are decoded by moving bits
    # (`_e4m3_bf16`).
    # KC: the columns of K each program along axis 2 sums (KC = K but for a split of K: then y is
    # the float32 partial sums [splits, M, N], unscaled, which `_split_sum_kernel` adds).
    # M_FAST: the blocks of rows (a prefill's) are the grid's first axis, so the programs that
    # read one tile of W run together (and may share it through L2).
    if M_FAST:
        pid_n, pid_m = tl.program_id(1), tl.program_id(0)
    else:
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (one block of rows but for a prefill)
    k_lo = tl.program_id(2) * KC
    k_hi = tl.minimum(k_lo + KC, K)
    k_first = k_lo + tl.arange(0, BLOCK_K)
    w_first = tl.load(w_ptr + n[:, None] * swn + k_first[None, :],
                      mask=(n[:, None] < N) & (k_first[None, :] < k_hi), other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(x_ptr + mm[:, None] * sxm + k_first[None, :], mask=(mm[:, None] < M) & (k_first[None, :] < k_hi),
                other=0.0)
    # (e4m3 -> the activation dtype is exact)
    if FMA:
        acc3 = x.to(tl.float32)[:, None, :] * w_first.to(x.dtype).to(tl.float32)[None, :, :]
    elif IEEE:
        acc = tl.dot(x, tl.trans(w_first.to(x.dtype)), input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(e4m3_as(w_first, x.dtype, FAST8)))
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n[:, None] * swn + kk[None, :], mask=(n[:, None] < N) & (kk[None, :] < k_hi), other=0.0)
        x = tl.load(x_ptr + mm[:, None] * sxm + kk[None, :], mask=(mm[:, None] < M) & (kk[None, :] < k_hi),
                    other=0.0)
        if FMA:
            acc3 += x.to(tl.float32)[:, None, :] * w.to(x.dtype).to(tl.float32)[None, :, :]
        elif IEEE:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(e4m3_as(w, x.dtype, FAST8)))
    if FMA:
        acc = tl.sum(acc3, axis=2)
    if SCALED:
        acc = acc * tl.load(s_ptr + n, mask=n < N, other=0.0)[None, :]
    if GELU:
        acc = (acc * 0.5) * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    y_ptr += tl.program_id(2).to(tl.int64) * M * sym
    tl.store(y_ptr + mm[:, None] * sym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(mm[:, None] < M) & (n[None, :] < N))


@triton.jit
def _split_sum_kernel(p_ptr, s_ptr, y_ptr, MN, N, SPLITS: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    """y [M, N] = the sum of the partial products p [SPLITS, M, N] in order (times the scale)."""
    pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < MN
    acc = tl.load(p_ptr + offs, mask=m, other=0.0)
    for i in tl.static_range(1, SPLITS):
        acc += tl.load(p_ptr + i * MN + offs, mask=m, other=0.0)
    if SCALED:
        acc = acc * tl.load(s_ptr + offs % N, mask=m, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=m)




def rows_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, config=(16, 256, 4, 3),
                fma: bool = False, gelu: bool = False, splits: int = 1, block_m: int | None = None,
                m_fast: bool = False, fast_e4m3: bool | None = None):
    """y = x W^T (times a per-output scale for an e4m3 W) for up to 64 rows: one launch streaming W
    once, where cuBLAS splits K and adds a reduction kernel. config: BLOCK_N, BLOCK_K, warps,
    stages. Float32 rows and W multiply in full float32. fma: for up to FEW_ROWS rows, without
    `tl.dot` (`_rows_linear_kernel`'s FMA). More rows (a prefill's, against an e4m3 W) run in
    blocks of 64 (or block_m), side by side. gelu: y is the exact GELU of the product (a float32
    product's, as `F.gelu` of it). splits: K is split in
    that many parts, each summed by its own programs into float32 partials that a second kernel
    adds, so a W of few rows (4096, as the out and down projections') fills the GPU. block_m: the
    rows a program takes (default: all up to 64, padded to 16); m_fast: the blocks of rows as the
    grid's first axis (`_rows_linear_kernel`'s M_FAST), for a prefill's many rows. fast_e4m3:
    an e4m3 W's tiles decoded by moving bits (default: where `e4m3.fast_e4m3` allows it)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], w.shape[0]
    assert w.stride(1) == 1 and x2.stride(1) == 1 and w.shape[1] == K
    assert scale is None or scale.is_contiguous()
    assert not fma or M <= FEW_ROWS
    assert splits == 1 or not (fma or gelu)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    BLOCK_N, BLOCK_K, warps, stages = config
    if block_m is None:
        block_m = min(MAX_ROWS, pow2(M) if fma else max(16, pow2(M)))
    assert not fma or block_m >= M
    kc = triton.cdiv(triton.cdiv(K, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(K, kc)
    out = y if splits == 1 else torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
    scaled = scale is not None and splits == 1
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, block_m), splits)
    _rows_linear_kernel[(grid[1], grid[0], splits) if m_fast else grid](
        x2, w, scale if scaled else y, out, M, N, K, x2.stride(0), w.stride(0), out.stride(-2), kc,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SCALED=scaled,
        IEEE=x.dtype == torch.float32, FMA=fma, GELU=gelu, num_warps=warps, num_stages=stages,
        FAST8=(e4m3.fast_e4m3(w, x) if fast_e4m3 is None else fast_e4m3) and not fma, M_FAST=m_fast,
        **pdl_kw(x2))
    if splits > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(M * N, block),)](out, scale if scale is not None else y, y, M * N, N,
                                                        SPLITS=splits, SCALED=scale is not None, BLOCK=block,
                                                        num_warps=4, **pdl_kw(x2))
    return y.view(*x.shape[:-1], N)
