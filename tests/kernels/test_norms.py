"""RMSNorm (with the residual add) and Mimi's scale-add LayerNorm against their references."""
import pytest
import torch

from engine.kernels.layer_norm import scale_add_layer_norm_ref, scale_add_layer_norm_triton
from engine.kernels.rms_norm import add_rms_norm_ref, add_rms_norm_triton

from kernel_cases import DEVICE, DTYPES, check, gpu, randn

SHAPES = [gpu(1, 4096), gpu(8, 4096), gpu(3, 1024), (1, 64), (3, 100), (2, 37)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", SHAPES)
def test_add_rms_norm(B, N, dtype):
    g = torch.Generator().manual_seed(B * N)
    x, d = randn(B, N, dtype=dtype, g=g), randn(B, N, dtype=dtype, g=g)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEVICE, dtype)
    xo, y = add_rms_norm_triton(x, d, w, 1e-8)
    rx, ry = add_rms_norm_ref(x, d, w, 1e-8)
    assert torch.equal(xo, rx)  # the rounded residual is the same sum
    _, ry64 = add_rms_norm_ref(x.double(), d.double(), w.double(), 1e-8)
    check(y, ry, ry64, dtype)
    _, y1 = add_rms_norm_triton(x, None, w, 1e-8)
    check(y1, add_rms_norm_ref(x, None, w, 1e-8)[1], add_rms_norm_ref(x.double(), None, w.double(), 1e-8)[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", SHAPES + [(4, 512)])
def test_scale_add_layer_norm(B, N, dtype):
    g = torch.Generator().manual_seed(B * N + 1)
    x, d = randn(B, N, dtype=dtype, g=g), randn(B, N, dtype=dtype, g=g)
    s = (0.1 * torch.randn(N, generator=g)).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEVICE, dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(DEVICE, dtype)
    xo, y = scale_add_layer_norm_triton(x, d, s, w, b, 1e-5)
    rx, ry = scale_add_layer_norm_ref(x, d, s, w, b, 1e-5)
    assert torch.equal(xo, rx)  # the rounded residual is the same sum
    _, ry64 = scale_add_layer_norm_ref(*(t.double() for t in (x, d, s, w, b)), 1e-5)
    check(y, ry, ry64, dtype)
    _, y1 = scale_add_layer_norm_triton(x, None, None, w, b, 1e-5)  # the norm alone
    check(y1, scale_add_layer_norm_ref(x, None, None, w, b, 1e-5)[1],
          scale_add_layer_norm_ref(x.double(), None, None, w.double(), b.double(), 1e-5)[1], dtype)
    xo2, none = scale_add_layer_norm_triton(x, d, s, None, None, 1e-5)  # the residual alone
    assert none is None and torch.equal(xo2, rx)
