"""Triton kernels of the per-frame step. Each launcher checks its inputs' layout and picks
block sizes; each kernel computes exactly what its torch reference in this package defines.
Nothing here synchronises with the host, so every launch can be captured in a CUDA graph."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .dispatch import env_flag

try:  # grid dependency control (programmatic dependent launch), Hopper and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # an older triton: the kernels launch the plain way
    _HAS_GDC = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


def _pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


_pdl = env_flag("PPX_PDL")


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether the tick's kernels launch as programmatic dependents of the kernel before them
    (while a CUDA graph is captured, on Hopper and later; PPX_PDL=0 turns it off): a kernel is
    then scheduled while the previous one finishes and waits for it (`gdc_wait`) before it
    reads anything that one may write, so the launch gap is hidden and a product starts
    streaming its weights early. Every kernel launched this way waits before it ends, which
    keeps the stream's order transitive. Eager launches (a prefill) are host-bound and gain
    nothing from it."""
    return (_pdl and _HAS_GDC and t.is_cuda and torch.cuda.is_current_stream_capturing()
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


def set_pdl(on: bool) -> None:
    global _pdl
    _pdl = bool(on)


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """A programmatic dependent's first step: wait for the kernel before (its writes visible),
    then let the next kernel be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def _pdl_kw(t: torch.Tensor) -> dict:
    """A launch's PDL arguments: the kernel's constexpr and, when on, the launch option."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(t) else {"PDL": False}


# ----------------------------------------------------------------------------------------
# e4m3 values as bfloat16, by moving bits
#
# The compiler converts e4m3 to bfloat16 through float16 (cvt e4m3x2 -> f16x2, then f16 ->
# f32 -> bf16). Moving the bits instead (the sign, exponent and mantissa of an e4m3 value land
# where a bfloat16's are, the exponent biased by 120 less) and one bf16x2 multiply by 2^120
# per two values gives the same value exactly, subnormals included (bf16x2 multiplies keep
# them). The small-batch product over e4m3 weights, which feeds tl.dot, decodes its tiles so:
# 3 to 28% faster on an H200 at 2 to 64 rows of the 7B's shapes (best block shape each)
# (`benchmarks/e4m3_products.py`). The one-row product keeps the compiler's conversion to
# float32 (one cvt per two values, then a half-precision add): a float32 variant of these bit
# moves (shift, arithmetic shift, mask, a float32 multiply by 2^120) measured 2-16% slower
# there, and slower in decode attention over e4m3 rings too. The encodings 0x7f and 0xff
# (e4m3fn's NaN) decode to +-480, never stored by `quant`.


@triton.jit
def _e4m3_bf16(w, act: tl.constexpr, FAST: tl.constexpr):
    """w in the dtype act (e4m3 -> bf16 or another activation dtype is exact); FAST (an e4m3 w,
    act bfloat16, a Hopper GPU) by moving bits, two values a register (prmt's selectors 0x9180
    / 0xB3A2: bytes 0 and 1 / 2 and 3, each sign-extended to 16 bits)."""
    if FAST:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 a, b, c;
            mov.b32 c, 0x7B807B80;
            prmt.b32 a, $2, 0, 0x9180; shl.b32 a, a, 4; and.b32 a, a, 0x87F087F0; mul.rn.bf16x2 $0, a, c;
            prmt.b32 b, $2, 0, 0xB3A2; shl.b32 b, b, 4; and.b32 b, b, 0x87F087F0; mul.rn.bf16x2 $1, b, c;
            }""",
            "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        return w.to(act)


_fast_e4m3 = env_flag("PPX_FAST_E4M3")


def fast_e4m3(w: torch.Tensor) -> bool:
    """Whether the small-batch product decodes the e4m3 W by moving bits (`_e4m3_bf16`): on a
    Hopper or later GPU (bf16x2 multiplies), not in the interpreter; PPX_FAST_E4M3=0 or
    `set_fast_e4m3(False)` gives the compiler's conversion."""
    return (_fast_e4m3 and w.dtype == torch.float8_e4m3fn and w.is_cuda
            and torch.cuda.get_device_capability(w.device)[0] >= 9)


def set_fast_e4m3(on: bool) -> None:
    global _fast_e4m3
    _fast_e4m3 = bool(on)


