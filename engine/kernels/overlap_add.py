"""A transposed convolution with kernel 2 x stride, streamed, from its per-frame product: output
frame t is frame t's first half plus frame t - 1's second half (and the bias), the slot's kept
partial standing in for frame -1 and replaced by the last frame's second half."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, pow2, row_blocks, triton_enabled


def overlap_add_ref(y: torch.Tensor, partial: torch.Tensor, slots: torch.Tensor,
                    bias: torch.Tensor | None, channels_last: bool = False) -> torch.Tensor:
    """y: [B, T, C, 2s], frame t's product with the kernel; partial: [S, C, s], the rows of
    `slots` read and rewritten; bias: [C] or None. Returns [B, C, T * s] (channels_last: laid
    out [B, T * s, C] in memory)."""
    B, T, C, K = y.shape
    s = K // 2
    late = y[..., s:]                                   # frame t's part in frame t + 1
    if bias is not None:
        late = late + bias.view(1, 1, C, 1)
    prev = torch.cat([partial[slots].unsqueeze(1), late[:, :T - 1]], dim=1)
    partial[slots] = late[:, T - 1]
    out = (y[..., :s] + prev).permute(0, 2, 1, 3).reshape(B, C, T * s)
    return out.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else out


@triton.jit
def _overlap_add_kernel(y_ptr, part_ptr, slot_ptr, bias_ptr, out_ptr, C, T, S, syb, syt, syc, sps, spc, sob, soc, sot,
                        HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, S_P: tl.constexpr,
                        PDL: tl.constexpr):
    pdl_start(PDL)
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    slot = tl.load(slot_ptr + b)
    pb = part_ptr + slot * sps + c[:, None] * spc
    yb = y_ptr + b * syb + c[:, None] * syc
    # the new partial: the last frame's second half, plus the bias
    j = tl.arange(0, S_P)
    jm = cm[:, None] & (j < S)[None, :]
    npart = tl.load(yb + (T - 1) * syt + S + j[None, :], mask=jm, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=cm, other=0.0)[:, None]
        npart += bias
    L = T * S
    for o0 in range(0, L, BLOCK_T):
        o = o0 + tl.arange(0, BLOCK_T)
        t = o // S
        jj = o - t * S
        om = cm[:, None] & (o < L)[None, :]
        early = tl.load(yb + t[None, :] * syt + jj[None, :], mask=om, other=0.0)
        late = tl.load(yb + (t - 1)[None, :] * syt + S + jj[None, :], mask=om & (t > 0)[None, :], other=0.0)
        if HAS_BIAS:
            late += bias
        old = tl.load(pb + jj[None, :], mask=om & (t == 0)[None, :], other=0.0)
        tl.store(out_ptr + b * sob + c[:, None] * soc + o[None, :] * sot,
                 early + tl.where((t == 0)[None, :], old, late), mask=om)
    tl.debug_barrier()  # every read of the old partial before it is overwritten
    tl.store(pb + j[None, :], npart, mask=jm)


def overlap_add_triton(y: torch.Tensor, partial: torch.Tensor, slots: torch.Tensor,
                       bias: torch.Tensor | None, channels_last: bool = False) -> torch.Tensor:
    """`overlap_add_ref` in one launch."""
    B, T, C, K = y.shape
    S = K // 2
    assert y.stride(-1) == 1 and partial.stride(-1) == 1 and partial.shape[-1] == S
    if channels_last:
        out = torch.empty(B, T * S, C, device=y.device, dtype=y.dtype).transpose(1, 2)
    else:
        out = torch.empty(B, C, T * S, device=y.device, dtype=y.dtype)
    bc, bt = row_blocks(C, T * S, y)
    _overlap_add_kernel[(B, triton.cdiv(C, bc))](y, partial, slots, y if bias is None else bias, out, C, T, S,
                                                 y.stride(0), y.stride(1), y.stride(2), partial.stride(0),
                                                 partial.stride(1), out.stride(0), out.stride(1), out.stride(2),
                                                 HAS_BIAS=bias is not None, BLOCK_C=bc, BLOCK_T=bt, S_P=pow2(S),
                                                 num_warps=4, **pdl_kw(y))
    return out


def overlap_add(y: torch.Tensor, partial: torch.Tensor, slots: torch.Tensor,
                bias: torch.Tensor | None, channels_last: bool = False) -> torch.Tensor:
    if triton_enabled(y) and y.stride(-1) == 1 and partial.stride(-1) == 1:
        return overlap_add_triton(y, partial, slots, bias, channels_last)
    return overlap_add_ref(y, partial, slots, bias, channels_last)
