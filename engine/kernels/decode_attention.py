"""Decode attention of the temporal transformer: one query per slot against that slot's KV ring.

The ring holds position p at index p mod C (C = the window of keys a query sees), so after
writing position p the filled entries are 0 .. min(p + 1, C) - 1, exactly the keys p - C + 1 .. p
that a query at p may see:
    out[b, h] = softmax(q[b, h] . K[slot_b, h, :L_b]^T / sqrt(D)) V[slot_b, h, :L_b]
with L_b = min(pos_b + 1, C). In e4m3 rings each key and value vector has its own scale.
Given a page table, the rings are pages [pages, H, P, D] and ring entry i of slot s is row
i mod P of page table[s, i // P] (`state.PagedKV`); each tile of keys lies in one page.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import num_sms, pdl_kw, pdl_start, pow2, triton_enabled


def paged_rows(ring, slots, table, n):
    """Ring entries 0..n-1 of the slots, read through a page table from pages [pages, H, P,
    ...]: [B, H, n, ...]."""
    P = ring.shape[2]
    pages = table.index_select(0, slots)[:, :-(-n // P)]
    return ring[pages].transpose(1, 2).flatten(2, 3)[:, :, :n]


def decode_attention_ref(q, k_ring, v_ring, slots, lengths, k_scale=None, v_scale=None, table=None, window=None):
    """q: [B, H, D]; k_ring, v_ring: [S, H, C, D]; slots, lengths: [B] -> [B, H, D]. With
    scales ([S, H, C]) the rings are e4m3 and each vector is k8 * scale. With a page table
    ([S, pages per slot]) the rings are pages [pages, H, P, D] holding `window` entries a slot."""
    B, H, D = q.shape
    if table is not None:
        C = window
        pick = lambda t: paged_rows(t, slots, table, C)  # noqa: E731
    else:
        C = k_ring.shape[2]
        pick = lambda t: t.index_select(0, slots)  # noqa: E731
    k = pick(k_ring).float()
    v = pick(v_ring).float()
    if k_scale is not None:
        k = k * pick(k_scale).unsqueeze(-1)
        v = v * pick(v_scale).unsqueeze(-1)
    scores = torch.einsum("bhd,bhcd->bhc", q.float(), k) / math.sqrt(D)
    valid = torch.arange(C, device=q.device).view(1, 1, C) < lengths.view(B, 1, 1)
    scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhc,bhcd->bhd", p, v).to(q.dtype)


@triton.jit
def _attn_split_kernel(q_ptr, k_ring, v_ring, slot_ptr, len_ptr, o_ptr, m_ptr, l_ptr, ks_ptr, vs_ptr, tbl_ptr,
                       sq_b, sq_h, sr_slot, sr_h, sr_w, ss_slot, ss_h, st_slot, H, CHUNK, scale,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, QUANT: tl.constexpr,
                       PAGE: tl.constexpr, PDL: tl.constexpr):
    # PAGE > 0: keys n0 .. n0 + BLOCK_N - 1 (one tile) lie in page tbl[slot, n0 // PAGE]
    pdl_start(PDL)
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // H
    h = bh % H
    slot = tl.load(slot_ptr + b)
    L = tl.load(len_ptr + b)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, L)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32) * scale
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        if PAGE > 0:
            page = tl.load(tbl_ptr + slot * st_slot + n0 // PAGE)
            r = n0 % PAGE + tl.arange(0, BLOCK_N)
        else:
            page = slot
            r = n
        kbase = k_ring + page * sr_slot + h * sr_h
        vbase = v_ring + page * sr_slot + h * sr_h
        k = tl.load(kbase + r[:, None] * sr_w + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if QUANT:
            k = k * tl.load(ks_ptr + page * ss_slot + h * ss_h + r, mask=valid, other=0.0)[:, None]
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(vbase + r[:, None] * sr_w + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if QUANT:
            v = v * tl.load(vs_ptr + page * ss_slot + h * ss_h + r, mask=valid, other=0.0)[:, None]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = (b * H + h) * NSPLIT + sp
    tl.store(o_ptr + out * D + d, acc)
    tl.store(m_ptr + out + tl.arange(0, 1), m_i)
    tl.store(l_ptr + out + tl.arange(0, 1), l_i)


@triton.jit
def attn_combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, so_b, so_h, H,
                         D: tl.constexpr, NSPLIT: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    sp = tl.arange(0, NSPLIT)
    d = tl.arange(0, D)
    m = tl.load(m_ptr + bh * NSPLIT + sp)
    l = tl.load(l_ptr + bh * NSPLIT + sp)
    M = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - M), 0.0)
    o = tl.load(o_ptr + (bh * NSPLIT + sp)[:, None] * D + d[None, :])
    acc = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + b * so_b + h * so_h + d, acc.to(out_ptr.dtype.element_ty))


def attention_splits(batch: int, heads: int, window: int, device: torch.device, block_n: int = 128) -> int:
    """Enough key splits that batch x heads x splits programs fill the GPU many times over
    (on an H100 at 32 x 32 heads and 3 000 keys, 4 to 8 splits read at 2.8 TB/s)."""
    want = max(1, math.ceil(16 * num_sms(device) / (batch * heads)))
    return min(pow2(want), 32, pow2(triton.cdiv(window, block_n)))


# BLOCK_N, num_warps, num_stages of the split kernel (`benchmarks/tune_kernels.py`)
ATTN_CONFIG = (128, 4, 3)


def decode_attention_triton(q, k_ring, v_ring, slots, lengths, k_scale=None, v_scale=None, nsplit: int | None = None,
                            config=None, table=None, window=None):
    """`decode_attention_ref` in two launches: the keys split over programs (flash-decoding),
    then their partial results combined. nsplit: the splits (default `attention_splits`);
    config: (BLOCK_N, warps, stages), default ATTN_CONFIG (BLOCK_N at most a page)."""
    B, H, D = q.shape
    S, H2, P, D2 = k_ring.shape
    assert (H2, D2) == (H, D) and k_ring.is_contiguous() and v_ring.is_contiguous() and q.stride(-1) == 1
    BLOCK_N, warps, stages = config or ATTN_CONFIG
    W = P
    if table is not None:
        assert table.stride(1) == 1 and P & (P - 1) == 0
        W = window
        if table.shape[1] > 1:
            BLOCK_N = min(BLOCK_N, P)   # (a tile never spans two pages)
    nsplit = nsplit or attention_splits(B, H, W, q.device, BLOCK_N)
    chunk = triton.cdiv(triton.cdiv(W, nsplit), BLOCK_N) * BLOCK_N
    o = torch.empty(B * H * nsplit, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B * H * nsplit, device=q.device, dtype=torch.float32)
    l = torch.empty(B * H * nsplit, device=q.device, dtype=torch.float32)
    quant = k_scale is not None
    ks, vs = (k_scale, v_scale) if quant else (o, o)
    tbl = table if table is not None else slots
    _attn_split_kernel[(B * H, nsplit)](
        q, k_ring, v_ring, slots, lengths, o, m, l, ks, vs, tbl, q.stride(0), q.stride(1), k_ring.stride(0),
        k_ring.stride(1), k_ring.stride(2), ks.stride(0) if quant else 0, ks.stride(1) if quant else 0,
        tbl.stride(0), H, chunk, 1.0 / math.sqrt(D), D=D, BLOCK_N=BLOCK_N, NSPLIT=nsplit, QUANT=quant,
        PAGE=P if table is not None else 0, num_warps=warps, num_stages=stages, **pdl_kw(q))
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    attn_combine_kernel[(B * H,)](o, m, l, out, out.stride(0), out.stride(1), H, D=D, NSPLIT=nsplit,
                                   num_warps=1, **pdl_kw(q))
    return out


def decode_attention(q, k_ring, v_ring, slots, lengths, k_scale=None, v_scale=None, table=None, window=None):
    if triton_enabled(q):
        return decode_attention_triton(q, k_ring, v_ring, slots, lengths, k_scale, v_scale, table=table,
                                       window=window)
    return decode_attention_ref(q, k_ring, v_ring, slots, lengths, k_scale, v_scale, table, window)
