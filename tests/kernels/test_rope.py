"""RoPE fused with the KV-ring write (bf16 and e4m3 rings), per row and per chunk of positions,
and the prefill's rope, against the references."""
import pytest
import torch

from engine.kernels import triton_on_cpu
from engine.kernels.rope import qkv_rope_write_ref, qkv_rope_write_triton, rope_qkv, rope_ref
from engine.quant import FP8

from kernel_cases import CUDA, DEVICE, DTYPES, HALF, from_pages, gpu, randn, to_pages

RING_SHAPES = [gpu(1, 32, 128, 2999), gpu(8, 32, 128, 2999), gpu(4, 16, 64, 16),
               (1, 4, 16, 19), (3, 2, 32, 37), (2, 3, 16, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,D,W", RING_SHAPES)
def test_qkv_rope_write(B, H, D, W, dtype):
    g = torch.Generator().manual_seed(B + H + D + W)
    S = B + 2
    qkv = randn(B, 3, H, D, dtype=dtype, g=g)
    pos = torch.randint(0, 10000, (B,), generator=g).to(DEVICE)
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    ridx = pos % W
    rings = [torch.zeros(S, H, W, D, device=DEVICE, dtype=dtype) for _ in range(4)]
    q = qkv_rope_write_triton(qkv, pos, 10000.0, slots, ridx, rings[0], rings[1])
    qr = qkv_rope_write_ref(qkv, pos, 10000.0, slots, ridx, rings[2], rings[3])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(q, qr, **tol)
    torch.testing.assert_close(rings[0], rings[2], **tol)
    assert torch.equal(rings[1], rings[3])  # v is copied


@pytest.mark.parametrize("B,T,H,D,W", [gpu(1, 2, 8, 64, 250), gpu(32, 2, 8, 64, 250), (1, 2, 2, 16, 5),
                                       (3, 3, 2, 8, 7)])
def test_qkv_rope_write_of_chunks(B, T, H, D, W):
    # Mimi's transformer: T new positions per slot from the slot's position, ring entry = position
    # mod W, the same as the rows spelt out one by one
    g = torch.Generator().manual_seed(B * T + W)
    S = B + 2
    qkv = randn(B * T, 3, H, D, dtype=torch.float32, g=g)
    pos = torch.randint(0, 1000, (B,), generator=g).to(DEVICE)
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    rows_pos = (pos.view(B, 1) + torch.arange(T, device=DEVICE)).view(-1)
    rings = [torch.zeros(S, H, W, D, device=DEVICE) for _ in range(6)]
    q = qkv_rope_write_triton(qkv, pos, 10000.0, slots, None, rings[0], rings[1], per=T)
    qr = qkv_rope_write_ref(qkv, pos, 10000.0, slots, None, rings[2], rings[3], per=T)
    qe = qkv_rope_write_ref(qkv, rows_pos, 10000.0, slots.repeat_interleave(T), rows_pos % W, rings[4], rings[5])
    assert torch.equal(qr, qe) and torch.equal(rings[2], rings[4]) and torch.equal(rings[3], rings[5])
    torch.testing.assert_close(q, qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rings[0], rings[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(rings[1], rings[3])
    assert int((rings[1] != 0).any(-1).sum()) == B * T * H  # every row's v landed in its own entry


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("B,H,D,W,P", [gpu(8, 32, 128, 2999, 128), (1, 4, 16, 19, 4), (3, 2, 32, 37, 8)])
def test_qkv_rope_write_into_pages(B, H, D, W, P, quant):
    """Writing through a page table leaves, read back through it, what writing the rings does."""
    g = torch.Generator().manual_seed(5 * B + W + P)
    S = B + 2
    qkv = randn(B, 3, H, D, dtype=HALF, g=g)
    pos = torch.randint(0, 10000, (B,), generator=g).to(DEVICE)
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    ridx = pos % W
    dt = FP8 if quant else HALF
    rings = [torch.zeros(S, H, W, D, device=DEVICE, dtype=dt) for _ in range(2)]
    scales = [torch.ones(S, H, W, device=DEVICE) for _ in range(2)] if quant else [None, None]
    qr = qkv_rope_write_ref(qkv, pos, 10000.0, slots, ridx, *rings, *scales)
    same = lambda: torch.Generator().manual_seed(2)  # noqa: E731  (one page layout for all)
    for fn in (qkv_rope_write_ref, qkv_rope_write_triton):
        pages = [to_pages(torch.zeros(S, H, W, D, device=DEVICE, dtype=dt), P, same()) for _ in range(2)]
        table = pages[0][1]
        pscales = [to_pages(torch.ones(S, H, W, device=DEVICE), P, same())[0] for _ in range(2)] if quant \
            else [None, None]
        q = fn(qkv, pos, 10000.0, slots, ridx, pages[0][0], pages[1][0], *pscales, table=table)
        torch.testing.assert_close(q, qr, rtol=1e-2, atol=1e-2)
        for ring, (pool, _) in zip(rings, pages):
            agree = (from_pages(pool, table, W).float() == ring.float()).float().mean().item()
            assert agree > 0.99   # (e4m3: the same codes but for rounding ties of the scaled value)
        if quant:
            for sc, pool in zip(scales, pscales):
                torch.testing.assert_close(from_pages(pool, table, W), sc, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("B,H,D,W", RING_SHAPES)
def test_qkv_rope_write_into_e4m3_rings(B, H, D, W):
    g = torch.Generator().manual_seed(11 * B + W)
    S = B + 2
    qkv = randn(B, 3, H, D, dtype=HALF, g=g)
    pos = torch.randint(0, 10000, (B,), generator=g).to(DEVICE)
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    ridx = pos % W
    rings = [randn(S, H, W, D, dtype=torch.float32, g=g).to(FP8) for _ in range(2)]
    rings += [r.clone() for r in rings]
    scales = [torch.rand(S, H, W, generator=g).to(DEVICE) + 0.01 for _ in range(2)]
    scales += [s.clone() for s in scales]
    q = qkv_rope_write_triton(qkv, pos, 10000.0, slots, ridx, rings[0], rings[1], scales[0], scales[1])
    qr = qkv_rope_write_ref(qkv, pos, 10000.0, slots, ridx, rings[2], rings[3], scales[2], scales[3])
    torch.testing.assert_close(q, qr, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(scales[0], scales[2], rtol=1e-3, atol=1e-6)
    agree = (rings[0].float() == rings[2].float()).float().mean().item()
    assert agree > 0.99  # the same e4m3 codes but for rounding ties of the scaled value


@pytest.mark.parametrize("N,H,D", [gpu(136, 32, 128), (7, 2, 16), (20, 3, 8)])
def test_rope_qkv_for_the_prefill(N, H, D):
    # the prefill's rope: the decode kernel writing k and v into one-entry rings, one per row
    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator().manual_seed(N * H + D)
    qkv = randn(N, 3, H, D, dtype=dtype, g=g)
    pos = torch.randint(0, 3000, (N,), generator=g).to(DEVICE)
    q_ref, k_ref = rope_ref(qkv[:, 0], qkv[:, 1], pos, 10000.0)
    triton_on_cpu(True)  # the Triton path, under the interpreter on the CPU
    try:
        q, k, v = rope_qkv(qkv, pos, 10000.0)
    finally:
        triton_on_cpu(False)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(v, qkv[:, 2])
