"""Token sampling on the device: top-k, then temperature, per slot, with counter-based noise.

For a row of logits l, per-slot temperature T, top-k K and seed s at counter c (the slot's
own frame number) and stream j, the sampled token is
    argmax_{v in top-K(l)} ( l_v / T + g_v ),   g_v = -log(-log(u(s, c, j, v)))
i.e. a Gumbel-max draw from softmax(l / T) restricted to the K largest logits, which is the
distribution the reference samples from. `u` is a hash of (seed, counter, stream, token id)
mapped to (0, 1), so a slot's draws depend on nothing else in the batch. Greedy rows (or
T <= 0) take argmax(l).
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from .common import pdl_kw, pdl_start, pow2, triton_enabled

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 without leaving int64's range: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32_ref(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """u in (0, 1), float32, shape [B, vocab], from per-row seed and counter ([B] int64)."""
    v = torch.arange(vocab, device=seed.device, dtype=torch.int64).view(1, -1)
    h = _mix32_ref((seed.view(-1, 1) & _M32) ^ 0x9E3779B9)
    h = _mix32_ref(h ^ (counter.view(-1, 1) & _M32))
    h = _mix32_ref(h ^ (stream * 0x85EBCA6B & _M32))
    return hash_to_unit(_mix32_ref(h ^ v))


def hash_to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in [2^-24, 1 - 2^-24]: 23 high bits, so k + 0.5 is exact in
    float32 (with 24 bits, k + 0.5 rounds up to 2^24 and u = 1 makes an infinite Gumbel draw)."""
    return ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)


def sample_tokens_ref(logits, temperature, top_k, greedy, seed, counter, stream: int, forced=None,
                      forced_mask=None, out=None):
    """logits: [B, V] (any float dtype, read as float32); temperature: [B] float; top_k: [B]
    int; greedy: [B] bool; seed, counter: [B] int64 -> tokens [B] int64. Rows where
    forced_mask ([B] bool) is set take forced ([B]) instead (teacher forcing). With `out`
    ([B] int64, maybe a strided column), the tokens are written there and it is returned."""
    B, V = logits.shape
    logits = logits.float()
    k = top_k.clamp(1, V).long()
    sorted_vals = torch.sort(logits, dim=-1, descending=True).values
    thresh = sorted_vals.gather(1, (k - 1).view(B, 1))
    u = uniform_noise(seed, counter, stream, V)
    gumbel = -torch.log(-torch.log(u))
    t = temperature.float().clamp_min(1e-6).view(B, 1)
    score = torch.where(logits >= thresh, logits / t + gumbel, torch.full_like(logits, float("-inf")))
    sampled = score.argmax(dim=-1)
    is_greedy = greedy | (temperature <= 0)
    tok = torch.where(is_greedy, logits.argmax(dim=-1), sampled)
    if forced is not None:
        tok = torch.where(forced_mask, forced, tok)
    if out is None:
        return tok
    out.copy_(tok)
    return out


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
    pdl_start(PDL)
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


def sample_tokens_triton(logits, temperature, top_k, greedy, seed, counter, stream: int, forced=None,
                         forced_mask=None, out=None, num_warps: int | None = None):
    """`sample_tokens_ref` in one launch; `out` may be a strided column of a [B, n] buffer."""
    B, V = logits.shape
    assert logits.stride(-1) == 1
    out = torch.empty(B, device=logits.device, dtype=torch.long) if out is None else out
    assert out.dtype == torch.long and out.shape == (B,)
    has_forced = forced is not None
    BLOCK = pow2(V)
    nw = num_warps or sample_warps(BLOCK)
    _sample_kernel[(B,)](logits, temperature, top_k, greedy, seed, counter, out,
                         forced if has_forced else out, forced_mask if has_forced else out, V, logits.stride(0),
                         out.stride(0), forced.stride(0) if has_forced else 0,
                         forced_mask.stride(0) if has_forced else 0, (stream * 0x85EBCA6B) & 0xFFFFFFFF,
                         BLOCK=BLOCK, FORCED=has_forced, PASSES=8 if logits.dtype == torch.bfloat16 else 16,
                         num_warps=nw, **pdl_kw(logits))
    return out


def sample_tokens(logits, temperature, top_k, greedy, seed, counter, stream: int, forced=None, forced_mask=None,
                  out=None):
    if triton_enabled(logits):
        return sample_tokens_triton(logits, temperature, top_k, greedy, seed, counter, stream, forced, forced_mask, out)
    return sample_tokens_ref(logits, temperature, top_k, greedy, seed, counter, stream, forced, forced_mask, out)