# ----------------------------------------------------------------------------------------
# RMSNorm, optionally fused with the residual add before it


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, xo_ptr, y_ptr, N, eps, sx, sd, sxo, sy,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * sd + offs, mask=m, other=0.0)
        # the residual add rounds to the activation dtype, as in the reference
        x = (x.to(tl.float32) + d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * sxo + offs, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N + eps
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = xf * (w * tl.rsqrt(var))
    tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    assert t.stride(-1) == 1, "last dim must be contiguous"
    return t.reshape(-1, t.shape[-1])


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)); with delta None, (x, rms_norm(x))."""
    N = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty_like(x2)
    xo = torch.empty_like(x2) if delta is not None else x2
    d2 = _rows(delta) if delta is not None else x2
    nw = 4 if N <= 2048 else 8
    _add_rms_norm_kernel[(x2.shape[0],)](x2, d2, alpha, xo, y, N, eps, x2.stride(0), d2.stride(0), xo.stride(0),
                                         y.stride(0), HAS_DELTA=delta is not None, BLOCK=_pow2(N),
                                         num_warps=nw, **_pdl_kw(x2))
    return xo.view(x.shape), y.view(x.shape)


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    return add_rms_norm(x, None, alpha, eps)[1]


# ----------------------------------------------------------------------------------------
# LayerNorm, optionally fused with the layer-scaled residual add before it (Mimi)


@triton.jit
def _scale_add_ln_kernel(x_ptr, d_ptr, s_ptr, w_ptr, b_ptr, xo_ptr, y_ptr, N, eps, sx, sd, sxo, sy,
                         HAS_DELTA: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr, RN_MUL: tl.constexpr,
                         PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * sd + offs, mask=m, other=0.0)
        sc = tl.load(s_ptr + offs, mask=m, other=0.0)
        # scale * delta rounds to x's dtype, then the sum does, as torch computes them (mul_rn:
        # a rounded product the compiler may not contract with the add into one FMA)
        if RN_MUL:
            t = libdevice.mul_rn(sc.to(tl.float32), d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        else:  # the interpreter (numpy) never contracts
            t = (sc.to(tl.float32) * d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        x = (x.to(tl.float32) + t.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * sxo + offs, x, mask=m)
    if NORM:
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / N
        c = tl.where(m, xf - mean, 0.0)
        var = tl.sum(c * c, axis=0) / N
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = c * tl.rsqrt(var + eps) * w + b
        tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def scale_add_layer_norm(x, delta, scale, weight, bias, eps: float):
    """See `layer_norm.scale_add_layer_norm_ref`: (x + scale * delta, layer_norm(...)) in one launch."""
    N = x.shape[-1]
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    xo = torch.empty_like(x2) if delta is not None else x2
    norm = weight is not None
    y = torch.empty_like(x2) if norm else xo
    nw = 4 if N <= 2048 else 8
    _scale_add_ln_kernel[(x2.shape[0],)](x2, d2, scale if delta is not None else x2, weight if norm else x2,
                                         bias if norm else x2, xo, y, N, eps, x2.stride(0), d2.stride(0),
                                         xo.stride(0), y.stride(0), HAS_DELTA=delta is not None, NORM=norm,
                                         BLOCK=_pow2(N), RN_MUL=x.is_cuda, num_warps=nw, **_pdl_kw(x2))
    return xo.view(x.shape), (y.view(x.shape) if norm else None)


# ----------------------------------------------------------------------------------------
# RoPE on q and k, with k and v written into the KV ring


@triton.jit
def _qkv_rope_write_kernel(qkv_ptr, pos_ptr, slot_ptr, ridx_ptr, q_ptr, k_ring, v_ring, freq_ptr, ks_ptr, vs_ptr,
                           s_b, s_h, sq_b, sq_h, sr_slot, sr_h, sr_w, ss_slot, ss_h, HD, PER, W,
                           HALF: tl.constexpr, QUANT: tl.constexpr, RIDX: tl.constexpr, PDL: tl.constexpr):
    # row b: position pos[b // PER] + b % PER of slot slots[b // PER]; its ring entry ridx[b]
    # (RIDX), else the position mod W
    _pdl_start(PDL)
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
    key = (D, max_period, str(device))
    if key not in _FREQS:
        from .rope import rope_freqs_ref
        _FREQS[key] = rope_freqs_ref(D, max_period, device)
    return _FREQS[key]


def qkv_rope_write(qkv, pos, max_period, slots, ring_idx, k_ring, v_ring, k_scale=None, v_scale=None, per=1):
    """qkv: [B, 3, H, D]; k_ring, v_ring: [S, H, W, D] (one layer; e4m3 with scales [S, H, W]
    when given). Returns rotated q [B, H, D]. ring_idx None and per: see `rope.qkv_rope_write_ref`."""
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
    q = torch.empty(B, H, D, device=qkv.device, dtype=qkv.dtype)
    ks, vs = (k_scale, v_scale) if quant else (q, q)
    _qkv_rope_write_kernel[(B, H)](
        qkv, pos, slots, ring_idx, q, k_ring, v_ring, rope_freqs(D, max_period, qkv.device), ks, vs,
        qkv.stride(0), D, q.stride(0), q.stride(1), k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        ks.stride(0) if quant else 0, ks.stride(1) if quant else 0, H * D, per, k_ring.shape[2], HALF=D // 2,
        QUANT=quant, RIDX=ridx, num_warps=1, **_pdl_kw(qkv))
    return q


# ----------------------------------------------------------------------------------------
# Decode attention over the KV ring, split over the keys (flash-decoding)


@triton.jit
def _attn_split_kernel(q_ptr, k_ring, v_ring, slot_ptr, len_ptr, o_ptr, m_ptr, l_ptr, ks_ptr, vs_ptr,
                       sq_b, sq_h, sr_slot, sr_h, sr_w, ss_slot, ss_h, H, CHUNK, scale,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, QUANT: tl.constexpr,
                       PDL: tl.constexpr):
    _pdl_start(PDL)
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
    kbase = k_ring + slot * sr_slot + h * sr_h
    vbase = v_ring + slot * sr_slot + h * sr_h
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        k = tl.load(kbase + n[:, None] * sr_w + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if QUANT:
            k = k * tl.load(ks_ptr + slot * ss_slot + h * ss_h + n, mask=valid, other=0.0)[:, None]
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(vbase + n[:, None] * sr_w + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if QUANT:
            v = v * tl.load(vs_ptr + slot * ss_slot + h * ss_h + n, mask=valid, other=0.0)[:, None]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = (b * H + h) * NSPLIT + sp
    tl.store(o_ptr + out * D + d, acc)
    tl.store(m_ptr + out + tl.arange(0, 1), m_i)
    tl.store(l_ptr + out + tl.arange(0, 1), l_i)


@triton.jit
def _attn_combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, so_b, so_h, H,
                         D: tl.constexpr, NSPLIT: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
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


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else -1
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count if device.type == "cuda" else 8
    return _SM_COUNT[idx]


def attention_splits(batch: int, heads: int, window: int, device: torch.device, block_n: int = 128) -> int:
    """Enough key splits that batch x heads x splits programs fill the GPU many times over
    (on an H100 at 32 x 32 heads and 3 000 keys, 4 to 8 splits read at 2.8 TB/s)."""
    want = max(1, math.ceil(16 * _num_sms(device) / (batch * heads)))
    return min(_pow2(want), 32, _pow2(triton.cdiv(window, block_n)))


# BLOCK_N, num_warps, num_stages of the split kernel (`benchmarks/tune_kernels.py`)
ATTN_CONFIG = (128, 4, 3)


def decode_attention(q, k_ring, v_ring, slots, lengths, nsplit: int | None = None, k_scale=None, v_scale=None,
                     config=None):
    """q: [B, H, D]; k_ring, v_ring: [S, H, W, D] (e4m3 with scales [S, H, W] when given);
    slots, lengths: [B] -> [B, H, D]. config: (BLOCK_N, warps, stages), default ATTN_CONFIG."""
    B, H, D = q.shape
    S, H2, W, D2 = k_ring.shape
    assert (H2, D2) == (H, D) and k_ring.is_contiguous() and v_ring.is_contiguous() and q.stride(-1) == 1
    BLOCK_N, warps, stages = config or ATTN_CONFIG
    nsplit = nsplit or attention_splits(B, H, W, q.device, BLOCK_N)
    chunk = triton.cdiv(triton.cdiv(W, nsplit), BLOCK_N) * BLOCK_N
    o = torch.empty(B * H * nsplit, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B * H * nsplit, device=q.device, dtype=torch.float32)
    l = torch.empty(B * H * nsplit, device=q.device, dtype=torch.float32)
    quant = k_scale is not None
    ks, vs = (k_scale, v_scale) if quant else (o, o)
    _attn_split_kernel[(B * H, nsplit)](
        q, k_ring, v_ring, slots, lengths, o, m, l, ks, vs, q.stride(0), q.stride(1), k_ring.stride(0),
        k_ring.stride(1), k_ring.stride(2), ks.stride(0) if quant else 0, ks.stride(1) if quant else 0, H, chunk,
        1.0 / math.sqrt(D), D=D, BLOCK_N=BLOCK_N, NSPLIT=nsplit, QUANT=quant, num_warps=warps,
        num_stages=stages, **_pdl_kw(q))
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(B * H,)](o, m, l, out, out.stride(0), out.stride(1), H, D=D, NSPLIT=nsplit,
                                   num_warps=1, **_pdl_kw(q))
    return out


@triton.jit
def _step_attn_kernel(qkv_ptr, k_ptr, v_ptr, o_ptr, step, s_b, sk_b, sk_s, so_b, HD, scale,
                      D: tl.constexpr, STEPS: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    base = qkv_ptr + b * s_b + h * D
    q = tl.load(base + d).to(tl.float32) * scale
    kn = tl.load(base + HD + d)
    vn = tl.load(base + 2 * HD + d)
    kb = k_ptr + b * sk_b + h * D
    vb = v_ptr + b * sk_b + h * D
    tl.store(kb + step * sk_s + d, kn)
    tl.store(vb + step * sk_s + d, vn)
    st = tl.arange(0, STEPS)
    valid = st <= step
    # this program's own store is visible to its own loads; the current step is also taken
    # from registers, so nothing depends on the ordering
    k = tl.load(kb + st[:, None] * sk_s + d[None, :], mask=valid[:, None] & (st[:, None] != step), other=0.0)
    k = tl.where((st == step)[:, None], kn[None, :], k).to(tl.float32)
    v = tl.load(vb + st[:, None] * sk_s + d[None, :], mask=valid[:, None] & (st[:, None] != step), other=0.0)
    v = tl.where((st == step)[:, None], vn[None, :], v).to(tl.float32)
    sc = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
    p = tl.exp(sc - tl.max(sc, axis=0))
    out = tl.sum(p[:, None] * v, axis=0) / tl.sum(p, axis=0)
    tl.store(o_ptr + b * so_b + h * D + d, out.to(o_ptr.dtype.element_ty))


def step_attention(qkv, k_buf, v_buf, step: int):
    """qkv: [B, 3, H, D]; k_buf, v_buf: [B, steps, H, D]. Returns [B, H, D]."""
    B, three, H, D = qkv.shape
    assert qkv.stride(-1) == 1 and qkv.stride(2) == D and qkv.stride(1) == H * D
    assert k_buf.is_contiguous() and v_buf.is_contiguous()
    out = torch.empty(B, H, D, device=qkv.device, dtype=qkv.dtype)
    _step_attn_kernel[(B, H)](qkv, k_buf, v_buf, out, step, qkv.stride(0), k_buf.stride(0), k_buf.stride(1),
                              out.stride(0), H * D, 1.0 / math.sqrt(D), D=D, STEPS=_pow2(k_buf.shape[1]),
                              num_warps=1, **_pdl_kw(qkv))
    return out


@triton.jit
def _ring_chunk_attn_kernel(q_ptr, k_ring, v_ring, slot_ptr, end_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr, sq_b, sq_t, sq_h,
                            sr_slot, sr_h, sr_w, W, H, T, CHUNK, scale, D: tl.constexpr, BLOCK_W: tl.constexpr,
                            NSPLIT: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    # program (b, t, h) x split: the ring entries [split * CHUNK, (split + 1) * CHUNK); with one
    # split the output itself, else the split's running max, sum and weighted values for
    # `_attn_combine_kernel` (row (b * T + t) * H + h)
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
    sms = _num_sms(device)
    if programs >= 2 * sms or device.type != "cuda":  # (the interpreter: the fewest programs)
        return 128, 4, 1
    splits = min(_pow2(triton.cdiv(2 * sms, programs)), _pow2(triton.cdiv(window, 32)))
    return (32, 2, splits) if splits > 1 else (256, 8, 1)


def ring_chunk_attention(q, k_ring, v_ring, slots, end, config=None):
    """q: [B, T, H, D] (contiguous); k_ring, v_ring: [S, H, W, D]; end: [B]. Returns [B, T, H, D].
    config: (BLOCK_W, num_warps, splits), default `ring_config`."""
    B, T, H, D = q.shape
    W = k_ring.shape[2]
    assert q.is_contiguous() and k_ring.is_contiguous() and v_ring.is_contiguous()
    block, warps, nsplit = config or ring_config(B * H * T, W, q.device)
    assert nsplit == _pow2(nsplit), "splits: a power of 2"
    block = min(block, _pow2(W))
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
                                                 BLOCK_W=block, NSPLIT=nsplit, num_warps=warps, **_pdl_kw(q))
    if nsplit > 1:
        # rows (b, t) of H heads: the output [B, T, H, D] viewed as [B * T, H, D]
        _attn_combine_kernel[(B * T * H,)](po, pm, pl, out, H * D, D, H, D=D, NSPLIT=nsplit, num_warps=1,
                                           **_pdl_kw(q))
    return out


# ----------------------------------------------------------------------------------------
# Small-batch matrix product (up to 64 rows)


@triton.jit
def _rows_linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, sxm, swn, sym, KC,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr,
                        IEEE: tl.constexpr, FMA: tl.constexpr, GELU: tl.constexpr, PDL: tl.constexpr,
                        FAST8: tl.constexpr, M_FAST: tl.constexpr):
    # IEEE: float32 rows and W, multiplied in full float32 (as cuBLAS does by default), not TF32.
    # FMA: for a few rows (BLOCK_M of them, unpadded), products and sums in float32 on the CUDA
    # cores instead of `tl.dot`, whose tiles pad the rows to 16 (and in full float32 are slow).
    # PDL: as in `_gemv_kernel`, the first tile of W is loaded before waiting for the kernel before.
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
        acc = tl.dot(x, tl.trans(_e4m3_bf16(w_first, x.dtype, FAST8)))
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
            acc += tl.dot(x, tl.trans(_e4m3_bf16(w, x.dtype, FAST8)))
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
    _pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < MN
    acc = tl.load(p_ptr + offs, mask=m, other=0.0)
    for i in tl.static_range(1, SPLITS):
        acc += tl.load(p_ptr + i * MN + offs, mask=m, other=0.0)
    if SCALED:
        acc = acc * tl.load(s_ptr + offs % N, mask=m, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=m)


SMALL_LINEAR_MAX_M = 64
FEW_ROWS = 4  # rows up to which `rows_linear` may multiply without tl.dot


@triton.jit
def _gemv_row(x_ptr, d_ptr, d_on, a_ptr, kk, km, K, rstd, act, PRO: tl.constexpr, HAS_DELTA: tl.constexpr):
    """One chunk kk of the product's input row, in float32 (see `_gemv_kernel`'s PRO)."""
    if PRO == 1 or PRO == 3:
        xv = tl.load(x_ptr + kk, mask=km, other=0.0)
        if HAS_DELTA != 0:
            dv = tl.load(d_ptr + kk, mask=km, other=0.0).to(tl.float32)
            if HAS_DELTA == 2:
                dv = tl.where(d_on, dv, 0.0)
            xv = (xv.to(tl.float32) + dv).to(act)
        if PRO == 1:
            al = tl.load(a_ptr + kk, mask=km, other=0.0).to(tl.float32)
            return (xv.to(tl.float32) * (al * rstd)).to(act).to(tl.float32)
        return xv.to(tl.float32)
    elif PRO == 2:
        a = tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)
        g = tl.load(x_ptr + K + kk, mask=km, other=0.0).to(tl.float32)
        sl = (a / (1.0 + tl.exp(-a))).to(act).to(tl.float32)
        return (sl * g).to(act).to(tl.float32)
    else:
        return tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)


@triton.jit
def _step_attn_chunk(x_ptr, kb_ptr, vb_ptr, kk, K, sk_s, step, scale, write, act,
                     BLOCK_K: tl.constexpr, D: tl.constexpr, STEPS: tl.constexpr):
    """Chunk kk (whole heads) of the depformer's in-frame attention for one row, as
    `_step_attn_kernel` computes it (float32): x = the row's [q | k | v] (K wide each), the
    query attends over steps 0..step of k_buf/v_buf and this step's k and v, which are stored
    at `step` where `write` holds."""
    km = kk < K
    q = tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32) * scale
    kn = tl.load(x_ptr + K + kk, mask=km, other=0.0)
    vn = tl.load(x_ptr + 2 * K + kk, mask=km, other=0.0)
    if write:
        tl.store(kb_ptr + step * sk_s + kk, kn, mask=km)
        tl.store(vb_ptr + step * sk_s + kk, vn, mask=km)
    st = tl.arange(0, STEPS)
    before = (st < step)[:, None] & km[None, :]
    now = (st == step)[:, None]
    k = tl.where(now, kn[None, :], tl.load(kb_ptr + st[:, None] * sk_s + kk[None, :], mask=before, other=0.0))
    v = tl.where(now, vn[None, :], tl.load(vb_ptr + st[:, None] * sk_s + kk[None, :], mask=before, other=0.0))
    sc = tl.sum(tl.reshape(k.to(tl.float32) * q[None, :], (STEPS, BLOCK_K // D, D)), axis=2)   # [STEPS, heads]
    sc = tl.where((st <= step)[:, None], sc, float("-inf"))
    p = tl.exp(sc - tl.max(sc, axis=0)[None, :])
    num = tl.sum(tl.reshape(tl.broadcast_to(p[:, :, None], (STEPS, BLOCK_K // D, D)), (STEPS, BLOCK_K))
                 * v.to(tl.float32), axis=0)
    den = tl.reshape(tl.broadcast_to(tl.sum(p, axis=0)[:, None], (BLOCK_K // D, D)), (BLOCK_K,))
    return (num / den).to(act).to(tl.float32)


@triton.jit
def _gemv_chunk(x_ptr, d_ptr, d_on, a_ptr, kk, km, K, rstd, act, sdm, step, eps, write,
                PRO: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                STEPS: tl.constexpr):
    if PRO == 4:
        return _step_attn_chunk(x_ptr, d_ptr, a_ptr, kk, K, sdm, step, eps, write, act, BLOCK_K, D, STEPS)
    else:
        return _gemv_row(x_ptr, d_ptr, d_on, a_ptr, kk, km, K, rstd, act, PRO, HAS_DELTA)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, swn, d_ptr, id_ptr, a_ptr, xo_ptr, eps, sdm, step,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr, PRO: tl.constexpr,
                 HAS_DELTA: tl.constexpr, D: tl.constexpr, STEPS: tl.constexpr, PDL: tl.constexpr,
                 VEC: tl.constexpr):
    # The row, made from x in the same launch (`Prologue`): PRO 0, x itself. PRO 1,
    # rms_norm(x + delta) * alpha, as `_add_rms_norm_kernel` rounds it (program 0 also writes
    # x + delta to xo). PRO 2, for x = [a | g] (2K wide), silu(a) * g as `_silu_mul_kernel`
    # rounds it. PRO 3, x + delta. HAS_DELTA 1: delta is a row; 2: the row `id` of a table
    # (id -1: none, other negatives: row 0, as `embedding_ref`). PRO 4: the depformer's
    # in-frame attention (`_step_attn_chunk`; x the qkv row, d_ptr and a_ptr its k and v buffers,
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
    if PRO == 1:
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
    x = _gemv_chunk(x_ptr, d_ptr, d_on, a_ptr, k_first, k_first < K, K, rstd, act, sdm, step, eps, pid == 0,
                    PRO, HAS_DELTA, BLOCK_K, D, STEPS)
    acc = w_first.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if VEC > 0:
            kk = tl.max_contiguous(tl.multiple_of(kk, VEC), VEC)
        km = kk < K
        w = tl.load(w_ptr + n[:, None] * swn + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        x = _gemv_chunk(x_ptr, d_ptr, d_on, a_ptr, kk, km, K, rstd, act, sdm, step, eps, pid == 0,
                        PRO, HAS_DELTA, BLOCK_K, D, STEPS)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if SCALED:
        y = y * tl.load(s_ptr + n, mask=nm, other=0.0)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nm)


class Prologue:
    """What the one-row product does to its row first (`_gemv_kernel`'s PRO): kind 0 nothing,
    1 the RMSNorm with alpha and eps, 2 the gated SiLU (x = [a | g]), 3 only the residual add.
    `delta` is added first (kinds 1 and 3); with `ids` (one id), delta is an embedding table and
    the row adds delta[id] (id -1: nothing). Kind 1 with a delta also returns x + delta.
    `Prologue.step_attention(k_buf, v_buf, step)`: kind 4, x = qkv, the depformer's in-frame
    attention (`step_attention`, which writes k and v at `step`)."""

    def __init__(self, kind: int = 0, delta=None, ids=None, alpha=None, eps: float = 0.0):
        self.kind, self.delta, self.ids, self.alpha, self.eps = kind, delta, ids, alpha, eps
        self.step, self.head_dim, self.steps = 0, 1, 1

    @classmethod
    def step_attention(cls, k_buf: torch.Tensor, v_buf: torch.Tensor, step: int) -> "Prologue":
        B, S, H, D = k_buf.shape
        assert B == 1 and k_buf.is_contiguous() and v_buf.is_contiguous() and v_buf.shape == k_buf.shape
        p = cls(4, k_buf, alpha=v_buf, eps=1.0 / math.sqrt(D))
        p.step, p.head_dim, p.steps = step, D, _pow2(S)
        return p

    def width(self, x: torch.Tensor) -> int:
        """The product's K for input x."""
        return x.shape[-1] // {2: 2, 4: 3}.get(self.kind, 1)

    def args(self, x2: torch.Tensor) -> tuple[list, dict, torch.Tensor]:
        """(kernel arguments d, id, alpha, xo, eps, sdm, step; constexprs; xo) for a row x2 [1, *]"""
        K = x2.shape[1]
        if self.kind == 4:
            kb, vb = self.delta, self.alpha
            return [kb, x2, vb, x2, self.eps, kb.stride(1), self.step], \
                {"PRO": 4, "HAS_DELTA": 0, "D": self.head_dim, "STEPS": self.steps}, x2
        d, ids = self.delta, self.ids
        has = 0 if d is None else 2 if ids is not None else 1
        if has == 1:
            d = d.reshape(1, K)
        elif has == 2:
            assert d.dim() == 2 and d.shape[1] == K and ids.numel() == 1
            ids = ids.reshape(1).contiguous()
        assert d is None or d.stride(-1) == 1
        xo = torch.empty_like(x2) if self.kind == 1 and d is not None else x2
        return [x2 if d is None else d, x2 if ids is None else ids, x2 if self.alpha is None else self.alpha, xo,
                self.eps, 0 if d is None else d.stride(0), 0], {"PRO": self.kind, "HAS_DELTA": has, "D": 1,
                                                                "STEPS": 1}, xo


_gemv_vec8 = env_flag("PPX_GEMV_VEC8")


def gemv_vec(w: torch.Tensor, x: torch.Tensor) -> int:
    """`_gemv_kernel`'s VEC: 8 for an e4m3 W and a 16-bit row (PPX_GEMV_VEC8=0: 0), else 0."""
    return 8 if _gemv_vec8 and w.dtype == torch.float8_e4m3fn and x.element_size() == 2 else 0


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, config=(8, 256, 4, 3),
         pro: Prologue | None = None):
    """y = x W^T (times a per-output scale when given) for ONE row x: streams W once over many
    programs, with no split of K and so no second kernel. config: BLOCK_N, BLOCK_K, warps, stages.
    With a prologue (`Prologue`), returns (x or x + delta, y)."""
    pro0 = pro or Prologue()
    K = pro0.width(x)
    x2 = x.reshape(1, x.shape[-1])
    N = w.shape[0]
    assert w.stride(1) == 1 and x2.stride(-1) == 1 and w.shape[1] == K
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    BLOCK_N, BLOCK_K, warps, stages = config
    assert pro0.kind != 4 or BLOCK_K % pro0.head_dim == 0
    a, const, xo = pro0.args(x2)
    _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](
        x2, w, scale if scale is not None else y, y, N, K, w.stride(0), *a, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        SCALED=scale is not None, num_warps=warps, num_stages=stages, VEC=gemv_vec(w, x2), **const, **_pdl_kw(x2))
    y = y.view(*x.shape[:-1], N)
    return y if pro is None else (xo.view(*x.shape[:-1], xo.shape[-1]), y)


