"""Mimi's causal convolutions, streamed: a convolution's input is [tail | act(x)], the slot's
kept tail (the last inputs of its previous frame; for a fresh stream, its first input
repeated, the reference's replicate padding) before this frame's input, and the new tail is
written back in place. `conv_columns` lays the same input out as a product's columns (each
output's taps in a row), so the convolution is one matrix product (`mimi.Conv`) without
cuDNN's layout conversions."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, pow2, triton_enabled
from .elu import elu_f32, elu_ref


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


@triton.jit
def _conv_input_kernel(x_ptr, tail_ptr, slot_ptr, fresh_ptr, out_ptr, C, T, TAIL, NU, STRIDE, DIL, sxb, sxc, sxt, sts,
                       stc, sob, sou, soc, ACT: tl.constexpr, FRESH: tl.constexpr, KS: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, TAIL_P: tl.constexpr, PDL: tl.constexpr):
    # xx = [tail | act(x)] (length TAIL + T) of BLOCK_C channels, written as NU units of KS taps:
    # tap k of unit u is xx[u * STRIDE + k * DIL], stored at out + b sob + u sou + c soc + k (the
    # input itself: KS 1, STRIDE 1, NU = TAIL + T; a convolution's columns: KS its kernel, NU
    # its outputs). Program (b, channels, units) writes BLOCK_T units; only the units of block 0
    # read the kept tail (the launcher checks), so that block alone writes the new one, after
    # its own reads.
    pdl_start(PDL)
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ub = tl.program_id(2)
    cm = c < C
    slot = tl.load(slot_ptr + b)
    tb = tail_ptr + slot * sts + c[:, None] * stc
    xb = x_ptr + b * sxb + c[:, None] * sxc
    if FRESH:  # a fresh stream's tail: its first input, repeated
        fresh = tl.load(fresh_ptr + slot) != 0
        x0 = tl.load(xb, mask=cm[:, None], other=0.0)
    # the new tail, the last TAIL columns of [tail | act(x)], read before this row is written
    j = tl.arange(0, TAIL_P)
    src = T + j
    # (block 0 only; `j * 0 + ub` makes the test a tensor, which the interpreter needs in a mask)
    jm = cm[:, None] & ((j < TAIL) & (j * 0 + ub == 0))[None, :]
    nt_t = tl.load(tb + src[None, :], mask=jm & (src < TAIL)[None, :], other=0.0)
    if FRESH:
        nt_t = tl.where(fresh, x0, nt_t)
    nt_x = tl.load(xb + (src - TAIL)[None, :] * sxt, mask=jm & (src >= TAIL)[None, :], other=0.0).to(tl.float32)
    if ACT:
        nt_x = elu_f32(nt_x)
    nt = tl.where((src < TAIL)[None, :], nt_t, nt_x.to(nt_t.dtype))
    u = ub * BLOCK_T + tl.arange(0, BLOCK_T)
    um = u < NU
    for k in tl.static_range(KS):
        i = u * STRIDE + k * DIL
        ft = i < TAIL
        vt = tl.load(tb + i[None, :], mask=cm[:, None] & (ft & um)[None, :], other=0.0)
        if FRESH:
            vt = tl.where(fresh, x0, vt)
        vx = tl.load(xb + (i - TAIL)[None, :] * sxt, mask=cm[:, None] & (~ft & um)[None, :], other=0.0).to(tl.float32)
        if ACT:
            vx = elu_f32(vx)
        v = tl.where(ft[None, :], vt, vx.to(vt.dtype))
        tl.store(out_ptr + b * sob + c[:, None] * soc + u[None, :] * sou + k, v, mask=cm[:, None] & um[None, :])
    tl.debug_barrier()  # every read of the old tail (above, by any thread) before it is overwritten
    tl.store(tb + j[None, :], nt, mask=jm)


def _conv_input_launch(x, tail, slots, act, fresh, out, nu, ks, stride, dil, sob, sou, soc):
    B, C, T = x.shape
    TAIL = tail.shape[-1]
    assert tail.stride(-1) == 1 and tail.dtype == x.dtype and TAIL > 0
    assert not (fresh is not None and act), "a fresh stream repeats its raw first input"
    # blocks of units: 64 on a GPU, whole rows in the interpreter (fewer, larger programs)
    bt = min(pow2(nu), 64 if x.is_cuda else 1024)
    bc = min(pow2(C), max(1, (2048 if x.is_cuda else 1 << 16) // (bt * pow2(ks))))
    assert min(nu, triton.cdiv(TAIL, stride)) <= bt, "the units that read the kept tail: all in block 0"
    grid = (B, triton.cdiv(C, bc), triton.cdiv(nu, bt))
    _conv_input_kernel[grid](x, tail, slots, slots if fresh is None else fresh, out, C, T, TAIL, nu, stride, dil,
                             x.stride(0), x.stride(1), x.stride(2), tail.stride(0), tail.stride(1), sob, sou, soc,
                             ACT=act, FRESH=fresh is not None, KS=ks, BLOCK_C=bc, BLOCK_T=bt, TAIL_P=pow2(TAIL),
                             num_warps=4, **pdl_kw(x))
    return out


def conv_input_triton(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool,
                      fresh: torch.Tensor | None = None) -> torch.Tensor:
    """`conv_input_ref` in one launch."""
    B, C, T = x.shape
    L = tail.shape[-1] + T
    xx = torch.empty(B, C, L, device=x.device, dtype=x.dtype)
    return _conv_input_launch(x, tail, slots, act, fresh, xx, L, 1, 1, 1, xx.stride(0), 1, xx.stride(1))


def conv_columns_triton(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool, kernel: int,
                        stride: int, dilation: int, fresh: torch.Tensor | None = None) -> torch.Tensor:
    """`conv_columns_ref` in one launch."""
    B, C, T = x.shape
    TO = T // stride
    cols = torch.empty(B * TO, C * kernel, device=x.device, dtype=x.dtype)
    return _conv_input_launch(x, tail, slots, act, fresh, cols, TO, kernel, stride, dilation, TO * C * kernel,
                              C * kernel, kernel)


def conv_input(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool,
               fresh: torch.Tensor | None = None) -> torch.Tensor:
    if triton_enabled(x) and tail.stride(-1) == 1:
        return conv_input_triton(x, tail, slots, act, fresh)
    return conv_input_ref(x, tail, slots, act, fresh)


def conv_columns(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool, kernel: int, stride: int,
                 dilation: int, fresh: torch.Tensor | None = None) -> torch.Tensor:
    if triton_enabled(x) and tail.stride(-1) == 1:
        return conv_columns_triton(x, tail, slots, act, kernel, stride, dilation, fresh)
    return conv_columns_ref(x, tail, slots, act, kernel, stride, dilation, fresh)
