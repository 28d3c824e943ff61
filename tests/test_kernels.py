"""Every Triton kernel against its torch reference: the real 7B shapes on a GPU, small and odd
shapes everywhere (on the CPU through the Triton interpreter). Tolerances, as relative L2
error against the reference computed in float64 where the op is continuous: float32 1e-5,
bfloat16 within 2x of the torch bfloat16 reference's own error (plus 1e-3)."""

import importlib

import pytest
import torch

from engine.kernels import (add_rms_norm_ref, decode_attention_ref, elu_ref, qkv_rope_write_ref, sample_tokens_ref,
                            scale_add_layer_norm_ref, silu_mul_ref)
from engine.kernels import triton_ops as K

from conftest import CUDA

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
# (B, N) for the norms, (B, H, D, W) for attention
NORM_SHAPES = [(1, 4096), (8, 4096), (3, 1024)] if CUDA else []
NORM_SHAPES += [(1, 64), (3, 100), (2, 37)]
ATTN_SHAPES = [(1, 32, 128, 2999), (8, 32, 128, 2999), (4, 16, 64, 16)] if CUDA else []
ATTN_SHAPES += [(1, 4, 16, 19), (3, 2, 32, 37), (2, 3, 16, 130)]


def _rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _check(out, ref_lowp, ref64, dtype):
    if dtype == torch.float32:
        assert _rel(out, ref64) < 1e-5
    else:
        assert _rel(out, ref64) <= 2 * _rel(ref_lowp, ref64) + 1e-3


