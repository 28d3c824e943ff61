"""Mimi alone against the golden trace: streaming encode of input.wav, streaming decode."""
import numpy as np
import pytest
import torch

from engine.kernels import common

from engine import weights as W
from engine.audio import first_channel, read_audio
from engine.mimi import Mimi, MimiState

from conftest import TINY


def _mimi(cfg):
    m = W.materialize(lambda dtype: Mimi(cfg.mimi, dtype=dtype), "cpu", torch.float32)
    W.load_mimi_weights(m, TINY / "mimi.safetensors", cfg.mimi)
    return m


@pytest.fixture(params=["torch", "triton"])
def kernels(request):
    """Each test runs on the torch references and on the Triton kernels (the interpreter on the
    CPU), which the GPU runs: fused rope-and-ring-write, fused scale-add-LayerNorm, ELU."""
    old = common._state["on_cpu"]
    common.triton_on_cpu(request.param == "triton")
    yield request.param
    common.triton_on_cpu(old)


# Frames of the golden input each test streams: all of them on the torch references; through the
# Triton interpreter (seconds a frame) enough to wrap the transformers' 16-entry rings three
# times over (two encoder steps a frame).
FRAMES = {"torch": None, "triton": 24}


def test_streaming_encode_matches_the_codes_the_model_heard(tiny_cfg, trace, kernels):
    mimi = _mimi(tiny_cfg)
    state = MimiState(mimi, 1, "cpu")
    pcm = first_channel(read_audio(TINY / "input.wav", 24000)).reshape(-1, 1920)[:FRAMES[kernels]]
    with torch.no_grad():
        codes = np.stack([mimi.encode(torch.from_numpy(f)[None], state, torch.tensor([0]))[0].numpy() for f in pcm])
    np.testing.assert_array_equal(codes[:-1], trace["tokens"][1:len(pcm), 9:17])


def test_streaming_decode_matches_the_reference_pcm(tiny_cfg, trace, kernels):
    mimi = _mimi(tiny_cfg)
    state = MimiState(mimi, 2, "cpu")
    codes = torch.from_numpy(trace["tokens"][:, 1:9])
    with torch.no_grad():
        # two slots in one batch, the second fed the same codes 5 frames late
        out0, out1 = [], []
        n = FRAMES[kernels] or 120
        for t in range(n):
            slots = torch.tensor([0, 1]) if t >= 5 else torch.tensor([0])
            c = torch.stack([codes[t], codes[t - 5]]) if t >= 5 else codes[t][None]
            y = mimi.decode(c, state, slots).numpy()
            out0.append(y[0])
            if t >= 5:
                out1.append(y[1])
    np.testing.assert_allclose(np.stack(out0), trace["pcm"][:n], atol=1e-5)
    np.testing.assert_allclose(np.stack(out1), trace["pcm"][:n - 5], atol=1e-5)


def test_reset_makes_a_slot_fresh(tiny_cfg, trace):
    mimi = _mimi(tiny_cfg)
    state = MimiState(mimi, 1, "cpu")
    codes = torch.from_numpy(trace["tokens"][:, 1:9])
    s = torch.tensor([0])
    with torch.no_grad():
        for t in range(30):
            mimi.decode(codes[t + 50][None], state, s)
        state.reset(0)
        y = np.stack([mimi.decode(codes[t][None], state, s)[0].numpy() for t in range(10)])
    np.testing.assert_allclose(y, trace["pcm"][:10], atol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 5, 17])
def test_transposed_convolution_streams_as_the_whole_signal(T, kernels):
    """The overlap-add form of a streaming transposed convolution (kernel 2 x stride) of elu(x)
    gives, chunk by chunk, what one transposed convolution of the whole signal gives; each
    slot's kept partial advances alone. (Up to 16 frames the ELU writes the product's rows
    transposed; more, the product reads a transposed view.)"""
    from engine.kernels.elu import elu_ref
    from engine.mimi import ConvTr

    g = torch.Generator().manual_seed(T)
    conv = ConvTr(6, 4, 8, 4)
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    x = torch.randn(2, 6, 4 * T, generator=g)
    whole = torch.nn.functional.conv_transpose1d(elu_ref(x), conv.weight, conv.bias, stride=4)
    partials, slots, outs = conv.fresh_partial(4, "cpu"), torch.tensor([2, 0]), []
    untouched = partials[[1, 3]].clone()
    with torch.no_grad():
        for i in range(4):
            outs.append(conv(x[..., i * T:(i + 1) * T], partials, slots))
    torch.testing.assert_close(torch.cat(outs, dim=-1), whole[..., :16 * T], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partials[slots], whole[..., 16 * T:], rtol=1e-5, atol=1e-5)
    assert torch.equal(partials[[1, 3]], untouched)


@pytest.mark.parametrize("T,kernel,stride", [(8, 3, 1), (1, 7, 1), (2, 3, 1), (12, 8, 4)])
def test_streaming_convolution_runs_as_the_whole_signal(T, kernel, stride, kernels):
    """A causal convolution fed chunk by chunk (its tail kept per slot, the input through the
    ELU) gives what one convolution of the left-padded whole signal gives."""
    from engine.kernels.elu import elu_ref
    from engine.mimi import Conv

    g = torch.Generator().manual_seed(T * kernel)
    conv = Conv(5, 3, kernel, stride=stride)
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    x = torch.randn(2, 5, 4 * T, generator=g)
    padded = torch.nn.functional.pad(elu_ref(x), (conv.tail, 0))
    whole = torch.nn.functional.conv1d(padded, conv.weight, conv.bias, stride=stride)
    tails, slots = torch.zeros(3, 5, conv.tail), torch.tensor([2, 0])
    tails[1] = 7.0
    with torch.no_grad():
        outs = [conv(x[..., i * T:(i + 1) * T].contiguous(), tails, slots, True) for i in range(4)]
    torch.testing.assert_close(torch.cat(outs, dim=-1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tails[slots], padded[..., padded.shape[-1] - conv.tail:], rtol=1e-6, atol=1e-6)
    assert (tails[1] == 7.0).all()
