"""The PersonaPlex language model: embeddings, temporal transformer, depformer, heads.

Parameters are plain tensors in a small module tree (names in `weights.LM_NAME_TABLE`);
the math is written once here and used by the eager path and the captured CUDA graphs.
All streaming state lives in `state.LMState`, one row per session slot.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DepformerConfig, LMConfig, TemporalConfig
from .quant import FP8, quantize_rows
from .kernels.decode_attention import decode_attention
from .kernels.embedding import embedding_ref
from .kernels.prefill_attention import causal_suffices, prefill_attention_ref, prefill_mask
from .kernels.products import add_linear, attention_linear, linear, norm_linear, silu_linear
from .kernels.rms_norm import add_rms_norm, rms_norm
from .kernels.rope import qkv_rope_write, rope_qkv
from .kernels.silu_mul import silu_mul


class Linear(nn.Module):
    """y = x W^T, with W [out, in] or stacked per step [S, out, in] (then `step` picks one).
    With quant="fp8", W is e4m3 with a float32 scale per output channel (`engine.quant`)."""

    def __init__(self, in_features: int, out_features: int, steps: int | None = None, device=None, dtype=None,
                 quant: str | None = None):
        super().__init__()
        shape = (out_features, in_features) if steps is None else (steps, out_features, in_features)
        wdtype = FP8 if quant == "fp8" else dtype
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=wdtype), requires_grad=False)
        if quant == "fp8":
            self.scale = nn.Parameter(torch.empty(shape[:-1], device=device, dtype=torch.float32), requires_grad=False)

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]

    def forward(self, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        return linear(x, *self._w(step))

    def _w(self, step: int | None):
        w = self.weight if step is None else self.weight[step]
        if w.dtype != FP8:
            return w, None
        return w, self.scale if step is None else self.scale[step]

    def after_norm(self, x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float,
                   step: int | None = None, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this(rms_norm(x + delta) * alpha)), fused into the product where a Triton
        kernel does it (`norm_linear`; with ids, delta is an embedding table looked up by them)."""
        return norm_linear(x, delta, alpha, eps, *self._w(step), ids=ids)

    def after_silu(self, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """this(silu(a) * g) for x = [a | g], fused likewise (`silu_linear`)."""
        return silu_linear(x, *self._w(step))

    def after_step_attention(self, qkv: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                             step: int) -> torch.Tensor:
        """this(step_attention(qkv, k_buf, v_buf, step)) at depformer step `step`, fused likewise
        (`attention_linear`)."""
        return attention_linear(qkv, k_buf, v_buf, step, *self._w(step))

    def after_add(self, x: torch.Tensor, delta: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """this(x + delta), fused likewise (`add_linear`)."""
        return add_linear(x, delta, *self._w(step))

    @torch.no_grad()
    def quantize_(self) -> None:
        """W in e4m3 with a float32 scale per output channel, in place (`engine.quant`)."""
        if self.weight.dtype != FP8:
            w8, s = quantize_rows(self.weight.data)
            self.weight = nn.Parameter(w8, requires_grad=False)
            self.scale = nn.Parameter(s, requires_grad=False)

    def first_steps(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """Steps 0..steps-1 of a per-step Linear on the same x in one product: [..., steps, out]."""
        w = self.weight[:steps].reshape(-1, self.weight.shape[-1])
        scale = self.scale[:steps].reshape(-1) if w.dtype == FP8 else None
        return linear(x, w, scale).view(*x.shape[:-1], steps, self.out_features)


def _param(*shape, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


class TemporalLayer(nn.Module):
    def __init__(self, c: TemporalConfig, device=None, dtype=None, quant=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = _param(c.dim, **kw)
        self.attn_in = Linear(c.dim, 3 * c.dim, quant=quant, **kw)
        self.attn_out = Linear(c.dim, c.dim, quant=quant, **kw)
        self.norm2 = _param(c.dim, **kw)
        self.ffn_in = Linear(c.dim, 2 * c.hidden, quant=quant, **kw)
        self.ffn_out = Linear(c.hidden, c.dim, quant=quant, **kw)


class DepformerLayer(nn.Module):
    def __init__(self, c: DepformerConfig, device=None, dtype=None, quant=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = _param(c.dim, **kw)  # norms are shared by all steps
        self.attn_in = Linear(c.dim, 3 * c.dim, steps=c.steps, quant=quant, **kw)
        self.attn_out = Linear(c.dim, c.dim, steps=c.steps, quant=quant, **kw)
        self.norm2 = _param(c.dim, **kw)
        self.ffn_in = Linear(c.dim, 2 * c.hidden, steps=c.steps, quant=quant, **kw)
        self.ffn_out = Linear(c.hidden, c.dim, steps=c.steps, quant=quant, **kw)


class Depformer(nn.Module):
    def __init__(self, lm: LMConfig, device=None, dtype=None, quant=None):
        super().__init__()
        c = lm.depformer
        kw = dict(device=device, dtype=dtype)
        self.inp = Linear(lm.temporal.dim, c.dim, steps=c.steps, quant=quant, **kw)   # depformer_in.k
        self.text_emb = _param(lm.text_card + 1, c.dim, **kw)                          # E_0
        self.emb = _param(c.steps - 1, lm.card + 1, c.dim, **kw)                       # E_k, k >= 1
        self.layers = nn.ModuleList([DepformerLayer(c, quant=quant, **kw) for _ in range(c.num_layers)])
        self.heads = Linear(c.dim, lm.card, steps=c.steps, quant=quant, **kw)          # linears.k


class LM(nn.Module):
    def __init__(self, cfg: LMConfig, device=None, dtype=None, quant: str | None = None):
        super().__init__()
        self.cfg = cfg
        t = cfg.temporal
        kw = dict(device=device, dtype=dtype)
        self.emb = _param(cfg.n_q, cfg.card + 1, t.dim, **kw)
        self.text_emb = _param(cfg.text_card + 1, t.dim, **kw)
        self.layers = nn.ModuleList([TemporalLayer(t, quant=quant, **kw) for _ in range(t.num_layers)])
        self.out_norm = _param(t.dim, **kw)
        self.text_head = Linear(t.dim, cfg.text_card, quant=quant, **kw)
        self.depformer = Depformer(cfg, quant=quant, **kw)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the embeddings'; quantized linears store e4m3)."""
        return self.emb.dtype

    @property
    def quantized(self) -> bool:
        """Whether the linears hold e4m3 weights."""
        return self.layers[0].attn_in.weight.dtype == FP8

    def quantize_(self) -> "LM":
        """Every linear to e4m3 in place, one at a time (random-weight benchmarks; checkpoints
        are quantized tensor by tensor as they load)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.quantize_()
        return self

    # ------------------------------------------------------------------------------
    # embeddings

    def embed(self, columns: torch.Tensor) -> torch.Tensor:
        """columns: [..., 17] token ids (-1 embeds to zero) -> [..., dim]: the 16 audio
        embeddings and the text embedding, summed (one gather for all audio streams)."""
        cfg = self.cfg
        audio = columns[..., 1:]
        offsets = torch.arange(cfg.n_q, device=columns.device) * (cfg.card + 1)
        e = F.embedding(audio.clamp(min=0) + offsets, self.emb.view(-1, self.emb.shape[-1]))
        e = e.masked_fill((audio == -1).unsqueeze(-1), 0)
        return e.sum(dim=-2) + embedding_ref(columns[..., 0], self.text_emb)

    # ------------------------------------------------------------------------------
    # temporal transformer

    def temporal_decode(self, x: torch.Tensor, kv, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One position per slot. x: [B, dim]; pos: [B] positions (written to the KV rings
        at pos mod the slot's window); kv: `state.PagedKV`. Returns out_norm(h) [B, dim]."""
        t = self.cfg.temporal
        B = x.shape[0]
        H, D = t.num_heads, t.head_dim
        C = kv.window_of.index_select(0, slots)
        ring_idx = pos % C
        lengths = torch.minimum(pos + 1, C)
        delta = None
        for i, layer in enumerate(self.layers):
            x, qkv = layer.attn_in.after_norm(x, delta, layer.norm1, t.norm_eps)
            ks, vs = kv.scales(i)
            q = qkv_rope_write(qkv.view(B, 3, H, D), pos, t.max_period, slots, ring_idx, kv.k[i], kv.v[i], ks, vs,
                               table=kv.table)
            a = decode_attention(q, kv.k[i], kv.v[i], slots, lengths, ks, vs, table=kv.table, window=kv.window)
            x, f = layer.ffn_in.after_norm(x, layer.attn_out(a.reshape(B, H * D)), layer.norm2, t.norm_eps)
            delta = layer.ffn_out.after_silu(f)
        return add_rms_norm(x, delta, self.out_norm, t.norm_eps)[1]

    def temporal_prefill(self, x: torch.Tensor, kv, slots: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """A whole prompt per slot, from position 0. x: [B, T, dim] (rows past lengths[b] are
        padding; lengths are host integers, so a prefill can be captured as a CUDA graph).
        Leaves in each slot's KV rings exactly what stepping the prompt would, and returns
        out_norm(h) [B, T, dim]. When T is within the window, padding rows may be counted in
        lengths: the entries they write are written again by stepping before any query reads
        them."""
        t = self.cfg.temporal
        B, T, _ = x.shape
        H, D, C = t.num_heads, t.head_dim, kv.window
        pos = torch.arange(T, device=x.device).repeat(B)
        # When no prompt outgrows the window (the usual case), row t of prompt b goes to entry t
        # (padding rows write entries that stepping writes again before any query reads them),
        # and with rings in the activation dtype each layer's rope kernel writes k and v
        # straight into them and attention reads them back from there.
        fits = causal_suffices(T, C)
        direct = fits and not kv.quantized
        keep = mask = None
        if fits:
            w_slots, w_idx = slots.repeat_interleave(T), pos
        else:
            # Stepping keeps the last min(len, C) positions of each prompt, at p mod C. The rows
            # to keep are found once, on the host (lengths are known there), not per layer.
            lens = [int(n) for n in lengths]
            keep = torch.tensor([b * T + p for b, n in enumerate(lens) for p in range(max(0, n - C), n)],
                                device=x.device)
            w_slots = slots.repeat_interleave(torch.tensor([min(n, C) for n in lens], device=x.device))
            w_idx = pos.index_select(0, keep) % C
            mask = prefill_mask(B, T, C, torch.tensor(lens, device=x.device), x.device)
        delta = None
        # (as few launches per layer as the decode step: a prefill is launched eagerly, so each
        # op's host cost counts)
        for i, layer in enumerate(self.layers):
            x, h = add_rms_norm(x, delta, layer.norm1, t.norm_eps) if delta is not None else \
                (x, rms_norm(x, layer.norm1, t.norm_eps))
            qkv = layer.attn_in(h).view(B * T, 3, H, D)
            if direct:
                q = qkv_rope_write(qkv, pos, t.max_period, w_slots, w_idx, kv.k[i], kv.v[i], table=kv.table)
                a = F.scaled_dot_product_attention(q.view(B, T, H, D).transpose(1, 2), kv.gather(kv.k[i], slots, T),
                                                   kv.gather(kv.v[i], slots, T), is_causal=True).transpose(1, 2)
            else:
                q, k, v = rope_qkv(qkv, pos, t.max_period)
                a = prefill_attention_ref(q.view(B, T, H, D), k.view(B, T, H, D), v.view(B, T, H, D), C, mask=mask)
                if keep is not None:
                    k, v = k.index_select(0, keep), v.index_select(0, keep)
                kv.write(i, w_slots, w_idx, k, v)
            x, h = add_rms_norm(x, layer.attn_out(a.reshape(B, T, H * D)), layer.norm2, t.norm_eps)
            delta = layer.ffn_out(silu_mul(layer.ffn_in(h)))
        return add_rms_norm(x, delta, self.out_norm, t.norm_eps)[1]

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.text_head(h)

    # ------------------------------------------------------------------------------
    # depformer

    def depformer_cache(self, batch: int, steps: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, keys and values of one frame's depformer steps: [B, steps, heads, head_dim]."""
        c = self.cfg.depformer
        shape = (batch, steps, c.num_heads, c.head_dim)
        dt = self.depformer.text_emb.dtype
        return [(torch.empty(shape, device=device, dtype=dt), torch.empty(shape, device=device, dtype=dt))
                for _ in self.depformer.layers]

    def depformer_inputs(self, h: torch.Tensor, steps: int) -> torch.Tensor:
        """The depformer's input projections of the temporal output for steps 0..steps-1,
        all read in one product: [B, steps, depformer dim]."""
        return self.depformer.inp.first_steps(h, steps)

    def depformer_step(self, k: int, inp: torch.Tensor, prev: torch.Tensor, dep_kv: list) -> torch.Tensor:
        """Step k of the depformer for every slot. inp: [B, dep dim] the step's input projection
        (`depformer_inputs`); prev: [B] the token chosen at step k - 1 (the frame's text token
        for k = 0); dep_kv: from `depformer_cache`, steps 0..k-1 filled (step k is written
        here). Returns logits [B, card] in the activation dtype."""
        c = self.cfg.depformer
        dep = self.depformer
        B = inp.shape[0]
        H, D = c.num_heads, c.head_dim
        # the step's input is inp + E_k[prev]: the first layer's norm and product add it
        delta, ids = (dep.text_emb if k == 0 else dep.emb[k - 1]), prev
        x = inp
        for i, layer in enumerate(dep.layers):
            x, qkv = layer.attn_in.after_norm(x, delta, layer.norm1, c.norm_eps, k, ids=ids)
            ids = None
            a = layer.attn_out.after_step_attention(qkv.view(B, 3, H, D), dep_kv[i][0], dep_kv[i][1], k)
            x, f = layer.ffn_in.after_norm(x, a, layer.norm2, c.norm_eps, k)
            delta = layer.ffn_out.after_silu(f, k)
        return dep.heads.after_add(x, delta, k)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
