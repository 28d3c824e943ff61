"""Rotary embedding on interleaved pairs (x[2i], x[2i+1]), computed in float32.

For pair i of a head of size D at position t: angle = t * max_period^(-2i/D),
(a, b) -> (a cos - b sin, a sin + b cos), cast back to the input dtype.
`qkv_rope_write` fuses it with the decode step's KV-ring write: q and k rotated, k and v
stored at [slot, :, ring_idx] of one layer's rings (or, given a page table, at [table[slot,
ring_idx // P], :, ring_idx % P] of its pages of P entries), rotated q returned.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..quant import quantize_rows
from .common import pdl_kw, pdl_start, pow2, triton_enabled


def rope_freqs_ref(D: int, max_period: float, device) -> torch.Tensor:
    ds = torch.arange(D // 2, device=device, dtype=torch.float32)
    return torch.exp(ds * (-math.log(max_period) * 2 / D))


def rope_ref(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, max_period: float):
    """q, k: [N, H, D]; pos: [N] (int). Returns the rotated q and k."""
    N, H, D = q.shape
    freqs = rope_freqs_ref(D, max_period, q.device)
    angle = pos.float().view(N, 1, 1) * freqs.view(1, 1, -1)
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rot(x):
        xr = x.view(N, -1, D // 2, 2)
        a, b = xr[..., 0].float(), xr[..., 1].float()
        out = torch.stack([(a * cos - b * sin).to(x.dtype), (a * sin + b * cos).to(x.dtype)], dim=-1)
        return out.view(N, -1, D)

    return rot(q), rot(k)


def _kernel_takes(qkv: torch.Tensor) -> bool:
    """Whether the rope-and-write kernel runs for this projection: Triton on, and a head of 2^n
    pairs (its block); otherwise the reference does."""
    return triton_enabled(qkv) and qkv.shape[-1] // 2 == pow2(qkv.shape[-1] // 2)


def rope_qkv(qkv: torch.Tensor, pos: torch.Tensor, max_period: float):
    """qkv: [N, 3, H, D] (a projection's output) -> rotated q, rotated k and v, each [N, H, D],
    as `rope_ref` rounds them. On a GPU one launch: the decode step's rope-and-write kernel,
    writing k and v into a one-entry "ring" per row."""
    if _kernel_takes(qkv):
        N, _, H, D = qkv.shape
        k = torch.empty(N, H, 1, D, device=qkv.device, dtype=qkv.dtype)
        v = torch.empty_like(k)
        rows = torch.arange(N, device=qkv.device)
        q = qkv_rope_write_triton(qkv, pos, max_period, rows, torch.zeros_like(rows), k, v)
        return q, k.view(N, H, D), v.view(N, H, D)
    q, k = rope_ref(qkv[:, 0], qkv[:, 1], pos, max_period)
    return q, k, qkv[:, 2]


def _rows_of(pos, slots, ring_idx, per: int, window: int):
    """Each row's (position, slot, ring index) when pos and slots are given per `per` rows (row r:
    position pos[r // per] + r % per) and the ring index is the position mod the window."""
    if per > 1:
        pos = (pos.view(-1, 1) + torch.arange(per, device=pos.device).view(1, per)).view(-1)
        slots = slots.repeat_interleave(per)
    return pos, slots, (pos % window if ring_idx is None else ring_idx)


def qkv_rope_write_ref(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale=None, v_scale=None, per=1,
                       table=None):
    """qkv: [B, 3, H, D]; k_ring, v_ring: [S, H, W, D] of one layer. Returns rotated q [B, H, D].
    With scales ([S, H, W]), the rings are e4m3: each stored vector is quantized with its own.
    ring_idx None: each row's position mod W. per > 1: pos and slots hold one entry per `per`
    consecutive rows, row r at position pos[r // per] + r % per (a chunk of positions per slot).
    table ([S, pages per slot], with ring_idx given): k_ring and v_ring are pages [pages, H, P,
    D] and ring entry i of slot s is row i mod P of page table[s, i // P]."""
    pos, slots, ring_idx = _rows_of(pos, slots, ring_idx, per, k_ring.shape[2])
    q, k = rope_ref(qkv[:, 0], qkv[:, 1], pos, max_period)
    v = qkv[:, 2]
    if table is not None:
        P = k_ring.shape[2]
        slots, ring_idx = table[slots, ring_idx // P], ring_idx % P
    if k_scale is not None:
        (k, ks), (v, vs) = quantize_rows(k), quantize_rows(v)
        k_scale[slots, :, ring_idx] = ks
        v_scale[slots, :, ring_idx] = vs
    k_ring[slots, :, ring_idx] = k.to(k_ring.dtype)
    v_ring[slots, :, ring_idx] = v.to(v_ring.dtype)
    return q


@triton.jit
def _qkv_rope_write_kernel(qkv_ptr, pos_ptr, slot_ptr, ridx_ptr, q_ptr, k_ring, v_ring, freq_ptr, ks_ptr, vs_ptr,
                           tbl_ptr, s_b, s_h, sq_b, sq_h, sr_slot, sr_h, sr_w, ss_slot, ss_h, st_slot, HD, PER, W,
                           HALF: tl.constexpr, QUANT: tl.constexpr, RIDX: tl.constexpr, PAGE: tl.constexpr,
                           PDL: tl.constexpr):
    # row b: position pos[b // PER] + b % PER of slot slots[b // PER]; its ring entry ridx[b]
    # (RIDX), else the position mod W; PAGE > 0: entry r is row r % PAGE of page tbl[slot, r // PAGE]
    pdl_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    p = tl.load(pos_ptr + b // PER) + b % PER
    pos = p.to(tl.float32)
    # the same float32 angle as the reference: far into a session (p ~ 1e4) one ulp of a
    # frequency would already move it by 1e-3 rad
    ang = pos * tl.load(freq_ptr + i)
    c = tl.cos(ang)
    s = tl.sin(ang)
    base = qkv_ptr + b * s_b + h * s_h
    qa = tl.load(base + 2 * i).to(tl.float32)
    qb = tl.load(base + 2 * i + 1).to(tl.float32)
    ka = tl.load(base + HD + 2 * i).to(tl.float32)
    kb = tl.load(base + HD + 2 * i + 1).to(tl.float32)
    va = tl.load(base + 2 * HD + 2 * i)
    vb = tl.load(base + 2 * HD + 2 * i + 1)
    qo = q_ptr + b * sq_b + h * sq_h
    tl.store(qo + 2 * i, (qa * c - qb * s).to(q_ptr.dtype.element_ty))
    tl.store(qo + 2 * i + 1, (qa * s + qb * c).to(q_ptr.dtype.element_ty))
    slot = tl.load(slot_ptr + b // PER)
    if RIDX:
        r = tl.load(ridx_ptr + b)
    else:
        r = p % W
    if PAGE > 0:
        slot = tl.load(tbl_ptr + slot * st_slot + r // PAGE)
        r = r % PAGE
    off = slot * sr_slot + h * sr_h + r * sr_w
    # k is rounded to the activation dtype first, as the reference's rope returns it
    kra = (ka * c - kb * s).to(q_ptr.dtype.element_ty).to(tl.float32)
    krb = (ka * s + kb * c).to(q_ptr.dtype.element_ty).to(tl.float32)
    if QUANT:
        va = va.to(tl.float32)
        vb = vb.to(tl.float32)
        kscale = tl.maximum(tl.maximum(tl.max(tl.abs(kra), 0), tl.max(tl.abs(krb), 0)), 1e-12) / 448.0
        vscale = tl.maximum(tl.maximum(tl.max(tl.abs(va), 0), tl.max(tl.abs(vb), 0)), 1e-12) / 448.0
        kra = kra / kscale
        krb = krb / kscale
        va = va / vscale
        vb = vb / vscale
        soff = slot * ss_slot + h * ss_h + r
        tl.store(ks_ptr + soff, kscale)
        tl.store(vs_ptr + soff, vscale)
    tl.store(k_ring + off + 2 * i, kra.to(k_ring.dtype.element_ty))
    tl.store(k_ring + off + 2 * i + 1, krb.to(k_ring.dtype.element_ty))
    tl.store(v_ring + off + 2 * i, va.to(v_ring.dtype.element_ty))
    tl.store(v_ring + off + 2 * i + 1, vb.to(v_ring.dtype.element_ty))


_FREQS: dict = {}


def rope_freqs(D: int, max_period: float, device) -> torch.Tensor:
    """`rope_freqs_ref`, computed once per (D, period, device)."""
    key = (D, max_period, str(device))
    if key not in _FREQS:
        _FREQS[key] = rope_freqs_ref(D, max_period, device)
    return _FREQS[key]


def qkv_rope_write_triton(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale=None, v_scale=None, per=1,
                          table=None):
    """`qkv_rope_write_ref` in one launch."""
    B, three, H, D = qkv.shape
    assert three == 3 and qkv.stride(-1) == 1 and qkv.stride(2) == D and qkv.stride(1) == H * D
    assert k_ring.is_contiguous() and v_ring.is_contiguous() and k_ring.shape == v_ring.shape
    quant = k_scale is not None
    if quant:
        assert k_scale.is_contiguous() and v_scale.is_contiguous()
    # read by row: a stride-0 view (an expanded slot index) would be read past its storage
    assert B % per == 0 and pos.numel() == slots.numel() == B // per
    pos, slots = pos.contiguous(), slots.contiguous()
    ridx = ring_idx is not None
    ring_idx = ring_idx.contiguous() if ridx else pos
    assert table is None or (ridx and table.stride(1) == 1)
    q = torch.empty(B, H, D, device=qkv.device, dtype=qkv.dtype)
    ks, vs = (k_scale, v_scale) if quant else (q, q)
    tbl = table if table is not None else slots
    _qkv_rope_write_kernel[(B, H)](
        qkv, pos, slots, ring_idx, q, k_ring, v_ring, rope_freqs(D, max_period, qkv.device), ks, vs, tbl,
        qkv.stride(0), D, q.stride(0), q.stride(1), k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        ks.stride(0) if quant else 0, ks.stride(1) if quant else 0, tbl.stride(0), H * D, per, k_ring.shape[2],
        HALF=D // 2, QUANT=quant, RIDX=ridx, PAGE=k_ring.shape[2] if table is not None else 0, num_warps=1,
        **pdl_kw(qkv))
    return q


def qkv_rope_write(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale=None, v_scale=None, per=1,
                   table=None):
    if _kernel_takes(qkv):
        return qkv_rope_write_triton(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale, v_scale, per,
                                     table)
    return qkv_rope_write_ref(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale, v_scale, per, table)
