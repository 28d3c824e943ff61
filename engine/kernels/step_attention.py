"""The depformer's attention within a frame: step k's query attends over the keys of steps
0..k of this frame (its own k and v stored at k first):
    out = softmax(q . K[:k+1]^T / sqrt(D)) V[:k+1]
`step_attention_chunk` is the same for one row and a chunk of whole heads, in the one-row
product's prologue (`products.one_row`)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, pow2, triton_enabled


def step_attention_ref(qkv, k_buf, v_buf, step: int):
    """The depformer's attention within a frame: qkv [B, 3, H, D] of step `step` is stored at
    k_buf/v_buf[:, step] ([B, steps, H, D]); the query attends over steps 0..step."""
    B, _, H, D = qkv.shape
    k_buf[:, step] = qkv[:, 1]
    v_buf[:, step] = qkv[:, 2]
    q = qkv[:, 0].float()
    s = torch.einsum("bhd,bshd->bhs", q, k_buf[:, :step + 1].float()) / math.sqrt(D)
    return torch.einsum("bhs,bshd->bhd", torch.softmax(s, -1), v_buf[:, :step + 1].float()).to(qkv.dtype)


@triton.jit
def _step_attn_kernel(qkv_ptr, k_ptr, v_ptr, o_ptr, step, s_b, sk_b, sk_s, so_b, HD, scale,
                      D: tl.constexpr, STEPS: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
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


def step_attention_triton(qkv, k_buf, v_buf, step: int):
    """`step_attention_ref` in one launch: qkv [B, 3, H, D]; k_buf, v_buf [B, steps, H, D]."""
    B, three, H, D = qkv.shape
    assert qkv.stride(-1) == 1 and qkv.stride(2) == D and qkv.stride(1) == H * D
    assert k_buf.is_contiguous() and v_buf.is_contiguous()
    out = torch.empty(B, H, D, device=qkv.device, dtype=qkv.dtype)
    _step_attn_kernel[(B, H)](qkv, k_buf, v_buf, out, step, qkv.stride(0), k_buf.stride(0), k_buf.stride(1),
                              out.stride(0), H * D, 1.0 / math.sqrt(D), D=D, STEPS=pow2(k_buf.shape[1]),
                              num_warps=1, **pdl_kw(qkv))
    return out


@triton.jit
def step_attention_chunk(x_ptr, kb_ptr, vb_ptr, kk, K, sk_s, step, scale, write, act,
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


def step_attention(qkv, k_buf, v_buf, step: int):
    if triton_enabled(qkv):
        return step_attention_triton(qkv, k_buf, v_buf, step)
    return step_attention_ref(qkv, k_buf, v_buf, step)
