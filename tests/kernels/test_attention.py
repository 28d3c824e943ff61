"""Decode attention over KV rings (bf16 and e4m3), the depformer's in-frame attention and Mimi's
ring attention against their references."""
import pytest
import torch

from engine.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from engine.kernels.ring_attention import ring_chunk_attention_ref, ring_chunk_attention_triton
from engine.kernels.step_attention import step_attention_ref, step_attention_triton
from engine.quant import FP8

from kernel_cases import DEVICE, DTYPES, HALF, check, gpu, randn, rel, to_pages

RING_SHAPES = [gpu(1, 32, 128, 2999), gpu(8, 32, 128, 2999), gpu(4, 16, 64, 16),
               (1, 4, 16, 19), (3, 2, 32, 37), (2, 3, 16, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,D,W", RING_SHAPES)
def test_decode_attention(B, H, D, W, dtype):
    g = torch.Generator().manual_seed(7 * B + W)
    S = B + 1
    q = randn(B, H, D, dtype=dtype, g=g)
    k = randn(S, H, W, D, dtype=dtype, g=g)
    v = randn(S, H, W, D, dtype=dtype, g=g)
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    lengths = torch.randint(1, W + 1, (B,), generator=g).to(DEVICE)
    lengths[0] = W  # a full ring
    out = decode_attention_triton(q, k, v, slots, lengths)
    assert not torch.isnan(out).any()
    ref = decode_attention_ref(q, k, v, slots, lengths)
    ref64 = decode_attention_ref(q.double(), k.double(), v.double(), slots, lengths)
    check(out, ref, ref64, dtype)
    for nsplit in (1, 4):  # any split gives the same function
        check(decode_attention_triton(q, k, v, slots, lengths, nsplit=nsplit), ref, ref64, dtype)


@pytest.mark.parametrize("B,H,D,W", RING_SHAPES)
def test_decode_attention_over_e4m3_rings(B, H, D, W):
    g = torch.Generator().manual_seed(11 * B + W)
    S = B + 2
    q = randn(B, H, D, dtype=HALF, g=g)
    k, v = (randn(S, H, W, D, dtype=torch.float32, g=g).to(FP8) for _ in range(2))
    ks, vs = (torch.rand(S, H, W, generator=g).to(DEVICE) + 0.01 for _ in range(2))
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    lengths = torch.randint(1, W + 1, (B,), generator=g).to(DEVICE)
    out = decode_attention_triton(q, k, v, slots, lengths, k_scale=ks, v_scale=vs)
    assert rel(out, decode_attention_ref(q, k, v, slots, lengths, ks, vs)) < 1e-2


PAGED_SHAPES = [gpu(8, 32, 128, 2999, 128), gpu(4, 16, 64, 300, 64), (1, 4, 16, 19, 4), (3, 2, 32, 37, 8),
                (2, 3, 16, 130, 16), (2, 2, 16, 12, 16)]


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("B,H,D,W,P", PAGED_SHAPES)
def test_decode_attention_over_pages(B, H, D, W, P, quant):
    """Rings cut into pages of P entries, scattered over a pool: the same attention as over the
    rings themselves (a slot's last page part-filled when P does not divide W)."""
    g = torch.Generator().manual_seed(13 * B + W + P)
    S = B + 1
    q = randn(B, H, D, dtype=HALF, g=g)
    k, v = (randn(S, H, W, D, dtype=HALF, g=g) for _ in range(2))
    ks = vs = None
    if quant:
        k, v = k.float().to(FP8), v.float().to(FP8)
        ks, vs = (torch.rand(S, H, W, generator=g).to(DEVICE) + 0.01 for _ in range(2))
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    lengths = torch.randint(1, W + 1, (B,), generator=g).to(DEVICE)
    lengths[0] = W
    same = lambda: torch.Generator().manual_seed(1)  # noqa: E731  (one page layout for all)
    (kp, table), (vp, _) = to_pages(k, P, same()), to_pages(v, P, same())
    ksp = vsp = None
    if quant:
        ksp, vsp = (to_pages(t, P, same())[0] for t in (ks, vs))
    ref = decode_attention_ref(q, k, v, slots, lengths, ks, vs)
    paged_ref = decode_attention_ref(q, kp, vp, slots, lengths, ksp, vsp, table=table, window=W)
    torch.testing.assert_close(paged_ref, ref, rtol=0, atol=0)
    out = decode_attention_triton(q, kp, vp, slots, lengths, ksp, vsp, table=table, window=W)
    assert rel(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,D", [gpu(1, 16, 64), gpu(8, 16, 64), (1, 2, 16), (3, 2, 32)])
def test_step_attention(B, H, D, dtype):
    g = torch.Generator().manual_seed(B + H)
    kb = [torch.zeros(B, 8, H, D, device=DEVICE, dtype=dtype) for _ in range(4)]
    for step in range(8):
        qkv = randn(B, 3, H, D, dtype=dtype, g=g)
        out = step_attention_triton(qkv, kb[0], kb[1], step)
        ref = step_attention_ref(qkv, kb[2], kb[3], step)
        ref64 = step_attention_ref(qkv.double(), kb[2].double().clone(), kb[3].double().clone(), step)
        check(out, ref, ref64, dtype)
        assert torch.equal(kb[0][:, :step + 1], kb[2][:, :step + 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D,W,end", [gpu(2, 2, 8, 64, 249, [2, 1000]), gpu(1, 2, 8, 64, 249, [250]),
                                           (2, 2, 2, 16, 15, [2, 40]), (3, 2, 2, 16, 15, [14, 15, 16]),
                                           (1, 1, 2, 16, 7, [3])])
def test_ring_chunk_attention(B, T, H, D, W, end, dtype):
    g = torch.Generator().manual_seed(W + B)
    S = B + 1
    q = randn(B, T, H, D, dtype=dtype, g=g)
    k = randn(S, H, W, D, dtype=dtype, g=g)
    v = randn(S, H, W, D, dtype=dtype, g=g)
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    end = torch.tensor(end, device=DEVICE)
    ref = ring_chunk_attention_ref(q, k, v, slots, end)
    ref64 = ring_chunk_attention_ref(q.double(), k.double(), v.double(), slots, end)
    check(ring_chunk_attention_triton(q, k, v, slots, end), ref, ref64, dtype)
    # the ring read in blocks, some holding no key a query may see (online softmax), by one
    # program per query and head, and split over several, combined after
    for config in ((4, 1, 1), (4, 1, 4), (8, 2, 2)):
        check(ring_chunk_attention_triton(q, k, v, slots, end, config=config), ref, ref64, dtype)
