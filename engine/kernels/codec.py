"""Mimi's streaming steps, each one launch on a GPU instead of the several small torch ops
(gathers, cats, scatters, elementwise ops) that dominated the codec's part of a tick at small
batch sizes.

- `conv_input`: a causal convolution's input, [tail | act(x)], with the slot's kept tail read
  (or, for a fresh stream, its first input repeated) and its new tail (the last `tail`
  columns) written back in place.
- `conv_columns`: the same input as a product's columns (each output's taps in a row), so that
  the convolution is one matrix product (`mimi.Conv`), without cuDNN's layout conversions.
- `overlap_add`: a transposed convolution with kernel 2 x stride from its per-frame product:
  frame t's first half plus frame t - 1's second half (and the bias), the slot's kept partial
  standing in for frame -1 and replaced by the last frame's second half.
- `rvq_step`: one codebook of the residual VQ: the nearest centroid by |e|^2 - 2 x.e from the
  product x.e and the precomputed |e|^2 (the first of equal distances, as torch's argmin), and
  the residual x - e.
- `codebook_sum`: a frame's latent from its codes, as a sum of rows of the centroids'
  projections, times the channel-wise upsampling kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import elu_ref
from .dispatch import triton_enabled


def conv_input_ref(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool,
                   fresh: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, C, T]; tail: [S, C, tail], the rows of `slots` read and rewritten. Returns
    [B, C, tail + T] = [tail[slots] | elu(x) if act else x]. fresh: [S] bool, where set the
    slot's tail is x's first column repeated instead (the reference's replicate padding of
    its first call; not with act)."""
    t = tail[slots]
    if fresh is not None:
        t = torch.where(fresh[slots].view(-1, 1, 1), x[..., :1].expand_as(t), t)
    xx = torch.cat([t, elu_ref(x) if act else x], dim=-1)
    tail[slots] = xx[..., xx.shape[-1] - tail.shape[-1]:]
    return xx


def conv_input(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool,
               fresh: torch.Tensor | None = None) -> torch.Tensor:
    if triton_enabled(x) and tail.stride(-1) == 1:
        from . import triton_ops
        return triton_ops.conv_input(x, tail, slots, act, fresh)
    return conv_input_ref(x, tail, slots, act, fresh)


def conv_columns_ref(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool, kernel: int, stride: int,
                     dilation: int, fresh: torch.Tensor | None = None) -> torch.Tensor:
    """The causal convolution's input `conv_input_ref(x, tail, slots, act, fresh)` as the
    product's columns: [B * T', C * kernel] with row b * T' + t holding, channel by channel, the
    kernel's taps of output t (input t * stride + k * dilation), T' = T / stride outputs. The
    convolution is then cols @ W.view(out, C * kernel)^T."""
    B, C, T = x.shape
    xx = conv_input_ref(x, tail, slots, act, fresh)
    span = (kernel - 1) * dilation + 1
    win = xx.unfold(2, span, stride)[..., ::dilation]            # [B, C, T', kernel]
    return win.permute(0, 2, 1, 3).reshape(B * win.shape[2], C * kernel)


def conv_columns(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool, kernel: int, stride: int,
                 dilation: int, fresh: torch.Tensor | None = None) -> torch.Tensor:
    if triton_enabled(x) and tail.stride(-1) == 1:
        from . import triton_ops
        return triton_ops.conv_columns(x, tail, slots, act, kernel, stride, dilation, fresh)
    return conv_columns_ref(x, tail, slots, act, kernel, stride, dilation, fresh)


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


def overlap_add(y: torch.Tensor, partial: torch.Tensor, slots: torch.Tensor,
                bias: torch.Tensor | None, channels_last: bool = False) -> torch.Tensor:
    if triton_enabled(y) and y.stride(-1) == 1 and partial.stride(-1) == 1:
        from . import triton_ops
        return triton_ops.overlap_add(y, partial, slots, bias, channels_last)
    return overlap_add_ref(y, partial, slots, bias, channels_last)


def rvq_step_ref(x: torch.Tensor, scores: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor,
                 codes: torch.Tensor) -> torch.Tensor:
    """x: [B, D] residual; scores: [B, N] = x @ codebook^T; norms: [N] = |codebook|^2. Writes
    the nearest centroid's index to codes ([B], may be a strided column) and returns x - e."""
    c = (norms.view(1, -1) - 2 * scores).argmin(dim=-1)
    codes.copy_(c)
    return x - codebook[c]


def rvq_step(x: torch.Tensor, scores: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor,
             codes: torch.Tensor) -> torch.Tensor:
    if triton_enabled(x) and x.stride(-1) == 1 and scores.stride(-1) == 1 and codebook.is_contiguous():
        from . import triton_ops
        return triton_ops.rvq_step(x, scores, norms, codebook, codes)
    return rvq_step_ref(x, scores, norms, codebook, codes)


def codebook_sum_ref(codes: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes: [B, n] (may be strided; clamped to the tables' rows); tables: [n, bins, D];
    scale: [D, K] -> [B, D, K] = (sum over k of tables[k, codes[:, k]]) x scale."""
    n, bins, D = tables.shape
    ids = codes.clamp(0, bins - 1) + bins * torch.arange(n, device=codes.device)
    return F.embedding(ids, tables.reshape(n * bins, D)).sum(dim=1).unsqueeze(-1) * scale


def codebook_sum(codes: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if triton_enabled(tables) and tables.is_contiguous() and scale.is_contiguous():
        from . import triton_ops
        return triton_ops.codebook_sum(codes, tables, scale)
    return codebook_sum_ref(codes, tables, scale)
