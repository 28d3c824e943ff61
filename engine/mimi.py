"""Mimi, the streaming audio codec: one 1920-sample frame <-> one column of 8 codes.

Encoder: SEANet (causal convolutions, strides 4, 5, 6, 8) -> 8-layer transformer at 25 Hz ->
stride-2 convolution to 12.5 Hz -> split residual VQ (1 semantic + 7 acoustic codebooks).
Decoder: the reverse, with a channel-wise transposed convolution back to 25 Hz.

Streaming state is explicit, one row per slot (`MimiState`): each convolution keeps the last
`kernel - stride` input samples (its tail), each transposed convolution the `kernel - stride`
outputs that later inputs still add to, each transformer a KV ring and a position. A fresh
row reproduces the reference's first call exactly (zero tails, replicate padding for the
downsampling convolution, bias-valued partials).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MimiConfig, MimiTransformerConfig
from .kernels.codebook_sum import codebook_sum
from .kernels.common import triton_enabled
from .kernels.conv_input import conv_columns, conv_input
from .kernels.elu import elu
from .kernels.layer_norm import scale_add_layer_norm
from .kernels.overlap_add import overlap_add
from .kernels.products import gelu_linear, linear
from .kernels.ring_attention import ring_chunk_attention
from .kernels.rope import qkv_rope_write
from .kernels.rvq_step import rvq_step


def _p(*shape, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


def _derived(module: nn.Module, name: str, sources: tuple[torch.Tensor, ...], make):
    """make(), a tensor (or tuple of them) derived from the weights `sources`, kept on `module`
    while those are unchanged (the same storage and version). Made while a CUDA graph is
    captured, it is recorded into the graph instead and not kept."""
    key = tuple((t.data_ptr(), t._version) for t in sources)
    kept = getattr(module, name, None)
    if kept is not None and kept[0] == key:
        return kept[1]
    out = make()
    if not (out[0] if isinstance(out, tuple) else out).is_cuda or not torch.cuda.is_current_stream_capturing():
        setattr(module, name, (key, out))
    return out


# Convolutions whose columns (`kernels.conv_columns`) take at most this many bytes run as one
# matrix product over them, where cuDNN would add layout conversions of the input, the weights
# and the output and a separate bias add; larger ones (many sessions at once) go through cuDNN,
# which reads its input in place.
COLUMNS_BYTES = 8 << 20


def convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tails: torch.Tensor | None,
             slots: torch.Tensor, act: bool, stride: int = 1, dilation: int = 1,
             fresh: torch.Tensor | None = None) -> torch.Tensor:
    """The causal streaming convolution of [kept tail | elu(x) if act else x] (`conv_input`;
    tails None: a kernel of 1 with no tail). x: [B, C, T], any layout -> [B, out, T / stride].
    With the Triton kernels and small enough columns, one product over the columns (its
    output laid out [B, T', out], viewed as [B, out, T']); else cuDNN."""
    B, C, T = x.shape
    cout, _, k = weight.shape
    TO = T // stride
    if triton_enabled(x) and B * TO * C * k * x.element_size() <= COLUMNS_BYTES:
        if tails is not None:
            cols = conv_columns(x, tails, slots, act, k, stride, dilation, fresh)
        elif act:
            cols = _elu_rows(x).view(B * T, C)
        else:
            cols = x.transpose(1, 2).reshape(B * T, C)
        return _conv_matmul(cols, weight.view(cout, C * k).t(), bias).view(B, TO, cout).transpose(1, 2)
    xx = conv_input(x, tails, slots, act, fresh) if tails is not None else elu(x) if act else x
    return F.conv1d(xx, weight, bias, stride=stride, dilation=dilation)


def _elu_rows(x: torch.Tensor) -> torch.Tensor:
    """elu(x) for x [B, C, T], written as contiguous rows [B, T, C] (a product's input)."""
    B, C, T = x.shape
    rows = torch.empty(B, T, C, device=x.device, dtype=x.dtype)
    elu(x, out=rows.transpose(1, 2))
    return rows


class Conv(nn.Module):
    """Causal 1-d convolution that keeps a tail of `(kernel - 1) * dilation + 1 - stride` inputs."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, bias=True, device=None, dtype=None):
        super().__init__()
        self.weight = _p(cout, cin, kernel, device=device, dtype=dtype)
        self.bias = _p(cout, device=device, dtype=dtype) if bias else None
        self.stride, self.dilation = stride, dilation
        self.tail = (kernel - 1) * dilation + 1 - stride

    def forward(self, x: torch.Tensor, tails: torch.Tensor, slots: torch.Tensor, act: bool = False) -> torch.Tensor:
        """The convolution of [kept tail | elu(x) if act else x]; x: [B, C, T] with T a multiple
        of the stride; tails: [S, C, self.tail], the rows of `slots` advanced in place
        (`convolve`)."""
        return convolve(x, self.weight, self.bias, tails if self.tail else None, slots, act, self.stride,
                        self.dilation)


def _conv_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (plus bias, one per column, for 2-d a) for a product that stands in for a
    convolution, at the precision cuDNN gives a float32 convolution on the GPU: TF32 while
    torch.backends.cudnn.allow_tf32 holds (torch's default, under which the reference's
    convolutions run), full float32 when it is off, and always on the CPU. At batch 32 on an
    H100 two of the decoder's products took 0.64 ms of the tick in full float32 (one thread
    runs the engine, so the flag's brief change is safe)."""
    m = torch.backends.cuda.matmul
    try:
        tf32 = a.is_cuda and a.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not m.allow_tf32
    except RuntimeError:  # TF32 set through torch's newer precision API: leave it as set
        tf32 = False

    def product():
        return torch.matmul(a, b) if bias is None else torch.addmm(bias, a, b)

    if not tf32:
        return product()
    m.allow_tf32 = True
    try:
        return product()
    finally:
        m.allow_tf32 = False


class ConvTr(nn.Module):
    """Causal transposed convolution with kernel = 2 x stride; keeps the last `stride` outputs
    (the partial sum that the next input still adds to), bias included."""

    def __init__(self, cin, cout, kernel, stride, bias=True, device=None, dtype=None):
        super().__init__()
        assert kernel == 2 * stride, "Mimi's transposed convolutions have kernel 2 x stride"
        self.weight = _p(cin, cout, kernel, device=device, dtype=dtype)
        self.bias = _p(cout, device=device, dtype=dtype) if bias else None
        self.stride = stride
        self.tail = kernel - stride

    def forward(self, x: torch.Tensor, partials: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """elu(x) transposed-convolved; x: [B, cin, T]; partials: [S, cout, stride], the rows of
        `slots` advanced in place -> [B, cout, T * stride]. One product and an overlap-add (a
        transposed convolution of a few frames is slow through cuDNN): input frame t writes
        output frames t (first half of its kernel) and t + 1 (second half)."""
        B, cin, T = x.shape
        cout, K = self.weight.shape[1], self.weight.shape[-1]
        if T <= 16:
            # A few frames: the rows contiguous, written so by the ELU (a product over the
            # transposed view of a few frames is many times slower than over a copy; from about
            # a hundred frames the view is as fast)
            xt = _elu_rows(x)
        else:
            xt = elu(x).transpose(1, 2)
        y = _conv_matmul(xt, self.weight.view(cin, cout * K)).view(B, T, cout, K)
        return overlap_add(y, partials, slots, self.bias)

    def fresh_partial(self, batch: int, device) -> torch.Tensor:
        cout = self.weight.shape[1]
        if self.bias is None:
            return torch.zeros(batch, cout, self.tail, device=device, dtype=self.weight.dtype)
        return self.bias.detach().view(1, -1, 1).expand(batch, cout, self.tail).clone()


class ResBlock(nn.Module):
    def __init__(self, dim, hidden, kernel, dilation, device=None, dtype=None):
        super().__init__()
        self.conv1 = Conv(dim, hidden, kernel, dilation=dilation, device=device, dtype=dtype)
        self.conv2 = Conv(hidden, dim, 1, device=device, dtype=dtype)


class SeanetEncoder(nn.Module):
    def __init__(self, cfg: MimiConfig, device=None, dtype=None):
        super().__init__()
        s = cfg.seanet
        kw = dict(device=device, dtype=dtype)
        convs = [Conv(s.channels, s.n_filters, s.kernel_size, **kw)]
        res = []
        mult = 1
        for ratio in reversed(s.ratios):
            dim = mult * s.n_filters
            res.append(nn.ModuleList([ResBlock(dim, dim // s.compress, s.residual_kernel_size, s.dilation_base ** j,
                                               **kw) for j in range(s.n_residual_layers)]))
            convs.append(Conv(dim, 2 * dim, 2 * ratio, stride=ratio, **kw))
            mult *= 2
        convs.append(Conv(mult * s.n_filters, s.dimension, s.last_kernel_size, **kw))
        self.convs = nn.ModuleList(convs)
        self.res = nn.ModuleList(res)

    def state_convs(self) -> list[Conv]:
        """Every convolution with a tail, in the order the state keeps them."""
        out = [self.convs[0]]
        for n, blocks in enumerate(self.res):
            for b in blocks:
                out += [b.conv1, b.conv2]
            out.append(self.convs[n + 1])
        out.append(self.convs[-1])
        return out

    def forward(self, x: torch.Tensor, tails: list[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
        """x: [B, 1, T]; tails: the state's rows (`state_convs` order), advanced in place."""
        it = iter(tails)

        def run(conv, inp, act=True):
            return conv(inp, next(it), slots, act)

        x = run(self.convs[0], x, act=False)
        for n, blocks in enumerate(self.res):
            for b in blocks:
                x = x + run(b.conv2, run(b.conv1, x))
            x = run(self.convs[n + 1], x)
        return run(self.convs[-1], x)


class SeanetDecoder(nn.Module):
    def __init__(self, cfg: MimiConfig, device=None, dtype=None):
        super().__init__()
        s = cfg.seanet
        kw = dict(device=device, dtype=dtype)
        mult = 2 ** len(s.ratios)
        self.conv_in = Conv(s.dimension, mult * s.n_filters, s.kernel_size, **kw)
        ups, res = [], []
        for ratio in s.ratios:
            dim = mult * s.n_filters
            ups.append(ConvTr(dim, dim // 2, 2 * ratio, ratio, **kw))
            res.append(nn.ModuleList([ResBlock(dim // 2, dim // 2 // s.compress, s.residual_kernel_size,
                                               s.dilation_base ** j, **kw) for j in range(s.n_residual_layers)]))
            mult //= 2
        self.ups = nn.ModuleList(ups)
        self.res = nn.ModuleList(res)
        self.conv_out = Conv(s.n_filters, s.channels, s.last_kernel_size, **kw)

    def state_convs(self) -> list[Conv]:
        out = [self.conv_in]
        for blocks in self.res:
            for b in blocks:
                out += [b.conv1, b.conv2]
        out.append(self.conv_out)
        return out

    def forward(self, x: torch.Tensor, tails: list[torch.Tensor], partials: list[torch.Tensor],
                slots: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T]; tails, partials: the state's rows, advanced in place."""
        it = iter(tails)

        def run(conv, inp, act=True):
            return conv(inp, next(it), slots, act)

        x = run(self.conv_in, x, act=False)
        for up, blocks, partial in zip(self.ups, self.res, partials):
            x = up(x, partial, slots)
            for b in blocks:
                x = x + run(b.conv2, run(b.conv1, x))
        return run(self.conv_out, x)


class MimiLayer(nn.Module):
    def __init__(self, c: MimiTransformerConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(c.dim, eps=c.norm_eps, **kw)
        self.attn_in = _p(3 * c.dim, c.dim, **kw)
        self.attn_out = _p(c.dim, c.dim, **kw)
        self.scale1 = _p(c.dim, **kw)
        self.norm2 = nn.LayerNorm(c.dim, eps=c.norm_eps, **kw)
        self.linear1 = _p(c.dim_feedforward, c.dim, **kw)
        self.linear2 = _p(c.dim, c.dim_feedforward, **kw)
        self.scale2 = _p(c.dim, **kw)
        for n in (self.norm1, self.norm2):
            n.weight.requires_grad_(False)
            n.bias.requires_grad_(False)


class MimiTransformer(nn.Module):
    """Causal transformer over T new positions per call, with a KV ring of `window` entries per
    slot. After writing positions E - T .. E - 1, the ring holds E - window .. E - 1, and query
    q sees every held key up to q: the reference's ring cache of `context` entries hides its
    oldest one, which leaves exactly these keys (`kernels.ring_chunk_attention`)."""

    def __init__(self, c: MimiTransformerConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = c
        self.layers = nn.ModuleList([MimiLayer(c, device=device, dtype=dtype) for _ in range(c.num_layers)])

    def forward(self, x: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor):
        """x: [B, C, T] (conv layout); k_ring, v_ring: [layers, slots, H, W, D], the rows of
        `slots` read and written in place; positions: [slots], each slot's count of positions
        written, advanced by T for `slots`. Returns [B, C, T]."""
        c = self.cfg
        B, C, T = x.shape
        H, D = c.num_heads, c.head_dim
        x = x.transpose(1, 2).contiguous()
        pos = positions[slots]
        end = pos + T
        positions[slots] = end
        eps = c.norm_eps
        h = scale_add_layer_norm(x, None, None, self.layers[0].norm1.weight, self.layers[0].norm1.bias, eps)[1]
        next_norms = [layer.norm1 for layer in self.layers[1:]] + [None]
        for i, (layer, nxt) in enumerate(zip(self.layers, next_norms)):
            # rotate q and k, and write k and v at each position's ring entry, in one launch
            q = qkv_rope_write(linear(h, layer.attn_in).view(B * T, 3, H, D), pos, c.max_period, slots, None,
                               k_ring[i], v_ring[i], per=T)
            a = ring_chunk_attention(q.view(B, T, H, D), k_ring[i], v_ring[i], slots, end)
            x, h = scale_add_layer_norm(x, linear(a.reshape(B, T, C), layer.attn_out), layer.scale1,
                                        layer.norm2.weight, layer.norm2.bias, eps)
            x, h = scale_add_layer_norm(x, linear(gelu_linear(h, layer.linear1), layer.linear2), layer.scale2,
                                        nxt.weight if nxt is not None else None,
                                        nxt.bias if nxt is not None else None, eps)
        return x.transpose(1, 2)


class Quantizer(nn.Module):
    """Split residual VQ: codebook 0 from `first`, codebooks 1.. from `rest`, each with its
    own input and output projections; nearest centroid by Euclidean distance."""

    def __init__(self, cfg: MimiConfig, device=None, dtype=None):
        super().__init__()
        q = cfg.quantizer
        kw = dict(device=device, dtype=dtype)
        n_rest = cfg.num_codebooks - q.n_q_semantic
        self.first_in = _p(q.dimension, q.input_dimension, **kw)
        self.first_out = _p(q.output_dimension, q.dimension, **kw)
        self.first_codebooks = _p(q.n_q_semantic, q.bins, q.dimension, **kw)
        self.rest_in = _p(q.dimension, q.input_dimension, **kw)
        self.rest_out = _p(q.output_dimension, q.dimension, **kw)
        self.rest_codebooks = _p(n_rest, q.bins, q.dimension, **kw)

    def _norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """|e|^2 of every centroid ([codebooks, bins], first and rest), computed once per set
        of weights (`_derived`)."""
        def make():
            return tuple(torch.stack([(cb * cb).sum(-1) for cb in books.float()])
                         for books in (self.first_codebooks, self.rest_codebooks))
        return _derived(self, "_norms_kept", (self.first_codebooks, self.rest_codebooks), make)

    @staticmethod
    def _encode(x: torch.Tensor, codebooks: torch.Tensor, norms: torch.Tensor, codes: torch.Tensor) -> None:
        """Writes the codes of x ([B, dim]) in `codebooks` to the columns of `codes`."""
        x = x.float()
        for i, cb in enumerate(codebooks.float()):
            # argmin |x - e|^2 = argmin (|e|^2 - 2 x.e)
            x = rvq_step(x, x @ cb.t(), norms[i], cb, codes[:, i])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, dim] latent -> codes [B, num_codebooks]."""
        nf = self.first_codebooks.shape[0]
        codes = torch.empty(x.shape[0], nf + self.rest_codebooks.shape[0], dtype=torch.long, device=x.device)
        first, rest = self._norms()
        self._encode(F.linear(x, self.first_in), self.first_codebooks, first, codes[:, :nf])
        self._encode(F.linear(x, self.rest_in), self.rest_codebooks, rest, codes[:, nf:])
        return codes

    def tables(self) -> torch.Tensor:
        """[num_codebooks, bins, output_dimension]: each centroid through its group's output
        projection, so that a frame's latent is a sum of looked-up rows (`kernels.codebook_sum`),
        computed once per set of weights. (The projection of the sum, as the reference
        computes it, rounds differently: within 1e-6 relative.)"""
        return _derived(self, "_tables_kept", (self.first_codebooks, self.first_out, self.rest_codebooks,
                                               self.rest_out),
                        lambda: torch.cat([F.linear(self.first_codebooks, self.first_out),
                                           F.linear(self.rest_codebooks, self.rest_out)]))


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        d = cfg.seanet.dimension
        st = cfg.downsample_stride
        self.encoder = SeanetEncoder(cfg, **kw)
        self.encoder_transformer = MimiTransformer(cfg.transformer, **kw)
        self.downsample = _p(d, d, 2 * st, **kw)
        self.quantizer = Quantizer(cfg, **kw)
        self.upsample = _p(d, 1, 2 * st, **kw)   # channel-wise (groups = d), no bias
        self.decoder_transformer = MimiTransformer(cfg.transformer, **kw)
        self.decoder = SeanetDecoder(cfg, **kw)

    @property
    def dtype(self) -> torch.dtype:
        return self.downsample.dtype

    def encode(self, pcm: torch.Tensor, state: "MimiState", slots: torch.Tensor) -> torch.Tensor:
        """pcm: [B, frame_size] float -> codes [B, num_codebooks]; advances the encoder rows."""
        B = pcm.shape[0]
        x = self.encoder(pcm.to(self.dtype).view(B, 1, -1), state.enc_tails, slots)
        x = self.encoder_transformer(x, state.enc_k, state.enc_v, slots, state.enc_pos)
        # Downsampling: the reference pads its first call by replicating the first sample.
        st = self.cfg.downsample_stride
        y = convolve(x, self.downsample, None, state.down_tail, slots, False, stride=st, fresh=state.enc_fresh)
        state.enc_fresh.index_fill_(0, slots, False)
        return self.quantizer.encode(y[..., 0])

    def decode(self, codes: torch.Tensor, state: "MimiState", slots: torch.Tensor) -> torch.Tensor:
        """codes: [B, num_codebooks] -> pcm [B, frame_size] float32; advances the decoder rows."""
        B = codes.shape[0]
        st = self.cfg.downsample_stride
        d = self.cfg.seanet.dimension
        # the latent, through the channel-wise transposed convolution of one frame (kernel
        # 2 x stride, no bias), half of which overlaps the next frame. Codes outside the
        # codebooks (the LM's initial token, in the scratch row's garbage) are clamped.
        y = codebook_sum(codes, self.quantizer.tables(), self.upsample.view(d, 2 * st)).view(B, 1, d, 2 * st)
        x = overlap_add(y, state.up_partial, slots, None, channels_last=True)  # (the transformer's rows)
        x = self.decoder_transformer(x, state.dec_k, state.dec_v, slots, state.dec_pos)
        out = self.decoder(x, state.dec_tails, state.dec_partials, slots)
        return out.view(B, -1).float()


class MimiState:
    """Per-slot streaming state of the encoder and decoder (row `num_slots` is scratch)."""

    def __init__(self, mimi: Mimi, num_slots: int, device):
        cfg = mimi.cfg
        S = num_slots + 1
        dt = mimi.dtype
        d = cfg.seanet.dimension
        st = cfg.downsample_stride
        t = cfg.transformer
        self.mimi = mimi
        self.enc_tails = [torch.zeros(S, c.weight.shape[1], c.tail, device=device, dtype=dt)
                          for c in mimi.encoder.state_convs()]
        self.dec_tails = [torch.zeros(S, c.weight.shape[1], c.tail, device=device, dtype=dt)
                          for c in mimi.decoder.state_convs()]
        self.dec_partials = [u.fresh_partial(S, device) for u in mimi.decoder.ups]
        kv = (t.num_layers, S, t.num_heads, t.window, t.head_dim)
        self.enc_k = torch.zeros(kv, device=device, dtype=dt)
        self.enc_v = torch.zeros(kv, device=device, dtype=dt)
        self.dec_k = torch.zeros(kv, device=device, dtype=dt)
        self.dec_v = torch.zeros(kv, device=device, dtype=dt)
        self.enc_pos = torch.zeros(S, dtype=torch.long, device=device)
        self.dec_pos = torch.zeros(S, dtype=torch.long, device=device)
        self.enc_fresh = torch.ones(S, dtype=torch.bool, device=device)
        self.down_tail = torch.zeros(S, d, st, device=device, dtype=dt)
        self.up_partial = torch.zeros(S, d, st, device=device, dtype=dt)

    def reset(self, slot: int) -> None:
        """Makes `slot` a fresh stream (the reference's reset_streaming)."""
        for t in self.enc_tails + self.dec_tails:
            t[slot].zero_()
        for p, u in zip(self.dec_partials, self.mimi.decoder.ups):
            p[slot] = u.fresh_partial(1, p.device)[0]
        self.enc_pos[slot] = 0
        self.dec_pos[slot] = 0
        self.enc_fresh[slot] = True
        self.down_tail[slot].zero_()
        self.up_partial[slot].zero_()

    def reset_encoder(self, slot: int) -> None:
        for t in self.enc_tails:
            t[slot].zero_()
        self.enc_pos[slot] = 0
        self.enc_fresh[slot] = True
        self.down_tail[slot].zero_()