def norm_gemv(x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float, w: torch.Tensor,
              scale: torch.Tensor | None = None, config=(8, 256, 4, 3)):
    """For one row: (x + delta, rms_norm(x + delta) * alpha @ W^T), i.e. `add_rms_norm` then
    `gemv` in one launch (delta None: (x, rms_norm(x) @ W^T)). Same roundings as the two."""
    return gemv(x, w, scale, config, Prologue(1, delta, alpha=alpha, eps=eps))


def silu_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, config=(8, 256, 4, 3)):
    """For one row x = [a | g]: (silu(a) * g) @ W^T, i.e. `silu_mul` then `gemv` in one launch."""
    return gemv(x, w, scale, config, Prologue(2))[1]


def rows_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, config=(16, 256, 4, 3),
                fma: bool = False, gelu: bool = False, splits: int = 1, block_m: int | None = None,
                m_fast: bool = False):
    """y = x W^T (times a per-output scale for an e4m3 W) for up to 64 rows: one launch streaming W
    once, where cuBLAS splits K and adds a reduction kernel. config: BLOCK_N, BLOCK_K, warps,
    stages. Float32 rows and W multiply in full float32. fma: for up to FEW_ROWS rows, without
    `tl.dot` (`_rows_linear_kernel`'s FMA). More rows (a prefill's, against an e4m3 W) run in
    blocks of 64 (or block_m), side by side. gelu: y is the exact GELU of the product (a float32
    product's, as `F.gelu` of it). splits: K is split in
    that many parts, each summed by its own programs into float32 partials that a second kernel
    adds, so a W of few rows (4096, as the out and down projections') fills the GPU. block_m: the
    rows a program takes (default: all up to 64, padded to 16); m_fast: the blocks of rows as the
    grid's first axis (`_rows_linear_kernel`'s M_FAST), for a prefill's many rows."""
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
        block_m = min(SMALL_LINEAR_MAX_M, _pow2(M) if fma else max(16, _pow2(M)))
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
        FAST8=fast_e4m3(w) and x.dtype == torch.bfloat16 and not fma, M_FAST=m_fast, **_pdl_kw(x2))
    if splits > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(M * N, block),)](out, scale if scale is not None else y, y, M * N, N,
                                                        SPLITS=splits, SCALED=scale is not None, BLOCK=block,
                                                        num_warps=4, **_pdl_kw(x2))
    return y.view(*x.shape[:-1], N)


