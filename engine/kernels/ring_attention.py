"""Mimi's transformer attention: T new queries per slot over the slot's KV ring of W entries,
each query seeing every held key at or before its position."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import num_sms, pdl_kw, pdl_start, pow2, triton_enabled
from .decode_attention import attn_combine_kernel


def ring_chunk_attention_ref(q, k_ring, v_ring, slots, end):
    """Attention of T new queries per slot (positions end - T .. end - 1, already written to
    the ring at p mod W) over a KV ring [S, H, W, D]: query p sees every held key at a
    position <= p, the ring holding end - W .. end - 1. q: [B, T, H, D] -> [B, T, H, D]."""
    B, T, H, D = q.shape
    W = k_ring.shape[2]
    idx = torch.arange(W, device=q.device).view(1, W)
    kpos = (end - 1).view(B, 1) - ((end - 1).view(B, 1) - idx) % W                    # [B, W]
    qpos = (end - T).view(B, 1) + torch.arange(T, device=q.device).view(1, T)          # [B, T]
    mask = (kpos >= 0).view(B, 1, 1, W) & (kpos.view(B, 1, 1, W) <= qpos.view(B, 1, T, 1))
    k = k_ring.index_select(0, slots).float()
    v = v_ring.index_select(0, slots).float()
    s = torch.einsum("bthd,bhwd->bhtw", q.float(), k) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("bhtw,bhwd->bthd", p, v).to(q.dtype)


@triton.jit
def _ring_chunk_attn_kernel(q_ptr, k_ring, v_ring, slot_ptr, end_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr, sq_b, sq_t, sq_h,
                            sr_slot, sr_h, sr_w, W, H, T, CHUNK, scale, D: tl.constexpr, BLOCK_W: tl.constexpr,
                            NSPLIT: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    # program (b, t, h) x split: the ring entries [split * CHUNK, (split + 1) * CHUNK); with one
    # split the output itself, else the split's running max, sum and weighted values for
    # `attn_combine_kernel` (row (b * T + t) * H + h)
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    t = pid % T
    bh = pid // T
    b = bh // H
    h = bh % H
    slot = tl.load(slot_ptr + b)
    end = tl.load(end_ptr + b)
    qpos = end - T + t
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + t * sq_t + h * sq_h + d).to(tl.float32) * scale
    kb = k_ring + slot * sr_slot + h * sr_h
    vb = v_ring + slot * sr_slot + h * sr_h
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    stop = tl.minimum(sp * CHUNK + CHUNK, W)
    for w0 in range(sp * CHUNK, stop, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        # the position held at ring index w: the latest p <= end - 1 with p = w (mod W)
        kpos = (end - 1) - (((end - 1) - w) % W + W) % W
        ok = (w < stop) & (kpos >= 0) & (kpos <= qpos)
        k = tl.load(kb + w[:, None] * sr_w + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        sc = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a block with no visible key
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(sc - m_use)
        v = tl.load(vb + w[:, None] * sr_w + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    if NSPLIT == 1:
        tl.store(o_ptr + b * sq_b + t * sq_t + h * sq_h + d, (acc / l_i).to(o_ptr.dtype.element_ty))
    else:
        row = ((b * T + t) * H + h) * NSPLIT + sp
        tl.store(po_ptr + row * D + d, acc)
        tl.store(pm_ptr + row + tl.arange(0, 1), m_i)
        tl.store(pl_ptr + row + tl.arange(0, 1), l_i)


def ring_config(programs: int, window: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_W, num_warps, splits) of the ring kernel. Fewer programs than twice the SMs: the
    ring split over more programs, 32 entries or more each, and a combining launch (at batch 1
    on an H200 one program per query and head read its 250 entries in 10 us); else one program
    per query and head, narrower blocks with many programs (`benchmarks/tune_kernels.py` on an
    H100: 26 us at batch 32)."""
    sms = num_sms(device)
    if programs >= 2 * sms or device.type != "cuda":  # (the interpreter: the fewest programs)
        return 128, 4, 1
    splits = min(pow2(triton.cdiv(2 * sms, programs)), pow2(triton.cdiv(window, 32)))
    return (32, 2, splits) if splits > 1 else (256, 8, 1)


def ring_chunk_attention_triton(q, k_ring, v_ring, slots, end, config=None):
    """`ring_chunk_attention_ref` in one launch (two when the ring is split over programs).
    config: (BLOCK_W, num_warps, splits), default `ring_config`."""
    B, T, H, D = q.shape
    W = k_ring.shape[2]
    assert q.is_contiguous() and k_ring.is_contiguous() and v_ring.is_contiguous()
    block, warps, nsplit = config or ring_config(B * H * T, W, q.device)
    assert nsplit == pow2(nsplit), "splits: a power of 2"
    block = min(block, pow2(W))
    chunk = triton.cdiv(triton.cdiv(W, nsplit), block) * block
    out = torch.empty_like(q)
    po = pm = pl = out  # (one split: the kernel writes `out` alone)
    if nsplit > 1:
        rows = B * T * H * nsplit
        po = torch.empty(rows, D, device=q.device, dtype=torch.float32)
        pm = torch.empty(rows, device=q.device, dtype=torch.float32)
        pl = torch.empty(rows, device=q.device, dtype=torch.float32)
    _ring_chunk_attn_kernel[(B * H * T, nsplit)](q, k_ring, v_ring, slots, end, out, po, pm, pl, q.stride(0),
                                                 q.stride(1), q.stride(2), k_ring.stride(0), k_ring.stride(1),
                                                 k_ring.stride(2), W, H, T, chunk, 1.0 / math.sqrt(D), D=D,
                                                 BLOCK_W=block, NSPLIT=nsplit, num_warps=warps, **pdl_kw(q))
    if nsplit > 1:
        # rows (b, t) of H heads: the output [B, T, H, D] viewed as [B * T, H, D]
        attn_combine_kernel[(B * T * H,)](po, pm, pl, out, H * D, D, H, D=D, NSPLIT=nsplit, num_warps=1,
                                           **pdl_kw(q))
    return out


def ring_chunk_attention(q, k_ring, v_ring, slots, end):
    if triton_enabled(q):
        return ring_chunk_attention_triton(q, k_ring, v_ring, slots, end)
    return ring_chunk_attention_ref(q, k_ring, v_ring, slots, end)
