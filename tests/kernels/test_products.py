"""The matrix products (`engine.kernels.products`): the one-row kernel with its prologues, the
small-batch kernel in its variants, e4m3 weights, and the calibration's choice between fused and
separate launches, against torch."""
import pytest
import torch
import torch.nn.functional as F
import triton

from engine.kernels import triton_on_cpu
from engine.kernels.embedding import embedding_ref
from engine.kernels.products import calibration as cal
from engine.kernels.products import linear, linear_ref, norm_linear
from engine.kernels.products.one_row import Prologue, PrologueKind, one_row
from engine.kernels.products.rows import rows_linear
from engine.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
from engine.kernels.silu_mul import silu_mul_ref
from engine.kernels.step_attention import step_attention_triton
from engine.quant import FP8, quantize_rows

from kernel_cases import CUDA, DEVICE, HALF, check, gpu, randn, rel

ONE_ROW_CONFIGS = [c for kind, c in cal.CONFIGS if kind == "one_row"]


def _weights(N, KD, dtype, g):
    return (torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEVICE, dtype)


@pytest.mark.parametrize("M,N,KD", [gpu(1, 3072, 1024), gpu(8, 5632, 1024), gpu(16, 1024, 2816), gpu(1, 1024, 4096),
                                    gpu(32, 12288, 4096), gpu(64, 4096, 11264),
                                    (1, 40, 64), (3, 33, 130), (16, 16, 16), (33, 20, 300), (64, 17, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_small_batch_product(M, N, KD, dtype):
    # half precision and float32 (Mimi's products, in full float32 as cuBLAS computes them)
    g = torch.Generator().manual_seed(M * N)
    x, w = randn(M, KD, dtype=dtype, g=g), _weights(N, KD, dtype, g)
    ref = F.linear(x.float(), w.float()).to(dtype)
    check(rows_linear(x, w), ref, F.linear(x.double(), w.double()), dtype)


@pytest.mark.parametrize("M,N,KD,config", [gpu(2, 1536, 512, (8, 256, 4, 3)), gpu(4, 512, 2048, (4, 512, 4, 3)),
                                           gpu(2, 4096, 4096, (16, 128, 4, 3)),
                                           (1, 40, 64, (8, 256, 4, 3)), (3, 33, 130, (16, 128, 4, 3)),
                                           (4, 5, 300, (4, 256, 4, 3)), (2, 17, 40, (4, 512, 4, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_few_rows_without_dot(M, N, KD, config, dtype):
    # up to 4 rows multiplied on the CUDA cores (Mimi's 2 rows a frame per session), every block
    # shape the calibration may pick, N and K not multiples of blocks; e4m3 W too
    g = torch.Generator().manual_seed(M * N + KD)
    x, w = randn(M, KD, dtype=dtype, g=g), _weights(N, KD, dtype, g)
    ref = F.linear(x.float(), w.float()).to(dtype)
    check(rows_linear(x, w, None, config, fma=True), ref, F.linear(x.double(), w.double()), dtype)
    if dtype != torch.float32:
        w8, s = quantize_rows(w.float())
        assert rel(rows_linear(x, w8, s, config, fma=True), linear_ref(x, w8, s)) < 8e-3


@pytest.mark.parametrize("M,N,KD,kind,config", [gpu(2, 2048, 512, "few_rows", (4, 512, 4, 3)),
                                                gpu(16, 2048, 512, "rows", (16, 256, 4, 3)),
                                                (2, 40, 64, "few_rows", (8, 256, 4, 3)), (3, 33, 130, "rows", (16, 128, 4, 3)),
                                                (1, 17, 40, "one_row", (8, 256, 4, 3))])
def test_gelu_in_the_product(M, N, KD, kind, config):
    # Mimi's feed-forward input in float32: the product's GELU in the same launch matches F.gelu
    # of the product; the one-row kernel, which has no GELU, applies it after
    g = torch.Generator().manual_seed(M * N + KD + 7)
    x, w = randn(M, KD, dtype=torch.float32, g=g), _weights(N, KD, torch.float32, g)
    out = cal.run_kernel((kind, config), x, w, None, gelu=True)
    assert rel(out, F.gelu(F.linear(x.double(), w.double()))) < 1e-5
    assert rel(out, F.gelu(F.linear(x, w))) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("N,KD,config", [gpu(3072, 1024, (8, 256, 4, 3)), gpu(1024, 2816, (4, 512, 4, 3)),
                                         gpu(4096, 4096, (2, 1024, 4, 4)),
                                         (40, 64, (8, 256, 4, 3)), (33, 130, (16, 128, 4, 3)), (5, 300, (4, 512, 4, 3))])
def test_one_row(N, KD, config, dtype):
    # one row against W, every block shape the calibration may pick, K and N not multiples of blocks
    g = torch.Generator().manual_seed(N + KD)
    x, w = randn(1, KD, dtype=dtype, g=g), _weights(N, KD, dtype, g)
    ref = F.linear(x.float(), w.float()).to(dtype)
    check(one_row(x, w, config=config), ref, F.linear(x.double(), w.double()), dtype)


@pytest.mark.parametrize("N,KD", [gpu(3072, 1024), gpu(12288, 4096), (40, 64), (33, 130)])
@pytest.mark.parametrize("delta", ["none", "row", "id"])
def test_prologues_of_the_one_row_product(N, KD, delta):
    # The one-row product's prologue (RMSNorm after a residual add or an embedding lookup, gated
    # SiLU, or the add alone) equals those ops run first and then the product, roundings included.
    g = torch.Generator().manual_seed(N * KD + len(delta))
    x = randn(1, KD, dtype=HALF, g=g)
    alpha = (1 + 0.1 * torch.randn(KD, generator=g)).to(DEVICE, HALF)
    w = _weights(N, KD, HALF, g)
    cfg = (8, 64, 4, 2)
    tol = dict(rtol=1e-2, atol=1e-2)  # a few elements of the norm's output may differ by one rounding
    gu = randn(1, 2 * KD, dtype=HALF, g=g)
    torch.testing.assert_close(one_row(gu, w, None, cfg, Prologue(PrologueKind.SILU))[1],
                               one_row(silu_mul_ref(gu), w, None, cfg), **tol)
    d = ids = None
    if delta == "row":
        d = d_ref = randn(1, KD, dtype=HALF, g=g)
    for i in ([-1, 4, -3] if delta == "id" else [None]):  # id -1 adds nothing, other negatives take row 0
        if i is not None:
            d = randn(9, KD, dtype=HALF, g=g)
            ids = torch.tensor([i], device=DEVICE)
            d_ref = embedding_ref(ids, d)
        x_ref, h_ref = add_rms_norm_ref(x, d_ref if d is not None else None, alpha, 1e-5)
        xo, y = one_row(x, w, None, cfg, Prologue(PrologueKind.RMS_NORM, d, ids, alpha, 1e-5))
        assert torch.equal(xo, x_ref)
        torch.testing.assert_close(y, one_row(h_ref, w, None, cfg), **tol)
        if d is not None:
            torch.testing.assert_close(one_row(x, w, None, cfg, Prologue(PrologueKind.ADD, d, ids))[1],
                                       one_row(x + d_ref, w, None, cfg), **tol)


@pytest.mark.parametrize("H,D,S,N,config", [gpu(16, 64, 8, 1024, (4, 1024, 4, 3)), gpu(16, 64, 8, 1024, (8, 256, 4, 3)),
                                            (4, 16, 8, 40, (8, 64, 4, 2)), (3, 16, 4, 33, (4, 32, 4, 2))])
def test_step_attention_as_the_prologue(H, D, S, N, config):
    # the depformer's in-frame attention as the out-product's prologue equals step_attention and
    # then the same product, and leaves the same k and v buffers, at every step of a frame
    g = torch.Generator().manual_seed(H * D + N)
    w = _weights(N, H * D, HALF, g)
    kb, vb = (torch.zeros(1, S, H, D, device=DEVICE, dtype=HALF) for _ in range(2))
    kr, vr = kb.clone(), vb.clone()
    for step in range(S):
        qkv = randn(1, 3, H, D, dtype=HALF, g=g)
        y = one_row(qkv.reshape(1, -1), w, None, config, Prologue.step_attention(kb, vb, step))[1]
        a = step_attention_triton(qkv, kr, vr, step).reshape(1, H * D)
        torch.testing.assert_close(y, one_row(a, w, None, config), rtol=2e-3, atol=2e-3)
        assert torch.equal(kb, kr) and torch.equal(vb, vr)


@pytest.mark.parametrize("gain_us,fused", [(0.3, True), (0.8, False)])
def test_the_fused_pick_takes_the_separate_kernels_only_when_they_win_clearly(monkeypatch, gain_us, fused):
    # The calibration of a one-row product with a prologue times the separate kernels and each
    # block shape of the one-launch kernel (each run once here); the separate kernels are kept
    # only when they are faster by more than an extra launch's hidden cost (0.5 us).
    g = torch.Generator().manual_seed(7)
    x = randn(1, 64, dtype=HALF, g=g)
    alpha = (1 + 0.1 * torch.randn(64, generator=g)).to(DEVICE, HALF)
    w = (torch.randn(40, 64, generator=g) / 8).to(DEVICE, HALF)
    cands = [i for i in cal._candidates(1) if cal.CONFIGS[i][0] == "one_row"][:3]
    linear(x, w)  # (the plain product's own pick first, on a GPU timed for real, not by fake_time)
    ran, times = [], [10e-3] + [10e-3 + gain_us * 1e-3, 10e-3 + (gain_us + 0.1) * 1e-3, 11e-3]

    def fake_time(fn, n):
        ran.append(fn(0))
        return times[len(ran) - 1]

    monkeypatch.setattr(cal, "_time", fake_time)
    pick = cal._pick_fused(x, w, None, Prologue(PrologueKind.RMS_NORM, None, None, alpha, 1e-5),
                           lambda w_, s_: (x, linear(rms_norm_ref(x, alpha, 1e-5), w_)), cands, "key")
    assert len(ran) == 4
    assert pick == (cands[0] if fused else -1)
    for out in ran[1:]:  # every candidate computed the same product as the separate kernels
        torch.testing.assert_close(out[1], ran[0][1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("M", [1, 3])
def test_norm_linear_with_an_embedding(M):
    # the depformer's first norm and product, with the token embedding as the residual: one
    # launch for one row, the lookup, the norm and the product for several
    g = torch.Generator().manual_seed(M)
    x = randn(M, 64, dtype=HALF, g=g)
    table = randn(9, 64, dtype=HALF, g=g)
    alpha = (1 + 0.1 * torch.randn(64, generator=g)).to(DEVICE, HALF)
    w = (torch.randn(40, 64, generator=g) / 8).to(DEVICE, HALF)
    ids = torch.tensor([-1, 5, -2][:M], device=DEVICE)
    x_ref = x + embedding_ref(ids, table)
    triton_on_cpu(True)  # the Triton path, under the interpreter on the CPU
    try:
        xo, y = norm_linear(x, table, alpha, 1e-5, w, ids=ids)
    finally:
        triton_on_cpu(False)
    assert torch.equal(xo, x_ref)
    ref = F.linear(rms_norm_ref(x_ref, alpha, 1e-5).float(), w.float()).to(HALF)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------
# e4m3 weights


@pytest.mark.parametrize("M,N,KD", [gpu(1, 22528, 4096), gpu(8, 4096, 11264), gpu(64, 3072, 1024),
                                    gpu(160, 22528, 4096), gpu(136, 4096, 11264),
                                    (1, 40, 64), (3, 33, 130), (20, 70, 96), (150, 40, 96)])
def test_e4m3_products(M, N, KD):
    """Every kernel and block shape the calibration may pick for an e4m3 W (on the CPU, one of
    each), past 64 rows a prefill's blocks of rows side by side, and K split in parts."""
    g = torch.Generator().manual_seed(M + N)
    x = randn(M, KD, dtype=HALF, g=g)
    w8, s = quantize_rows((torch.randn(N, KD, generator=g) / KD ** 0.5).to(DEVICE))
    ref = linear_ref(x, w8, s)
    every = x.is_cuda  # (the interpreter runs a kernel in seconds: one configuration of each there)
    outs = [rows_linear(x, w8, s, (32, 256, 4, 3) if every else (16, 32, 4, 1), splits=3)]  # K in 3 parts
    if M == 1:
        outs += [one_row(x, w8, s, c) for c in (ONE_ROW_CONFIGS if every else ONE_ROW_CONFIGS[:1])]
    if M > 64 and not every:
        outs.append(rows_linear(x, w8, s, (16, 32, 4, 1), block_m=32, m_fast=True))
    else:
        for i in cal._candidates(M, fp8=True)[:None if every else 1]:
            try:
                outs.append(cal.run_kernel(cal.CONFIGS[i], x, w8, s))
            except triton.runtime.errors.OutOfResources:  # (a block shape this GPU cannot hold: the calibration skips it)
                continue
    for out in outs:
        # the same products accumulated in float32 in another order, then one rounding
        assert rel(out, ref) < 1e-2


@pytest.mark.parametrize("fast", [False, gpu(True)])
@pytest.mark.parametrize("cfg", [(8, 256, 4, 3), gpu((4, 1024, 4, 3))])
def test_every_e4m3_code_decodes_exactly(fast, cfg):
    """Each finite e4m3 code, in each byte of a 4-byte word, multiplies as its exact value in the
    one-row product (decoded to float32) and the small-batch one (decoded to the activation
    dtype, by moving bits or by the compiler): one-hot rows read columns of W back."""
    codes = (torch.arange(256).unsqueeze(1) + torch.arange(64).unsqueeze(0)) % 256  # [N, K]: each column all codes
    codes[(codes & 0x7F) == 0x7F] = 0  # (e4m3fn's NaN)
    w8 = codes.to(torch.uint8).view(FP8).to(DEVICE)
    one = torch.ones(256, device=DEVICE)
    exact = w8.float()
    assert exact.abs().max() == 448 and (exact.abs() < 2 ** -6).sum() > 0  # (the extremes and subnormals are in)
    for j in range(8):
        x = torch.zeros(1, 64, device=DEVICE, dtype=HALF)
        x[0, j] = 1
        assert torch.equal(one_row(x, w8, one, cfg).float()[0], exact[:, j]), j
    eye = torch.eye(64, device=DEVICE, dtype=HALF)[:16]
    assert torch.equal(rows_linear(eye, w8, one, (32, 64, 4, 3), fast_e4m3=fast).float(), exact[:, :16].T)
    assert torch.equal(rows_linear(eye[:4], w8, one, (8, 64, 4, 3), fma=True).float(), exact[:, :4].T)


def test_the_product_takes_the_calibrated_kernel_or_cublas():
    # `linear` is x W^T for a bf16 W and (x W8^T) * scale for an e4m3 one, whichever kernel runs
    g = torch.Generator().manual_seed(3)
    x = randn(3, 64, dtype=torch.float32, g=g)
    w = _weights(40, 64, torch.float32, g)
    assert rel(linear(x, w), F.linear(x.double(), w.double())) < 1e-5
    w8, s = quantize_rows(w)
    xh = x.to(HALF)
    assert rel(linear(xh, w8, s), linear_ref(xh, w8, s)) < 1e-2
    assert not CUDA or cal.linear_choices()  # on a GPU the shapes were timed
