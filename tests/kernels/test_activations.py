"""The gated SiLU and Mimi's ELU against their references."""
import pytest
import torch

from engine.kernels.elu import elu_ref, elu_triton
from engine.kernels.silu_mul import silu_mul_ref, silu_mul_triton

from kernel_cases import DEVICE, DTYPES, check, gpu, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", [gpu(1, 11264), gpu(4, 2816), (1, 88), (3, 50)])
def test_silu_mul(B, N, dtype):
    g = torch.Generator().manual_seed(N)
    x = randn(B, 2 * N, dtype=dtype, g=g)
    check(silu_mul_triton(x), silu_mul_ref(x), silu_mul_ref(x.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [gpu((2, 64, 1926)), gpu((1, 512, 2)), (2, 4, 61), (1, 3, 5)])
def test_elu(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = randn(*shape, dtype=dtype, g=g)
    check(elu_triton(x), elu_ref(x), elu_ref(x.double()), dtype)
    # into a transposed output (the transposed convolution's rows), and from a transposed view
    B, C, T = shape
    out = torch.full((B, T, C), float("nan"), device=DEVICE, dtype=dtype)
    assert elu_triton(x, out=out.transpose(1, 2)).data_ptr() == out.data_ptr()
    assert torch.equal(out.transpose(1, 2), elu_triton(x))
    assert torch.equal(elu_triton(out.transpose(1, 2)), elu_triton(elu_triton(x)))
