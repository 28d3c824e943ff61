"""The one-row product: y = x W^T (times a per-output scale for an e4m3 W) for ONE row, streaming
W once over many programs with no split of K and so no second kernel; at batch 1 it beats
cuBLAS on every product of the 7B. What comes before a product may run in its launch (a
`Prologue`): the residual add and RMSNorm, the gated SiLU, the residual add alone, the
depformer's in-frame attention; every program redoes the prologue over the whole row, which
is cheap at one row and why several rows take a separate kernel instead."""
from __future__ import annotations

import enum
import math

import torch
import triton
import triton.language as tl

from ..common import gdc_launch_dependents, gdc_wait, pdl_kw, pow2
from ..step_attention import step_attention_chunk
from .e4m3 import FP8


class PrologueKind(enum.IntEnum):
    """What the one-row product does to its row first (`_one_row_kernel`'s PRO)."""
    NONE = 0            # the row as it is
    RMS_NORM = 1        # rms_norm(x + delta) * alpha
    SILU = 2            # silu(a) * g for x = [a | g]
    ADD = 3             # x + delta
    STEP_ATTENTION = 4  # the depformer's in-frame attention of x = qkv


# the kinds as the kernels compare them
_NONE, _RMS_NORM, _SILU, _ADD, _STEP_ATTENTION = (tl.constexpr(int(k)) for k in PrologueKind)


@triton.jit
def _row_chunk(x_ptr, d_ptr, d_on, a_ptr, kk, km, K, rstd, act, PRO: tl.constexpr, HAS_DELTA: tl.constexpr):
    """One chunk kk of the product's input row, in float32 (see `_one_row_kernel`'s PRO)."""
    if PRO == _RMS_NORM or PRO == _ADD:
        xv = tl.load(x_ptr + kk, mask=km, other=0.0)
        if HAS_DELTA != 0:
            dv = tl.load(d_ptr + kk, mask=km, other=0.0).to(tl.float32)
            if HAS_DELTA == 2:
                dv = tl.where(d_on, dv, 0.0)
            xv = (xv.to(tl.float32) + dv).to(act)
        if PRO == _RMS_NORM:
            al = tl.load(a_ptr + kk, mask=km, other=0.0).to(tl.float32)
            return (xv.to(tl.float32) * (al * rstd)).to(act).to(tl.float32)
        return xv.to(tl.float32)
    elif PRO == _SILU:
        a = tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)
        g = tl.load(x_ptr + K + kk, mask=km, other=0.0).to(tl.float32)
        sl = (a / (1.0 + tl.exp(-a))).to(act).to(tl.float32)
        return (sl * g).to(act).to(tl.float32)
    else:
        return tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)


@triton.jit
def _prologue_chunk(x_ptr, d_ptr, d_on, a_ptr, kk, km, K, rstd, act, sdm, step, eps, write,
                PRO: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                STEPS: tl.constexpr):
    if PRO == _STEP_ATTENTION:
        return step_attention_chunk(x_ptr, d_ptr, a_ptr, kk, K, sdm, step, eps, write, act, BLOCK_K, D, STEPS)
    else:
        return _row_chunk(x_ptr, d_ptr, d_on, a_ptr, kk, km, K, rstd, act, PRO, HAS_DELTA)


