"""Mimi's streaming steps (convolution input and columns, overlap-add, residual-VQ step,
codebook sum) against their references."""
import pytest
import torch

from engine.kernels.codebook_sum import codebook_sum_ref, codebook_sum_triton
from engine.kernels.conv_input import conv_columns_ref, conv_columns_triton, conv_input_ref, conv_input_triton
from engine.kernels.overlap_add import overlap_add_ref, overlap_add_triton
from engine.kernels.rvq_step import rvq_step_ref, rvq_step_triton

from kernel_cases import DEVICE, gpu, randn


@pytest.mark.parametrize("B,N,D", [gpu(1, 2048, 256), gpu(16, 2048, 256), (3, 37, 8), (2, 64, 5)])
def test_rvq_step_picks_the_first_nearest_centroid(B, N, D):
    # Mimi's residual VQ step: the same codes and residuals as the reference, bit for bit
    # (codes feed the LM exactly), and of two equal centroids the first, as torch's argmin
    g = torch.Generator().manual_seed(N + D)
    cb = randn(N, D, dtype=torch.float32, g=g)
    cb[N // 2] = cb[1]
    x = randn(B, D, dtype=torch.float32, g=g)
    x[0] = cb[1]
    norms, scores = (cb * cb).sum(-1), x @ cb.t()
    codes, ref_codes = torch.full((B, 3), -1, device=DEVICE), torch.full((B, 3), -1, device=DEVICE)
    out = rvq_step_triton(x, scores, norms, cb, codes[:, 1])
    ref = rvq_step_ref(x, scores, norms, cb, ref_codes[:, 1])
    assert torch.equal(codes, ref_codes) and torch.equal(out, ref)
    assert codes[0, 1].item() == 1 and (codes[:, [0, 2]] == -1).all()


@pytest.mark.parametrize("B,C,T,tail,act,fresh", [gpu(1, 64, 1920, 2, True, False), gpu(4, 512, 2, 2, False, True),
                                                  (2, 3, 8, 2, True, False), (3, 5, 1, 6, True, False),
                                                  (3, 4, 2, 2, False, True), (1, 2, 1100, 2, True, False)])
def test_conv_input_reads_and_advances_the_slots_tails(B, C, T, tail, act, fresh):
    # Mimi's streaming convolution input: [kept tail | elu(x)], the slot's tail advanced in
    # place (a fresh slot's tail: x's first column repeated); x may be a transposed view
    g = torch.Generator().manual_seed(C * T + tail)
    S = B + 2
    x = randn(B, T, C, dtype=torch.float32, g=g).transpose(1, 2)
    tails = randn(S, C, tail, dtype=torch.float32, g=g)
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    flags = (torch.arange(S) % 2 == 0).to(DEVICE) if fresh else None
    t_ref = tails.clone()
    out = conv_input_triton(x, tails, slots, act, flags)
    ref = conv_input_ref(x, t_ref, slots, act, flags)
    if act:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # (exp - 1 against torch's expm1)
        torch.testing.assert_close(tails, t_ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, ref) and torch.equal(tails, t_ref)
    others = [s for s in range(S) if s not in slots.tolist()]
    assert torch.equal(tails[others], t_ref[others])


@pytest.mark.parametrize("B,C,T,kernel,stride,dil,act,fresh",
                         [gpu(1, 64, 1920, 3, 1, 1, True, False), gpu(1, 512, 2, 7, 1, 1, False, False),
                          gpu(2, 256, 16, 12, 6, 1, True, False), gpu(4, 512, 2, 4, 2, 1, False, True),
                          (2, 3, 8, 3, 1, 1, True, False), (3, 5, 4, 3, 1, 2, True, False),
                          (2, 4, 6, 6, 3, 1, True, False), (3, 4, 2, 4, 2, 1, False, True),
                          (1, 1, 12, 7, 1, 1, False, False), (1, 2, 1100, 3, 1, 1, True, False)])
def test_conv_columns_make_the_convolution_one_product(B, C, T, kernel, stride, dil, act, fresh):
    # a streaming convolution's input as the product's columns, written from the slot's tail and
    # x (a transposed view) with the tail advanced as `conv_input` advances it: cols @ W^T is
    # the convolution of [tail | elu(x)]
    g = torch.Generator().manual_seed(C * T + kernel + dil)
    S = B + 2
    tail = (kernel - 1) * dil + 1 - stride
    x = randn(B, T, C, dtype=torch.float32, g=g).transpose(1, 2)
    tails = randn(S, C, tail, dtype=torch.float32, g=g)
    slots = torch.randperm(S, generator=g)[:B].to(DEVICE)
    flags = (torch.arange(S) % 2 == 0).to(DEVICE) if fresh else None
    t_ref, t_in = tails.clone(), tails.clone()
    cols = conv_columns_triton(x, tails, slots, act, kernel, stride, dil, flags)
    ref = conv_columns_ref(x, t_ref, slots, act, kernel, stride, dil, flags)
    assert cols.shape == (B * (T // stride), C * kernel)
    torch.testing.assert_close(cols, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tails, t_ref, rtol=1e-6, atol=1e-6)
    w = randn(5, C, kernel, dtype=torch.float32, g=g)
    conv = torch.nn.functional.conv1d(conv_input_ref(x, t_in, slots, act, flags).double(), w.double(), stride=stride,
                                      dilation=dil)
    prod = (ref.double() @ w.view(5, -1).double().t()).view(B, T // stride, 5).transpose(1, 2)
    torch.testing.assert_close(prod, conv, rtol=1e-9, atol=1e-9)
    others = [s for s in range(S) if s not in slots.tolist()]
    assert torch.equal(tails[others], t_ref[others])


@pytest.mark.parametrize("B,T,C,S,bias,channels_last", [gpu(1, 2, 512, 8, True, False), gpu(1, 1, 512, 2, False, True),
                                                        (2, 3, 5, 4, True, False), (3, 1, 6, 2, False, True),
                                                        (2, 2, 3, 3, True, True)])
def test_overlap_add_advances_the_slots_partials(B, T, C, S, bias, channels_last):
    # a transposed convolution's overlap-add (kernel 2 x stride): frame t's first half plus frame
    # t - 1's second half, the slot's kept partial standing in for frame -1 and replaced;
    # channels_last: the output laid out [B, T * S, C] (the decoder transformer's rows)
    g = torch.Generator().manual_seed(B * T * C + S)
    slots_n = B + 2
    y = randn(B, T, C, 2 * S, dtype=torch.float32, g=g)
    part = randn(slots_n, C, S, dtype=torch.float32, g=g)
    b = randn(C, dtype=torch.float32, g=g) if bias else None
    slots = torch.randperm(slots_n, generator=g)[:B].to(DEVICE)
    p_old, p_ref = part.clone(), part.clone()
    out = overlap_add_triton(y, part, slots, b, channels_last)
    ref = overlap_add_ref(y, p_ref, slots, b, channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(part, p_ref, rtol=1e-6, atol=1e-6)
    assert (out.stride(1) == 1) == channels_last and (ref.stride(1) == 1) == channels_last
    torch.testing.assert_close(out[..., :S], y[:, 0, :, :S] + p_old[slots], rtol=1e-6, atol=1e-6)
    last = y[:, T - 1, :, S:] + (b.view(1, C, 1) if bias else 0)
    torch.testing.assert_close(part[slots], last, rtol=1e-6, atol=1e-6)
    others = [i for i in range(slots_n) if i not in slots.tolist()]
    assert torch.equal(part[others], p_old[others])


@pytest.mark.parametrize("B,n,bins,D,width", [gpu(1, 8, 2048, 512, 4), gpu(32, 8, 2048, 512, 4), (2, 3, 10, 6, 4),
                                              (3, 8, 16, 130, 3)])
def test_codebook_sum_of_strided_codes(B, n, bins, D, width):
    # Mimi's decoder input: the codes' projected centroids summed, times the upsampling kernel;
    # codes are a strided column block of the sampled tokens, and out-of-range ones clamp
    g = torch.Generator().manual_seed(n * bins + D)
    tables = randn(n, bins, D, dtype=torch.float32, g=g)
    scale = randn(D, width, dtype=torch.float32, g=g)
    tokens = torch.randint(0, bins, (B, n + 3), generator=g).to(DEVICE)
    tokens[0, 1] = bins + 5  # (the LM's initial token, past the codebooks)
    codes = tokens[:, 1:1 + n]
    ref = codebook_sum_ref(codes, tables, scale)
    torch.testing.assert_close(codebook_sum_triton(codes, tables, scale), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ref[0, :, 0], (tables[0, bins - 1] + sum(tables[k, codes[0, k]] for k in range(1, n)))
                               * scale[:, 0], rtol=1e-5, atol=1e-5)