def small_linear(x: torch.Tensor, w: torch.Tensor, config=(16, 256, 4, 3)) -> torch.Tensor:
    """y = x W^T for up to 64 rows and a half-precision W (`rows_linear`)."""
    return rows_linear(x, w, None, config)


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, config=(32, 256, 4, 3)) -> torch.Tensor:
    """y = (x W8^T) * scale for an e4m3 W with one scale per output channel."""
    return rows_linear(x, w8, scale, config)


# ----------------------------------------------------------------------------------------
# Gated SiLU


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, N, sx, sy, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + row * sx + N + offs, mask=m, other=0.0).to(tl.float32)
    # silu rounds to the activation dtype before the product, as torch computes it
    s = (a / (1.0 + tl.exp(-a))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * sy + offs, (s * g).to(y_ptr.dtype.element_ty), mask=m)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    N = x.shape[-1] // 2
    x2 = _rows(x)
    y = torch.empty(x2.shape[0], N, device=x.device, dtype=x.dtype)
    BLOCK = min(_pow2(N), 1024)
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(N, BLOCK))](x2, y, N, x2.stride(0), y.stride(0), BLOCK=BLOCK,
                                                            num_warps=4, **_pdl_kw(x2))
    return y.view(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------
# Mimi's activations


@triton.jit
def _elu_f32(x):
    return tl.where(x > 0, x, tl.exp(x) - 1.0)


@triton.jit
def _elu_kernel(x_ptr, y_ptr, n, C, T, sxb, sxc, sxt, syb, syc, syt, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # element i of [B, C, T]: (i // (C T), i // T mod C, i mod T), at each tensor's strides
    _pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t = offs % T
    c = (offs // T) % C
    b = offs // (T * C)
    y = _elu_f32(tl.load(x_ptr + b * sxb + c * sxc + t * sxt, mask=m, other=0.0).to(tl.float32))
    tl.store(y_ptr + b * syb + c * syc + t * syt, y.to(y_ptr.dtype.element_ty), mask=m)


def elu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """elu(x) for x of up to 3 dims, into `out` (any layout of x's shape) when given."""
    assert x.dim() <= 3 and (out is None or (out.shape == x.shape and out.dtype == x.dtype))
    y = torch.empty_like(x) if out is None else out
    x3, y3 = (t.view((1,) * (3 - t.dim()) + tuple(t.shape)) for t in (x, y))
    n = x.numel()
    _elu_kernel[(triton.cdiv(n, 1024),)](x3, y3, n, x3.shape[1], x3.shape[2], *x3.stride(), *y3.stride(), BLOCK=1024,
                                         num_warps=4, **_pdl_kw(x))
    return y


# ----------------------------------------------------------------------------------------
# Top-k + temperature sampling with counter-based Gumbel noise


@triton.jit
def _mix32(x):
    # uint32 arithmetic wraps mod 2^32, as the reference's masked int64 arithmetic does
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit(do_not_specialize=["stream_mix"])
def _sample_kernel(logits_ptr, temp_ptr, topk_ptr, greedy_ptr, seed_ptr, counter_ptr, out_ptr, forced_ptr, fmask_ptr,
                   V, stride, out_stride, f_stride, fm_stride, stream_mix, BLOCK: tl.constexpr,
                   FORCED: tl.constexpr, PASSES: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < V
    x = tl.load(logits_ptr + row * stride + offs, mask=m, other=float("-inf")).to(tl.float32)
    k = tl.minimum(tl.maximum(tl.load(topk_ptr + row), 1), V)
    # The k-th largest logit, exactly: the largest order-preserving key t with at least k keys
    # >= t, built two bits at a time from the top. Each step counts the keys >= each of the 3
    # candidates with the next digit 1, 2, 3 in one reduction (three 21-bit fields of an int64
    # sum) and keeps the largest digit that still counts k; no histogram, no running k.
    # Bfloat16 logits need only the keys' top 16 bits (8 steps): below them every key of one
    # value has the same bits, and `key >= t` with t's low bits zero keeps exactly the values
    # >= the k-th.
    xi = x.to(tl.int32, bitcast=True)
    key = (xi ^ ((xi >> 31) & 0x7FFFFFFF)).to(tl.uint32, bitcast=True) ^ tl.full([], 0x80000000, tl.uint32)
    key = tl.where(m, key, tl.zeros_like(key))
    prefix = tl.zeros([], dtype=tl.uint32)
    for it in tl.static_range(PASSES):
        shift = 30 - 2 * it
        ge = ((key >= (prefix | tl.full([], 1 << shift, tl.uint32))).to(tl.int64)
              + ((key >= (prefix | tl.full([], 2 << shift, tl.uint32))).to(tl.int64) << 21)
              + ((key >= (prefix | tl.full([], 3 << shift, tl.uint32))).to(tl.int64) << 42))
        tot = tl.sum(tl.where(m, ge, 0), axis=0)
        dd = tl.where((tot >> 42) >= k, 3, tl.where(((tot >> 21) & 0x1FFFFF) >= k, 2,
                                                    tl.where((tot & 0x1FFFFF) >= k, 1, 0)))
        prefix = prefix | (dd.to(tl.uint32) << shift)
    keep = (key >= prefix) & m
    seed = (tl.load(seed_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    counter = (tl.load(counter_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    h = _mix32(seed ^ tl.full([], 0x9E3779B9, tl.uint32))
    h = _mix32(h ^ counter)
    h = _mix32(h ^ stream_mix.to(tl.uint32))
    h = _mix32(h ^ offs.to(tl.uint32))
    u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    g = -tl.log(-tl.log(u))
    t = tl.maximum(tl.load(temp_ptr + row).to(tl.float32), 1e-6)
    score = tl.where(keep, x / t + g, float("-inf"))
    sampled = tl.argmax(score, axis=0)
    best = tl.argmax(x, axis=0)
    greedy = (tl.load(greedy_ptr + row) != 0) | (tl.load(temp_ptr + row) <= 0)
    tok = tl.where(greedy, best, sampled).to(tl.int64)
    if FORCED:
        tok = tl.where(tl.load(fmask_ptr + row * fm_stride) != 0, tl.load(forced_ptr + row * f_stride), tok)
    tl.store(out_ptr + row * out_stride, tok)


def sample_warps(block: int) -> int:
    # (on an H200, batch 1: the text vocabulary's 32000 logits 43.4 us with 32 warps, 45.2 with
    # 16; the audio's 2048, 6.0 us with 8 and 5.9 with 4, 6.2 and 6.7 at batch 64)
    return 32 if block >= 16384 else 8 if block >= 2048 else 4


def sample_tokens(logits, temperature, top_k, greedy, seed, counter, stream: int, num_warps: int | None = None,
                  forced=None, forced_mask=None, out=None):
    """See `sampling.sample_tokens_ref`; `out` may be a strided column of a [B, n] buffer."""
    B, V = logits.shape
    assert logits.stride(-1) == 1
    out = torch.empty(B, device=logits.device, dtype=torch.long) if out is None else out
    assert out.dtype == torch.long and out.shape == (B,)
    has_forced = forced is not None
    BLOCK = _pow2(V)
    nw = num_warps or sample_warps(BLOCK)
    _sample_kernel[(B,)](logits, temperature, top_k, greedy, seed, counter, out,
                         forced if has_forced else out, forced_mask if has_forced else out, V, logits.stride(0),
                         out.stride(0), forced.stride(0) if has_forced else 0,
                         forced_mask.stride(0) if has_forced else 0, (stream * 0x85EBCA6B) & 0xFFFFFFFF,
                         BLOCK=BLOCK, FORCED=has_forced, PASSES=8 if logits.dtype == torch.bfloat16 else 16,
                         num_warps=nw, **_pdl_kw(logits))
    return out


# ----------------------------------------------------------------------------------------
# Mimi's streaming convolutions and residual VQ (`codec`)


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
    _pdl_start(PDL)
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
        nt_x = _elu_f32(nt_x)
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
            vx = _elu_f32(vx)
        v = tl.where(ft[None, :], vt, vx.to(vt.dtype))
        tl.store(out_ptr + b * sob + c[:, None] * soc + u[None, :] * sou + k, v, mask=cm[:, None] & um[None, :])
    tl.debug_barrier()  # every read of the old tail (above, by any thread) before it is overwritten
    tl.store(tb + j[None, :], nt, mask=jm)


def _row_blocks(C: int, L: int, t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_T) for kernels that each own BLOCK_C whole rows of length L (the
    interpreter on the CPU: few programs of large blocks, which it runs faster)."""
    bt = min(_pow2(L), 1024)
    return min(_pow2(C), max(1, (2048 if t.is_cuda else 1 << 16) // bt)), bt


def _conv_input_launch(x, tail, slots, act, fresh, out, nu, ks, stride, dil, sob, sou, soc):
    B, C, T = x.shape
    TAIL = tail.shape[-1]
    assert tail.stride(-1) == 1 and tail.dtype == x.dtype and TAIL > 0
    assert not (fresh is not None and act), "a fresh stream repeats its raw first input"
    # blocks of units: 64 on a GPU, whole rows in the interpreter (fewer, larger programs)
    bt = min(_pow2(nu), 64 if x.is_cuda else 1024)
    bc = min(_pow2(C), max(1, (2048 if x.is_cuda else 1 << 16) // (bt * _pow2(ks))))
    assert min(nu, triton.cdiv(TAIL, stride)) <= bt, "the units that read the kept tail: all in block 0"
    grid = (B, triton.cdiv(C, bc), triton.cdiv(nu, bt))
    _conv_input_kernel[grid](x, tail, slots, slots if fresh is None else fresh, out, C, T, TAIL, nu, stride, dil,
                             x.stride(0), x.stride(1), x.stride(2), tail.stride(0), tail.stride(1), sob, sou, soc,
                             ACT=act, FRESH=fresh is not None, KS=ks, BLOCK_C=bc, BLOCK_T=bt, TAIL_P=_pow2(TAIL),
                             num_warps=4, **_pdl_kw(x))
    return out


def conv_input(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool,
               fresh: torch.Tensor | None = None) -> torch.Tensor:
    """See `codec.conv_input_ref`."""
    B, C, T = x.shape
    L = tail.shape[-1] + T
    xx = torch.empty(B, C, L, device=x.device, dtype=x.dtype)
    return _conv_input_launch(x, tail, slots, act, fresh, xx, L, 1, 1, 1, xx.stride(0), 1, xx.stride(1))


def conv_columns(x: torch.Tensor, tail: torch.Tensor, slots: torch.Tensor, act: bool, kernel: int, stride: int,
                 dilation: int, fresh: torch.Tensor | None = None) -> torch.Tensor:
    """See `codec.conv_columns_ref`."""
    B, C, T = x.shape
    TO = T // stride
    cols = torch.empty(B * TO, C * kernel, device=x.device, dtype=x.dtype)
    return _conv_input_launch(x, tail, slots, act, fresh, cols, TO, kernel, stride, dilation, TO * C * kernel,
                              C * kernel, kernel)


@triton.jit
def _overlap_add_kernel(y_ptr, part_ptr, slot_ptr, bias_ptr, out_ptr, C, T, S, syb, syt, syc, sps, spc, sob, soc, sot,
                        HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, S_P: tl.constexpr,
                        PDL: tl.constexpr):
    _pdl_start(PDL)
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


def overlap_add(y: torch.Tensor, partial: torch.Tensor, slots: torch.Tensor,
                bias: torch.Tensor | None, channels_last: bool = False) -> torch.Tensor:
    """See `codec.overlap_add_ref`."""
    B, T, C, K = y.shape
    S = K // 2
    assert y.stride(-1) == 1 and partial.stride(-1) == 1 and partial.shape[-1] == S
    if channels_last:
        out = torch.empty(B, T * S, C, device=y.device, dtype=y.dtype).transpose(1, 2)
    else:
        out = torch.empty(B, C, T * S, device=y.device, dtype=y.dtype)
    bc, bt = _row_blocks(C, T * S, y)
    _overlap_add_kernel[(B, triton.cdiv(C, bc))](y, partial, slots, y if bias is None else bias, out, C, T, S,
                                                 y.stride(0), y.stride(1), y.stride(2), partial.stride(0),
                                                 partial.stride(1), out.stride(0), out.stride(1), out.stride(2),
                                                 HAS_BIAS=bias is not None, BLOCK_C=bc, BLOCK_T=bt, S_P=_pow2(S),
                                                 num_warps=4, **_pdl_kw(y))
    return out


@triton.jit
def _rvq_step_kernel(x_ptr, s_ptr, n_ptr, cb_ptr, xo_ptr, code_ptr, N, D, sx, ss, sxo, scode,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
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


def rvq_step(x: torch.Tensor, scores: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor,
             codes: torch.Tensor) -> torch.Tensor:
    """See `codec.rvq_step_ref`."""
    B, D = x.shape
    N = codebook.shape[0]
    assert x.stride(-1) == 1 and scores.stride(-1) == 1 and codebook.is_contiguous() and norms.is_contiguous()
    assert codes.dtype == torch.long and codes.shape == (B,)
    out = torch.empty_like(x)
    _rvq_step_kernel[(B,)](x, scores, norms, codebook, out, codes, N, D, x.stride(0), scores.stride(0),
                           out.stride(0), codes.stride(0), BLOCK_N=_pow2(N), BLOCK_D=_pow2(D),
                           num_warps=8 if N >= 1024 else 4, **_pdl_kw(x))
    return out


@triton.jit
def _codebook_sum_kernel(code_ptr, tab_ptr, sc_ptr, out_ptr, NCB, BINS, D, K, scb, sck,
                         BLOCK_D: tl.constexpr, K_P: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
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


def codebook_sum(codes: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """See `codec.codebook_sum_ref`."""
    B, n = codes.shape
    n2, bins, D = tables.shape
    K = scale.shape[-1]
    assert n == n2 and tables.is_contiguous() and scale.is_contiguous() and scale.shape == (D, K)
    out = torch.empty(B, D, K, device=tables.device, dtype=tables.dtype)
    block = min(_pow2(D), 128)
    _codebook_sum_kernel[(B, triton.cdiv(D, block))](codes, tables, scale, out, n, bins, D, K, codes.stride(0),
                                                      codes.stride(1), BLOCK_D=block, K_P=_pow2(K), num_warps=4,
                                                      **_pdl_kw(tables))
    return out