@triton.jit
def _one_row_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, swn, d_ptr, id_ptr, a_ptr, xo_ptr, eps, sdm, step,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr, PRO: tl.constexpr,
                 HAS_DELTA: tl.constexpr, D: tl.constexpr, STEPS: tl.constexpr, PDL: tl.constexpr,
                 VEC: tl.constexpr):
    # The row, made from x in the same launch (`Prologue`): Kinds of `PrologueKind`: NONE, x itself. RMS_NORM,
    # rms_norm(x + delta) * alpha, as `add_rms_norm` rounds it (program 0 also writes
    # x + delta to xo). SILU, for x = [a | g] (2K wide), silu(a) * g as `silu_mul`
    # rounds it. ADD, x + delta. HAS_DELTA 1: delta is a row; 2: the row `id` of a table
    # (id -1: none, other negatives: row 0, as `embedding_ref`). STEP_ATTENTION: the depformer's
    # in-frame attention (`step_attention.step_attention_chunk`; x the qkv row, d_ptr and a_ptr its k and v buffers,
    # sdm their step stride, eps the softmax scale).
    # PDL: launched as a programmatic dependent of the previous kernel, which may still run: the
    # first tile of W (the weights never depend on it) is loaded before waiting for it, and
    # nothing reads the row or writes anything before the wait.
    # VEC: the columns are taken as runs of VEC (0: as the compiler finds them), so that each
    # thread loads VEC values of W where it loads VEC of the row: for an e4m3 W (8-byte loads
    # beside the row's 16-byte ones) the row then needs no exchange through shared memory, which
    # otherwise cost barriers in every chunk.
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    act = xo_ptr.dtype.element_ty
    k_first = tl.arange(0, BLOCK_K)
    if VEC > 0:
        k_first = tl.max_contiguous(tl.multiple_of(k_first, VEC), VEC)
    w_first = tl.load(w_ptr + n[:, None] * swn + k_first[None, :], mask=nm[:, None] & (k_first < K)[None, :],
                      other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    d_on = True
    if HAS_DELTA == 2:
        idv = tl.load(id_ptr)
        d_ptr = d_ptr + tl.maximum(idv, 0).to(tl.int64) * sdm
        d_on = idv != -1
    rstd = 0.0
    if PRO == _RMS_NORM:
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            if HAS_DELTA != 0:
                dv = tl.load(d_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                if HAS_DELTA == 2:
                    dv = tl.where(d_on, dv, 0.0)
                xv = (xv.to(tl.float32) + dv).to(act)
                if pid == 0:
                    tl.store(xo_ptr + kk, xv, mask=kk < K)
            xf = xv.to(tl.float32)
            sq += xf * xf
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
    x = _prologue_chunk(x_ptr, d_ptr, d_on, a_ptr, k_first, k_first < K, K, rstd, act, sdm, step, eps, pid == 0,
                    PRO, HAS_DELTA, BLOCK_K, D, STEPS)
    acc = w_first.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if VEC > 0:
            kk = tl.max_contiguous(tl.multiple_of(kk, VEC), VEC)
        km = kk < K
        w = tl.load(w_ptr + n[:, None] * swn + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        x = _prologue_chunk(x_ptr, d_ptr, d_on, a_ptr, kk, km, K, rstd, act, sdm, step, eps, pid == 0,
                        PRO, HAS_DELTA, BLOCK_K, D, STEPS)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if SCALED:
        y = y * tl.load(s_ptr + n, mask=nm, other=0.0)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nm)


class Prologue:
    """A `PrologueKind` with its operands. `delta` is added first (RMS_NORM and ADD); with `ids`
    (one id), delta is an embedding table and the row adds delta[id] (id -1: nothing). RMS_NORM
    with a delta also returns x + delta. `Prologue.step_attention(k_buf, v_buf, step)`:
    STEP_ATTENTION over the frame's k and v buffers (it writes k and v at `step`)."""

    def __init__(self, kind: PrologueKind = PrologueKind.NONE, delta=None, ids=None, alpha=None, eps: float = 0.0):
        self.kind, self.delta, self.ids, self.alpha, self.eps = kind, delta, ids, alpha, eps
        self.step, self.head_dim, self.steps = 0, 1, 1

    @classmethod
    def step_attention(cls, k_buf: torch.Tensor, v_buf: torch.Tensor, step: int) -> "Prologue":
        B, S, H, D = k_buf.shape
        assert B == 1 and k_buf.is_contiguous() and v_buf.is_contiguous() and v_buf.shape == k_buf.shape
        p = cls(PrologueKind.STEP_ATTENTION, k_buf, alpha=v_buf, eps=1.0 / math.sqrt(D))
        p.step, p.head_dim, p.steps = step, D, pow2(S)
        return p

    def width(self, x: torch.Tensor) -> int:
        """The product's K for input x."""
        return x.shape[-1] // {PrologueKind.SILU: 2, PrologueKind.STEP_ATTENTION: 3}.get(self.kind, 1)

    def args(self, x2: torch.Tensor) -> tuple[list, dict, torch.Tensor]:
        """(kernel arguments d, id, alpha, xo, eps, sdm, step; constexprs; xo) for a row x2 [1, *]"""
        K = x2.shape[1]
        if self.kind == PrologueKind.STEP_ATTENTION:
            kb, vb = self.delta, self.alpha
            return [kb, x2, vb, x2, self.eps, kb.stride(1), self.step], \
                {"PRO": int(self.kind), "HAS_DELTA": 0, "D": self.head_dim, "STEPS": self.steps}, x2
        d, ids = self.delta, self.ids
        has = 0 if d is None else 2 if ids is not None else 1
        if has == 1:
            d = d.reshape(1, K)
        elif has == 2:
            assert d.dim() == 2 and d.shape[1] == K and ids.numel() == 1
            ids = ids.reshape(1).contiguous()
        assert d is None or d.stride(-1) == 1
        xo = torch.empty_like(x2) if self.kind == PrologueKind.RMS_NORM and d is not None else x2
        return [x2 if d is None else d, x2 if ids is None else ids, x2 if self.alpha is None else self.alpha, xo,
                self.eps, 0 if d is None else d.stride(0), 0], {"PRO": int(self.kind), "HAS_DELTA": has, "D": 1,
                                                                "STEPS": 1}, xo


def runs_of(w: torch.Tensor, x: torch.Tensor) -> int:
    """`_one_row_kernel`'s VEC: 8 for an e4m3 W and a 16-bit row (each thread then loads 8
    values of W where it loads 8 of the row, so the row needs no exchange through shared
    memory), else 0 (as the compiler finds them)."""
    return 8 if w.dtype == FP8 and x.element_size() == 2 else 0


def one_row(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, config=(8, 256, 4, 3),
            pro: Prologue | None = None, vec: int | None = None):
    """y = x W^T (times a per-output scale when given) for ONE row x: streams W once over many
    programs, with no split of K and so no second kernel. config: BLOCK_N, BLOCK_K, warps, stages.
    With a prologue (`Prologue`), returns (x or x + delta, y). vec: the columns' runs (default
    `runs_of`)."""
    pro0 = pro or Prologue()
    K = pro0.width(x)
    x2 = x.reshape(1, x.shape[-1])
    N = w.shape[0]
    assert w.stride(1) == 1 and x2.stride(-1) == 1 and w.shape[1] == K
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    BLOCK_N, BLOCK_K, warps, stages = config
    assert pro0.kind != PrologueKind.STEP_ATTENTION or BLOCK_K % pro0.head_dim == 0
    a, const, xo = pro0.args(x2)
    _one_row_kernel[(triton.cdiv(N, BLOCK_N),)](
        x2, w, scale if scale is not None else y, y, N, K, w.stride(0), *a, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        SCALED=scale is not None, num_warps=warps, num_stages=stages, VEC=runs_of(w, x2) if vec is None else vec,
        **const, **pdl_kw(x2))
    y = y.view(*x.shape[:-1], N)
    return y if pro is None else (xo.view(*x.shape[:-1], xo.shape[-1]), y)