def _randn(*shape, dtype, g):
    return torch.randn(*shape, generator=g).to(DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", NORM_SHAPES)
def test_add_rms_norm(B, N, dtype):
    g = torch.Generator().manual_seed(B * N)
    x, d = _randn(B, N, dtype=dtype, g=g), _randn(B, N, dtype=dtype, g=g)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEV, dtype)
    xo, y = K.add_rms_norm(x, d, w, 1e-8)
    rx, ry = add_rms_norm_ref(x, d, w, 1e-8)
    assert torch.equal(xo, rx)  # the rounded residual is the same sum
    _, ry64 = add_rms_norm_ref(x.double(), d.double(), w.double(), 1e-8)
    _check(y, ry, ry64, dtype)
    _, y1 = K.add_rms_norm(x, None, w, 1e-8)
    _check(y1, add_rms_norm_ref(x, torch.zeros_like(x), w, 1e-8)[1],
           add_rms_norm_ref(x.double(), torch.zeros_like(x).double(), w.double(), 1e-8)[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", NORM_SHAPES + [(4, 512)])
def test_scale_add_layer_norm(B, N, dtype):
    g = torch.Generator().manual_seed(B * N + 1)
    x, d = _randn(B, N, dtype=dtype, g=g), _randn(B, N, dtype=dtype, g=g)
    s = (0.1 * torch.randn(N, generator=g)).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEV, dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(DEV, dtype)
    xo, y = K.scale_add_layer_norm(x, d, s, w, b, 1e-5)
    rx, ry = scale_add_layer_norm_ref(x, d, s, w, b, 1e-5)
    assert torch.equal(xo, rx)  # the rounded residual is the same sum
    _, ry64 = scale_add_layer_norm_ref(*(t.double() for t in (x, d, s, w, b)), 1e-5)
    _check(y, ry, ry64, dtype)
    _, y1 = K.scale_add_layer_norm(x, None, None, w, b, 1e-5)  # the norm alone
    _check(y1, scale_add_layer_norm_ref(x, None, None, w, b, 1e-5)[1],
           scale_add_layer_norm_ref(x.double(), None, None, w.double(), b.double(), 1e-5)[1], dtype)
    xo2, none = K.scale_add_layer_norm(x, d, s, None, None, 1e-5)  # the residual alone
    assert none is None and torch.equal(xo2, rx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,D,W", ATTN_SHAPES)
def test_qkv_rope_write(B, H, D, W, dtype):
    g = torch.Generator().manual_seed(B + H + D + W)
    S = B + 2
    qkv = _randn(B, 3, H, D, dtype=dtype, g=g)
    pos = torch.randint(0, 10000, (B,), generator=g).to(DEV)
    slots = torch.randperm(S, generator=g)[:B].to(DEV)
    ridx = pos % W
    rings = [torch.zeros(S, H, W, D, device=DEV, dtype=dtype) for _ in range(4)]
    q = K.qkv_rope_write(qkv, pos, 10000.0, slots, ridx, rings[0], rings[1])
    qr = qkv_rope_write_ref(qkv, pos, 10000.0, slots, ridx, rings[2], rings[3])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(q, qr, **tol)
    torch.testing.assert_close(rings[0], rings[2], **tol)
    assert torch.equal(rings[1], rings[3])  # v is copied


@pytest.mark.parametrize("B,T,H,D,W", ([(1, 2, 8, 64, 250), (32, 2, 8, 64, 250)] if CUDA else [])
                         + [(1, 2, 2, 16, 5), (3, 3, 2, 8, 7)])
def test_qkv_rope_write_of_chunks(B, T, H, D, W):
    # Mimi's transformer: T new positions per slot from the slot's position, ring entry = position
    # mod W, the same as the rows spelt out one by one
    g = torch.Generator().manual_seed(B * T + W)
    S = B + 2
    qkv = _randn(B * T, 3, H, D, dtype=torch.float32, g=g)
    pos = torch.randint(0, 1000, (B,), generator=g).to(DEV)
    slots = torch.randperm(S, generator=g)[:B].to(DEV)
    rows_pos = (pos.view(B, 1) + torch.arange(T, device=DEV)).view(-1)
    rings = [torch.zeros(S, H, W, D, device=DEV) for _ in range(6)]
    q = K.qkv_rope_write(qkv, pos, 10000.0, slots, None, rings[0], rings[1], per=T)
    qr = qkv_rope_write_ref(qkv, pos, 10000.0, slots, None, rings[2], rings[3], per=T)
    qe = qkv_rope_write_ref(qkv, rows_pos, 10000.0, slots.repeat_interleave(T), rows_pos % W, rings[4], rings[5])
    assert torch.equal(qr, qe) and torch.equal(rings[2], rings[4]) and torch.equal(rings[3], rings[5])
    torch.testing.assert_close(q, qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rings[0], rings[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(rings[1], rings[3])
    assert int((rings[1] != 0).any(-1).sum()) == B * T * H  # every row's v landed in its own entry


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,D,W", ATTN_SHAPES)
def test_decode_attention(B, H, D, W, dtype):
    g = torch.Generator().manual_seed(7 * B + W)
    S = B + 1
    q = _randn(B, H, D, dtype=dtype, g=g)
    k = _randn(S, H, W, D, dtype=dtype, g=g)
    v = _randn(S, H, W, D, dtype=dtype, g=g)
    slots = torch.randperm(S, generator=g)[:B].to(DEV)
    lengths = torch.randint(1, W + 1, (B,), generator=g).to(DEV)
    lengths[0] = W  # a full ring
    poison = torch.full((B, H, D), float("nan"), device=DEV, dtype=dtype)
    out = K.decode_attention(q, k, v, slots, lengths)
    assert not torch.isnan(out).any() and not torch.equal(out, poison)
    ref = decode_attention_ref(q, k, v, slots, lengths)
    ref64 = decode_attention_ref(q.double(), k.double(), v.double(), slots, lengths)
    _check(out, ref, ref64, dtype)
    for nsplit in (1, 4):  # any split gives the same function
        _check(K.decode_attention(q, k, v, slots, lengths, nsplit=nsplit), ref, ref64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", [(1, 11264), (4, 2816)] if CUDA else [(1, 88), (3, 50)])
def test_silu_mul(B, N, dtype):
    g = torch.Generator().manual_seed(N)
    x = _randn(B, 2 * N, dtype=dtype, g=g)
    out = K.silu_mul(x)
    _check(out, silu_mul_ref(x), silu_mul_ref(x.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 64, 1926), (1, 512, 2)] if CUDA else [(2, 4, 61), (1, 3, 5)])
def test_elu(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = _randn(*shape, dtype=dtype, g=g)
    _check(K.elu(x), elu_ref(x), elu_ref(x.double()), dtype)
    # into a transposed output (the transposed convolution's rows), and from a transposed view
    B, C, T = shape
    out = torch.full((B, T, C), float("nan"), device=DEV, dtype=dtype)
    assert K.elu(x, out=out.transpose(1, 2)).data_ptr() == out.data_ptr()
    assert torch.equal(out.transpose(1, 2), K.elu(x))
    assert torch.equal(K.elu(out.transpose(1, 2)), K.elu(K.elu(x)))


@pytest.mark.parametrize("B,V,k", ([(1, 32000, 25), (8, 2048, 250), (32, 2048, 250)] if CUDA else [])
                         + [(1, 37, 5), (3, 300, 25), (2, 2048, 1), (2, 100, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_matches_the_reference(B, V, k, dtype):
    # bfloat16 logits (what the model gives) have many ties, and take the shorter radix select
    g = torch.Generator().manual_seed(V + k)
    logits = (3 * torch.randn(B, V, generator=g)).to(DEV, dtype)
    temp = torch.linspace(0.5, 1.2, B).to(DEV)
    top_k = torch.full((B,), k, dtype=torch.long, device=DEV)
    greedy = torch.zeros(B, dtype=torch.bool, device=DEV)
    seed = torch.arange(B, dtype=torch.long, device=DEV) * 1000 + 5
    agree, n = 0, 0
    for counter in range(40):
        c = torch.full((B,), counter, dtype=torch.long, device=DEV)
        out = K.sample_tokens(logits, temp, top_k, greedy, seed, c, 3)
        ref = sample_tokens_ref(logits, temp, top_k, greedy, seed, c, 3)
        kth = logits.float().topk(k, dim=-1).values[:, -1]
        assert (logits.float().gather(1, out[:, None])[:, 0] >= kth).all()  # within the top k, ties included
        agree += (out == ref).sum().item()
        n += B
    # identical hash and threshold; only last-ulp differences of log() may flip a near-tie
    assert agree >= 0.99 * n
    greedy[:] = True
    assert torch.equal(K.sample_tokens(logits, temp, top_k, greedy, seed, c, 3), logits.argmax(-1))
    # teacher-forced rows take the given token, written into a strided column of a buffer;
    # half-precision logits are read as float32
    forced = (torch.arange(2 * B, device=DEV) + 7).view(B, 2)[:, 1]   # strided, as a column of the ring
    fmask = (torch.arange(3 * B, device=DEV) % 2 == 0).view(B, 3)[:, 0]
    buf = torch.full((B, 3), -5, dtype=torch.long, device=DEV)
    half = logits.to(torch.float16)
    K.sample_tokens(half, temp, top_k, greedy, seed, c, 3, forced=forced, forced_mask=fmask, out=buf[:, 1])
    expect = torch.where(fmask, forced, half.float().argmax(-1))
    assert torch.equal(buf[:, 1], expect) and (buf[:, 0] == -5).all() and (buf[:, 2] == -5).all()
    ref_buf = torch.full((B, 3), -5, dtype=torch.long, device=DEV)
    sample_tokens_ref(half, temp, top_k, greedy, seed, c, 3, forced, fmask, out=ref_buf[:, 1])
    assert torch.equal(ref_buf, buf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,D", [(1, 16, 64), (8, 16, 64)] if CUDA else [(1, 2, 16), (3, 2, 32)])
def test_step_attention(B, H, D, dtype):
    from engine.kernels import step_attention_ref

    g = torch.Generator().manual_seed(B + H)
    kb = [torch.zeros(B, 8, H, D, device=DEV, dtype=dtype) for _ in range(4)]
    for step in range(8):
        qkv = _randn(B, 3, H, D, dtype=dtype, g=g)
        out = K.step_attention(qkv, kb[0], kb[1], step)
        ref = step_attention_ref(qkv, kb[2], kb[3], step)
        ref64 = step_attention_ref(qkv.double(), kb[2].double().clone(), kb[3].double().clone(), step)
        _check(out, ref, ref64, dtype)
        assert torch.equal(kb[0][:, :step + 1], kb[2][:, :step + 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D,W,end", ([(2, 2, 8, 64, 249, [2, 1000]), (1, 2, 8, 64, 249, [250])] if CUDA else [])
                         + [(2, 2, 2, 16, 15, [2, 40]), (3, 2, 2, 16, 15, [14, 15, 16]), (1, 1, 2, 16, 7, [3])])
def test_ring_chunk_attention(B, T, H, D, W, end, dtype):
    from engine.kernels import ring_chunk_attention_ref

    g = torch.Generator().manual_seed(W + B)
    S = B + 1
    q = _randn(B, T, H, D, dtype=dtype, g=g)
    k = _randn(S, H, W, D, dtype=dtype, g=g)
    v = _randn(S, H, W, D, dtype=dtype, g=g)
    slots = torch.randperm(S, generator=g)[:B].to(DEV)
    end = torch.tensor(end, device=DEV)
    ref = ring_chunk_attention_ref(q, k, v, slots, end)
    ref64 = ring_chunk_attention_ref(q.double(), k.double(), v.double(), slots, end)
    _check(K.ring_chunk_attention(q, k, v, slots, end), ref, ref64, dtype)
    # the ring read in blocks, some holding no key a query may see (online softmax), by one
    # program per query and head, and split over several, combined after
    for config in ((4, 1, 1), (4, 1, 4), (8, 2, 2)):
        _check(K.ring_chunk_attention(q, k, v, slots, end, config=config), ref, ref64, dtype)


@pytest.mark.parametrize("M,N,KD", ([(1, 3072, 1024), (8, 5632, 1024), (16, 1024, 2816), (1, 1024, 4096),
                                     (32, 12288, 4096), (64, 4096, 11264)] if CUDA else [])
                         + [(1, 40, 64), (3, 33, 130), (16, 16, 16), (33, 20, 300), (64, 17, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32] if CUDA else [torch.float16])
def test_small_linear(M, N, KD, dtype):
    # bf16 on the GPU, and float32 (Mimi's products, in full float32 as cuBLAS computes them);
    # float16 under the interpreter, whose tl.dot mishandles bf16
    g = torch.Generator().manual_seed(M * N)
    x = _randn(M, KD, dtype=dtype, g=g)
    w = (torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEV, dtype)
    out = K.small_linear(x, w)
    ref = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    _check(out, ref, torch.nn.functional.linear(x.double(), w.double()), dtype)


@pytest.mark.parametrize("M,N,KD,config", ([(2, 1536, 512, (8, 256, 4, 3)), (4, 512, 2048, (4, 512, 4, 3)),
                                            (2, 4096, 4096, (16, 128, 4, 3))] if CUDA else [])
                         + [(1, 40, 64, (8, 256, 4, 3)), (3, 33, 130, (16, 128, 4, 3)), (4, 5, 300, (4, 256, 4, 3)),
                            (2, 17, 40, (4, 512, 4, 3))])
@pytest.mark.parametrize("dtype", DTYPES if CUDA else [torch.float32, torch.float16])
def test_few_rows_linear_without_dot(M, N, KD, config, dtype):
    # up to 4 rows multiplied on the CUDA cores (Mimi's 2 rows a frame per session), every
    # block shape the calibration may pick, N and K not multiples of blocks; e4m3 W too
    from engine.kernels import linear_fp8_ref
    from engine.quant import quantize_rows

    g = torch.Generator().manual_seed(M * N + KD)
    x = _randn(M, KD, dtype=dtype, g=g)
    w = (torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEV, dtype)
    out = K.rows_linear(x, w, None, config, fma=True)
    ref = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    _check(out, ref, torch.nn.functional.linear(x.double(), w.double()), dtype)
    if dtype != torch.float32:
        w8, s = quantize_rows(w.float())
        assert _rel(K.rows_linear(x, w8, s, config, fma=True), linear_fp8_ref(x, w8, s)) < 8e-3


@pytest.mark.parametrize("M,N,KD,kind,config", ([(2, 2048, 512, "few", (4, 512, 4, 3)),
                                                 (16, 2048, 512, "rows", (16, 256, 4, 3))] if CUDA else [])
                         + [(2, 40, 64, "few", (8, 256, 4, 3)), (3, 33, 130, "rows", (16, 128, 4, 3)),
                            (1, 17, 40, "gemv", (8, 256, 4, 3))])
def test_gelu_linear(M, N, KD, kind, config):
    # Mimi's feed-forward input in float32: the product's GELU in the same launch matches F.gelu
    # of the product; the one-row kernel, which has no GELU, applies it after
    L = importlib.import_module("engine.kernels.linear")
    g = torch.Generator().manual_seed(M * N + KD + 7)
    x = _randn(M, KD, dtype=torch.float32, g=g)
    w = (torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEV)
    out = L._run_kernel((kind, config), x, w, None, gelu=True)
    ref64 = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), w.double()))
    assert _rel(out, ref64) < 1e-5
    assert _rel(out, torch.nn.functional.gelu(torch.nn.functional.linear(x, w))) < 1e-5


# (the interpreter rounds to bfloat16 by truncation, so half precision is float16 there)
@pytest.mark.parametrize("dtype", DTYPES if CUDA else [torch.float32, torch.float16])
@pytest.mark.parametrize("N,KD,config", ([(3072, 1024, (8, 256, 4, 3)), (1024, 2816, (4, 512, 4, 3)),
                                          (4096, 4096, (2, 1024, 4, 4))] if CUDA else [])
                         + [(40, 64, (8, 256, 4, 3)), (33, 130, (16, 128, 4, 3)), (5, 300, (4, 512, 4, 3))])
def test_gemv(N, KD, config, dtype):
    # one row against W, every block shape the calibration may pick, K and N not multiples of blocks
    g = torch.Generator().manual_seed(N + KD)
    x = _randn(1, KD, dtype=dtype, g=g)
    w = (torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEV, dtype)
    out = K.gemv(x, w, config=config)
    ref = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    _check(out, ref, torch.nn.functional.linear(x.double(), w.double()), dtype)


@pytest.mark.parametrize("N,KD", ([(3072, 1024), (1024, 2816)] if CUDA else []) + [(40, 64), (33, 130)])
@pytest.mark.parametrize("delta", [True, False])
def test_norm_and_silu_fused_into_gemv(N, KD, delta):
    # the fused launches equal add_rms_norm / silu_mul followed by gemv, roundings included
    from engine.kernels import silu_mul_ref

    dtype = torch.float16 if not CUDA else torch.bfloat16
    g = torch.Generator().manual_seed(N * KD + delta)
    x = _randn(1, KD, dtype=dtype, g=g)
    d = _randn(1, KD, dtype=dtype, g=g) if delta else None
    alpha = (1 + 0.1 * torch.randn(KD, generator=g)).to(DEV, dtype)
    w = (torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEV, dtype)
    xo, y = K.norm_gemv(x, d, alpha, 1e-5, w, config=(8, 64, 4, 2))
    from engine.kernels import rms_norm_ref
    x_ref, h_ref = add_rms_norm_ref(x, d, alpha, 1e-5) if delta else (x, rms_norm_ref(x, alpha, 1e-5))
    assert torch.equal(xo, x_ref)
    y_ref = K.gemv(h_ref, w, config=(8, 64, 4, 2))
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    gu = _randn(1, 2 * KD, dtype=dtype, g=g)
    torch.testing.assert_close(K.silu_gemv(gu, w, config=(8, 64, 4, 2)),
                               K.gemv(silu_mul_ref(gu), w, config=(8, 64, 4, 2)), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("N,KD", ([(3072, 1024), (12288, 4096)] if CUDA else []) + [(40, 64), (33, 130)])
@pytest.mark.parametrize("delta", ["none", "row", "id"])
def test_prologues_fused_into_gemv(N, KD, delta):
    # The one-row product's prologue (RMSNorm after a residual add or an embedding lookup, gated
    # SiLU, or the add alone) equals those ops run first and then the product, roundings included.
    from engine.kernels import embedding_ref, rms_norm_ref, silu_mul_ref

    dtype = torch.float16 if not CUDA else torch.bfloat16
    g = torch.Generator().manual_seed(N * KD + len(delta))
    x = _randn(1, KD, dtype=dtype, g=g)
    alpha = (1 + 0.1 * torch.randn(KD, generator=g)).to(DEV, dtype)
    w = (torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEV, dtype)
    cfg = (8, 64, 4, 2)
    tol = dict(rtol=1e-2, atol=1e-2)  # a few elements of the norm's output may differ by one rounding
    gu = _randn(1, 2 * KD, dtype=dtype, g=g)
    torch.testing.assert_close(K.silu_gemv(gu, w, None, cfg), K.gemv(silu_mul_ref(gu), w, None, cfg), **tol)
    d = ids = None
    if delta == "row":
        d = d_ref = _randn(1, KD, dtype=dtype, g=g)
    for i in ([-1, 4, -3] if delta == "id" else [None]):  # id -1 adds nothing, other negatives take row 0
        if i is not None:
            d = _randn(9, KD, dtype=dtype, g=g)
            ids = torch.tensor([i], device=DEV)
            d_ref = embedding_ref(ids, d)
        x_ref, h_ref = add_rms_norm_ref(x, d_ref, alpha, 1e-5) if d is not None else (x, rms_norm_ref(x, alpha, 1e-5))
        xo, y = K.gemv(x, w, None, cfg, K.Prologue(1, d, ids, alpha, 1e-5))
        assert torch.equal(xo, x_ref)
        torch.testing.assert_close(y, K.gemv(h_ref, w, None, cfg), **tol)
        if d is not None:
            torch.testing.assert_close(K.gemv(x, w, None, cfg, K.Prologue(3, d, ids))[1],
                                       K.gemv(x + d_ref, w, None, cfg), **tol)


@pytest.mark.parametrize("gain_us,fused", [(0.3, True), (0.8, False)])
def test_fused_pick_takes_the_separate_kernels_only_when_they_win_clearly(monkeypatch, gain_us, fused):
    # The calibration of a one-row product with a prologue times the separate kernels and each
    # block shape of the one-launch kernel (each run once here); the separate kernels are kept
    # only when they are faster by more than an extra launch's hidden cost (0.5 us).
    L = importlib.import_module("engine.kernels.linear")
    from engine.kernels import rms_norm_ref

    dtype = torch.float16 if not CUDA else torch.bfloat16
    g = torch.Generator().manual_seed(7)
    x = _randn(1, 64, dtype=dtype, g=g)
    alpha = (1 + 0.1 * torch.randn(64, generator=g)).to(DEV, dtype)
    w = (torch.randn(40, 64, generator=g) / 8).to(DEV, dtype)
    cands = [i for i in L._candidates(1) if L._CONFIGS[i][0] == "gemv"][:3]
    L.product(x, w)  # (the plain product's own pick first, on a GPU timed for real, not by fake_time)
    ran, times = [], [10e-3] + [10e-3 + gain_us * 1e-3, 10e-3 + (gain_us + 0.1) * 1e-3, 11e-3]

    def fake_time(fn, n):
        ran.append(fn(0))
        return times[len(ran) - 1]

    monkeypatch.setattr(L, "_time", fake_time)
    pick = L._pick_fused(x, w, None, K.Prologue(1, None, None, alpha, 1e-5),
                         lambda w_, s_: (x, L.product(rms_norm_ref(x, alpha, 1e-5), w_)), cands, "key")
    assert len(ran) == 4
    assert pick == (cands[0] if fused else -1)
    for out in ran[1:]:  # every candidate computed the same product as the separate kernels
        torch.testing.assert_close(out[1], ran[0][1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("M", [1, 3])
def test_norm_linear_with_an_embedding(M):
    # the depformer's first norm and product, with the token embedding as the residual: one
    # launch for one row, the lookup, the norm and the product for several
    import engine.kernels.dispatch as dispatch
    from engine.kernels import embedding_ref, norm_linear, rms_norm_ref

    dtype = torch.float16 if not CUDA else torch.bfloat16
    g = torch.Generator().manual_seed(M)
    x = _randn(M, 64, dtype=dtype, g=g)
    table = _randn(9, 64, dtype=dtype, g=g)
    alpha = (1 + 0.1 * torch.randn(64, generator=g)).to(DEV, dtype)
    w = (torch.randn(40, 64, generator=g) / 8).to(DEV, dtype)
    ids = torch.tensor([-1, 5, -2][:M], device=DEV)
    x_ref = x + embedding_ref(ids, table)
    old = dispatch._on_cpu
    dispatch._on_cpu = True  # the Triton path, under the interpreter on the CPU
    try:
        xo, y = norm_linear(x, table, alpha, 1e-5, w, ids=ids)
    finally:
        dispatch._on_cpu = old
    assert torch.equal(xo, x_ref)
    ref = torch.nn.functional.linear(rms_norm_ref(x_ref, alpha, 1e-5).float(), w.float()).to(dtype)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------
# FP8: e4m3 weights and KV cache (float16 activations under the interpreter, bf16 on a GPU)

FP8_ACT = torch.bfloat16 if CUDA else torch.float16


@pytest.mark.parametrize("M,N,KD", ([(1, 22528, 4096), (8, 4096, 11264), (64, 3072, 1024), (160, 22528, 4096),
                                     (136, 4096, 11264)] if CUDA else [])
                         + [(1, 40, 64), (3, 33, 130), (20, 70, 96), (150, 40, 96)])
def test_fp8_linear(M, N, KD):
    """(Past 64 rows, a prefill's products: blocks of 64 rows side by side; with K split too.)"""
    from engine.kernels import linear_fp8_ref
    from engine.quant import quantize_rows

    g = torch.Generator().manual_seed(M + N)
    x = _randn(M, KD, dtype=FP8_ACT, g=g)
    w8, s = quantize_rows((torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEV))
    ref = linear_fp8_ref(x, w8, s)
    L = importlib.import_module("engine.kernels.linear")
    outs = [K.fp8_linear(x, w8, s)]
    if M == 1:  # the one-row kernel in each block shape the calibration may pick for e4m3 (one here)
        outs += [K.gemv(x, w8, s, L._CONFIGS[i][1]) for i in L._candidates(1, fp8=True)
                 if L._CONFIGS[i][0] == "gemv"][:None if CUDA else 1]
    if M > 64:  # a prefill's rows: each block shape its calibration may pick (on the CPU, one)
        outs += [L._run_kernel(L._CONFIGS[i], x, w8, s) for i in L._candidates(M, fp8=True)] if CUDA else \
            [K.rows_linear(x, w8, s, (16, 32, 4, 1), block_m=32, m_fast=True)]
    # K split in 3 (2 for K = 1024), the partial sums added by a second kernel
    outs.append(K.rows_linear(x, w8, s, (32, 256, 4, 3) if CUDA else (16, 32, 4, 1), splits=3))
    for out in outs:
        # the same products accumulated in float32 in another order, then one rounding
        assert _rel(out, ref) < 1e-2 if not CUDA else _rel(out, ref) < 8e-3


def test_every_e4m3_code_decodes_exactly_in_the_products():
    """Each finite e4m3 code, in each byte of a 4-byte word, multiplies as its exact value in the
    one-row product (decoded to float32) and the small-batch one (decoded to the activation
    dtype): one-hot rows read columns of W back, in every decoding the GPU runs."""
    from engine.quant import FP8

    codes = (torch.arange(256).unsqueeze(1) + torch.arange(64).unsqueeze(0)) % 256  # [N, K]: each column all codes
    codes[(codes & 0x7F) == 0x7F] = 0  # (e4m3fn's NaN)
    w8 = codes.to(torch.uint8).view(FP8).to(DEV)
    one = torch.ones(256, device=DEV)
    exact = w8.float()
    assert exact.abs().max() == 448 and (exact.abs() < 2 ** -6).sum() > 0  # (the extremes and subnormals are in)
    for fast in ([True, False] if CUDA else [False]):
        K.set_fast_e4m3(fast)
        try:
            assert K.fast_e4m3(w8) == fast
            for j in range(8):
                x = torch.zeros(1, 64, device=DEV, dtype=FP8_ACT)
                x[0, j] = 1
                for cfg in [(8, 256, 4, 3)] + ([(4, 1024, 4, 3)] if CUDA else []):
                    assert torch.equal(K.gemv(x, w8, one, cfg).float()[0], exact[:, j]), (fast, j, cfg)
            eye = torch.eye(64, device=DEV, dtype=FP8_ACT)[:16]
            assert torch.equal(K.rows_linear(eye, w8, one, (32, 64, 4, 3)).float(), exact[:, :16].T), fast
            assert torch.equal(K.rows_linear(eye[:4], w8, one, (8, 64, 4, 3), fma=True).float(), exact[:, :4].T), fast
        finally:
            K.set_fast_e4m3(True)


@pytest.mark.parametrize("B,H,D,W", ATTN_SHAPES)
def test_fp8_kv_write_and_attention(B, H, D, W):
    from engine.quant import FP8

    g = torch.Generator().manual_seed(11 * B + W)
    S = B + 2
    qkv = _randn(B, 3, H, D, dtype=FP8_ACT, g=g)
    pos = torch.randint(0, 10000, (B,), generator=g).to(DEV)
    slots = torch.randperm(S, generator=g)[:B].to(DEV)
    ridx = pos % W
    rings = [(_randn(S, H, W, D, dtype=torch.float32, g=g)).to(FP8) for _ in range(4)]
    scales = [torch.rand(S, H, W, generator=g).to(DEV) + 0.01 for _ in range(4)]
    for r in (rings[2], rings[3]):
        r.copy_(rings[0] if r is rings[2] else rings[1])
    scales[2].copy_(scales[0])
    scales[3].copy_(scales[1])
    q = K.qkv_rope_write(qkv, pos, 10000.0, slots, ridx, rings[0], rings[1], scales[0], scales[1])
    qr = qkv_rope_write_ref(qkv, pos, 10000.0, slots, ridx, rings[2], rings[3], scales[2], scales[3])
    torch.testing.assert_close(q, qr, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(scales[0], scales[2], rtol=1e-3, atol=1e-6)
    agree = (rings[0].float() == rings[2].float()).float().mean().item()
    assert agree > 0.99  # the same e4m3 codes but for rounding ties of the scaled value
    lengths = torch.randint(1, W + 1, (B,), generator=g).to(DEV)
    out = K.decode_attention(q, rings[0], rings[1], slots, lengths, k_scale=scales[0], v_scale=scales[1])
    ref = decode_attention_ref(q, rings[0], rings[1], slots, lengths, scales[0], scales[1])
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("N,H,D", ([(136, 32, 128)] if CUDA else []) + [(7, 2, 16), (20, 3, 8)])
def test_rope_qkv_for_the_prefill(N, H, D):
    # the prefill's rope: the decode kernel writing k and v into one-entry rings, one per row
    from engine.kernels import rope_ref
    from engine.kernels.dispatch import triton_enabled
    from engine.kernels.rope import rope_qkv

    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator().manual_seed(N * H + D)
    qkv = _randn(N, 3, H, D, dtype=dtype, g=g)
    pos = torch.randint(0, 3000, (N,), generator=g).to(DEV)
    q_ref, k_ref = rope_ref(qkv[:, 0], qkv[:, 1], pos, 10000.0)
    import engine.kernels.dispatch as dispatch
    old = dispatch._on_cpu
    dispatch._on_cpu = True  # the Triton path, under the interpreter on the CPU
    try:
        assert triton_enabled(qkv)
        q, k, v = rope_qkv(qkv, pos, 10000.0)
    finally:
        dispatch._on_cpu = old
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(v, qkv[:, 2])


@pytest.mark.parametrize("H,D,S,N,config", ([(16, 64, 8, 1024, (4, 1024, 4, 3)), (16, 64, 8, 1024, (8, 256, 4, 3))]
                                            if CUDA else [])
                         + [(4, 16, 8, 40, (8, 64, 4, 2)), (3, 16, 4, 33, (4, 32, 4, 2))])
def test_step_attention_fused_into_gemv(H, D, S, N, config):
    # the depformer's in-frame attention as the out-product's prologue equals step_attention and
    # then the same product, and leaves the same k and v buffers, at every step of a frame
    dtype = torch.float16 if not CUDA else torch.bfloat16
    g = torch.Generator().manual_seed(H * D + N)
    w = (torch.randn(N, H * D, generator=g) / (H * D) ** 0.5).to(DEV, dtype)
    kb, vb = (torch.zeros(1, S, H, D, device=DEV, dtype=dtype) for _ in range(2))
    kr, vr = kb.clone(), vb.clone()
    for step in range(S):
        qkv = _randn(1, 3, H, D, dtype=dtype, g=g)
        y = K.gemv(qkv.reshape(1, -1), w, None, config, K.Prologue.step_attention(kb, vb, step))[1]
        a = K.step_attention(qkv, kr, vr, step).reshape(1, H * D)
        torch.testing.assert_close(y, K.gemv(a, w, None, config), rtol=2e-3, atol=2e-3)
        assert torch.equal(kb, kr) and torch.equal(vb, vr)


def test_the_kernels_compile_for_hopper():
    # The CPU runs the kernels through the interpreter, which does not compile them and lets
    # pass what the compiler rejects (a loop-carried variable changing type, for one): each
    # variant the tick launches is compiled for sm_90 here, no GPU needed (tests/compile_check.py).
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_check.py"))], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.count("ok ") >= 17, r.stdout



@pytest.mark.parametrize("B,N,D", ([(1, 2048, 256), (16, 2048, 256)] if CUDA else []) + [(3, 37, 8), (2, 64, 5)])
def test_rvq_step_picks_the_first_nearest_centroid(B, N, D):
    # Mimi's residual VQ step: the same codes and residuals as the reference, bit for bit
    # (codes feed the LM exactly), and of two equal centroids the first, as torch's argmin
    from engine.kernels.codec import rvq_step_ref

    g = torch.Generator().manual_seed(N + D)
    cb = _randn(N, D, dtype=torch.float32, g=g)
    cb[N // 2] = cb[1]
    x = _randn(B, D, dtype=torch.float32, g=g)
    x[0] = cb[1]
    norms, scores = (cb * cb).sum(-1), x @ cb.t()
    codes, ref_codes = torch.full((B, 3), -1, device=DEV), torch.full((B, 3), -1, device=DEV)
    out = K.rvq_step(x, scores, norms, cb, codes[:, 1])
    ref = rvq_step_ref(x, scores, norms, cb, ref_codes[:, 1])
    assert torch.equal(codes, ref_codes) and torch.equal(out, ref)
    assert codes[0, 1].item() == 1 and (codes[:, [0, 2]] == -1).all()


@pytest.mark.parametrize("B,C,T,tail,act,fresh", ([(1, 64, 1920, 2, True, False), (4, 512, 2, 2, False, True)]
                                                  if CUDA else [])
                         + [(2, 3, 8, 2, True, False), (3, 5, 1, 6, True, False), (3, 4, 2, 2, False, True),
                            (1, 2, 1100, 2, True, False)])
def test_conv_input_reads_and_advances_the_slots_tails(B, C, T, tail, act, fresh):
    # Mimi's streaming convolution input: [kept tail | elu(x)], the slot's tail advanced in
    # place (a fresh slot's tail: x's first column repeated); x may be a transposed view
    from engine.kernels.codec import conv_input_ref

    g = torch.Generator().manual_seed(C * T + tail)
    S = B + 2
    x = _randn(B, T, C, dtype=torch.float32, g=g).transpose(1, 2)
    tails = _randn(S, C, tail, dtype=torch.float32, g=g)
    slots = torch.randperm(S, generator=g)[:B].to(DEV)
    flags = (torch.arange(S) % 2 == 0).to(DEV) if fresh else None
    t_ref = tails.clone()
    out = K.conv_input(x, tails, slots, act, flags)
    ref = conv_input_ref(x, t_ref, slots, act, flags)
    if act:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # (exp - 1 against torch's expm1)
        torch.testing.assert_close(tails, t_ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, ref) and torch.equal(tails, t_ref)
    others = [s for s in range(S) if s not in slots.tolist()]
    assert torch.equal(tails[others], t_ref[others])


@pytest.mark.parametrize("B,C,T,kernel,stride,dil,act,fresh",
                         ([(1, 64, 1920, 3, 1, 1, True, False), (1, 512, 2, 7, 1, 1, False, False),
                           (2, 256, 16, 12, 6, 1, True, False), (4, 512, 2, 4, 2, 1, False, True)] if CUDA else [])
                         + [(2, 3, 8, 3, 1, 1, True, False), (3, 5, 4, 3, 1, 2, True, False),
                            (2, 4, 6, 6, 3, 1, True, False), (3, 4, 2, 4, 2, 1, False, True),
                            (1, 1, 12, 7, 1, 1, False, False), (1, 2, 1100, 3, 1, 1, True, False)])
def test_conv_columns_make_the_convolution_one_product(B, C, T, kernel, stride, dil, act, fresh):
    # a streaming convolution's input as the product's columns, written from the slot's tail and
    # x (a transposed view) with the tail advanced as `conv_input` advances it: cols @ W^T is
    # the convolution of [tail | elu(x)]
    from engine.kernels.codec import conv_columns_ref, conv_input_ref

    g = torch.Generator().manual_seed(C * T + kernel + dil)
    S = B + 2
    tail = (kernel - 1) * dil + 1 - stride
    x = _randn(B, T, C, dtype=torch.float32, g=g).transpose(1, 2)
    tails = _randn(S, C, tail, dtype=torch.float32, g=g)
    slots = torch.randperm(S, generator=g)[:B].to(DEV)
    flags = (torch.arange(S) % 2 == 0).to(DEV) if fresh else None
    t_ref, t_in = tails.clone(), tails.clone()
    cols = K.conv_columns(x, tails, slots, act, kernel, stride, dil, flags)
    ref = conv_columns_ref(x, t_ref, slots, act, kernel, stride, dil, flags)
    assert cols.shape == (B * (T // stride), C * kernel)
    torch.testing.assert_close(cols, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tails, t_ref, rtol=1e-6, atol=1e-6)
    w = _randn(5, C, kernel, dtype=torch.float32, g=g)
    conv = torch.nn.functional.conv1d(conv_input_ref(x, t_in, slots, act, flags).double(), w.double(), stride=stride,
                                      dilation=dil)
    prod = (ref.double() @ w.view(5, -1).double().t()).view(B, T // stride, 5).transpose(1, 2)
    torch.testing.assert_close(prod, conv, rtol=1e-9, atol=1e-9)
    others = [s for s in range(S) if s not in slots.tolist()]
    assert torch.equal(tails[others], t_ref[others])


@pytest.mark.parametrize("B,T,C,S,bias,channels_last", ([(1, 2, 512, 8, True, False), (1, 1, 512, 2, False, True)]
                                                         if CUDA else [])
                         + [(2, 3, 5, 4, True, False), (3, 1, 6, 2, False, True), (2, 2, 3, 3, True, True)])
def test_overlap_add_advances_the_slots_partials(B, T, C, S, bias, channels_last):
    # a transposed convolution's overlap-add (kernel 2 x stride): frame t's first half plus frame
    # t - 1's second half, the slot's kept partial standing in for frame -1 and replaced;
    # channels_last: the output laid out [B, T * S, C] (the decoder transformer's rows)
    from engine.kernels.codec import overlap_add_ref

    g = torch.Generator().manual_seed(B * T * C + S)
    slots_n = B + 2
    y = _randn(B, T, C, 2 * S, dtype=torch.float32, g=g)
    part = _randn(slots_n, C, S, dtype=torch.float32, g=g)
    b = _randn(C, dtype=torch.float32, g=g) if bias else None
    slots = torch.randperm(slots_n, generator=g)[:B].to(DEV)
    p_old, p_ref = part.clone(), part.clone()
    out = K.overlap_add(y, part, slots, b, channels_last)
    ref = overlap_add_ref(y, p_ref, slots, b, channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(part, p_ref, rtol=1e-6, atol=1e-6)
    assert (out.stride(1) == 1) == channels_last and (ref.stride(1) == 1) == channels_last
    torch.testing.assert_close(out[..., :S], y[:, 0, :, :S] + p_old[slots], rtol=1e-6, atol=1e-6)
    last = y[:, T - 1, :, S:] + (b.view(1, C, 1) if bias else 0)
    torch.testing.assert_close(part[slots], last, rtol=1e-6, atol=1e-6)
    others = [i for i in range(slots_n) if i not in slots.tolist()]
    assert torch.equal(part[others], p_old[others])


@pytest.mark.parametrize("B,n,bins,D,width", ([(1, 8, 2048, 512, 4), (32, 8, 2048, 512, 4)] if CUDA else [])
                         + [(2, 3, 10, 6, 4), (3, 8, 16, 130, 3)])
def test_codebook_sum_of_strided_codes(B, n, bins, D, width):
    # Mimi's decoder input: the codes' projected centroids summed, times the upsampling kernel;
    # codes are a strided column block of the sampled tokens, and out-of-range ones clamp
    from engine.kernels.codec import codebook_sum_ref

    g = torch.Generator().manual_seed(n * bins + D)
    tables = _randn(n, bins, D, dtype=torch.float32, g=g)
    scale = _randn(D, width, dtype=torch.float32, g=g)
    tokens = torch.randint(0, bins, (B, n + 3), generator=g).to(DEV)
    tokens[0, 1] = bins + 5  # (the LM's initial token, past the codebooks)
    codes = tokens[:, 1:1 + n]
    ref = codebook_sum_ref(codes, tables, scale)
    torch.testing.assert_close(K.codebook_sum(codes, tables, scale), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ref[0, :, 0], (tables[0, bins - 1] + sum(tables[k, codes[0, k]] for k in range(1, n)))
                               * scale[:, 0], rtol=1e-5, atol=1e-5)
