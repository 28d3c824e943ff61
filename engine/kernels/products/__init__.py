"""Matrix products y = x W^T, for a half-precision W or an e4m3 one with a float32 scale per
output channel (`engine.quant`), and the products that take what comes before them into their
launch. Which kernel runs each shape is timed once (`calibration`); the files:

| file | what |
| --- | --- |
| `one_row.py` | the one-row kernel, with its prologues (`Prologue`, `PrologueKind`) |
| `rows.py` | the small-batch kernel (up to 64 rows; a prefill's in blocks): tl.dot or multiply-adds, K split |
| `e4m3.py` | e4m3 weights decoded in the kernels, and the e4m3 product's reference |
| `calibration.py` | the candidates, their timing, the choice per shape |
| `choice_cache.py` | the choices kept on disk across restarts |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import calibration as _calibration
from .calibration import calibration_stats, linear_choices  # noqa: F401
from .e4m3 import linear_e4m3_ref
from .one_row import Prologue, PrologueKind


def linear_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T; for an e4m3 W (scale given), (x . W^T) * scale in float32, cast to x's dtype."""
    return F.linear(x, w) if scale is None else linear_e4m3_ref(x, w, scale)


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T, or (x W^T) * scale for an e4m3 W: by the kernel the calibration picked for this
    shape, else cuBLAS (dequantizing an e4m3 W; on the CPU, the reference)."""
    c = _calibration.kernel_for(x.numel() // x.shape[-1], x.shape[-1], w, scale, x)
    if c is not None:
        return _calibration.run_kernel(c, x, w, scale)
    if scale is not None:
        return F.linear(x, w.to(x.dtype) * scale.to(x.dtype).unsqueeze(-1)) if x.is_cuda else linear_ref(x, w, scale)
    return F.linear(x, w)


def gelu_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.gelu(x W^T) (the exact GELU): in the product's own launch where the small-batch kernel
    is the shape's pick (Mimi's feed-forward input, 2 rows per slot), else after it."""
    c = _calibration.kernel_for(x.numel() // x.shape[-1], x.shape[-1], w, None, x)
    return F.gelu(F.linear(x, w)) if c is None else _calibration.run_kernel(c, x, w, None, gelu=True)


def norm_linear(x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float, w: torch.Tensor,
                scale: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * alpha @ W^T) (delta None: x itself; with ids, delta is an
    embedding table and the delta of row m is `embedding_ref(ids, delta)[m]`): one launch for one
    row where the one-row kernel is this shape's pick; else the embedding, `add_rms_norm` and a
    product."""
    def unfused(w, scale):
        from ..embedding import embedding_ref
        from ..rms_norm import add_rms_norm
        d = embedding_ref(ids, delta) if ids is not None else delta
        xo, h = add_rms_norm(x, d, alpha, eps)
        return xo, linear(h, w, scale)

    pro = Prologue(PrologueKind.RMS_NORM, delta, ids, alpha, eps)
    out = _calibration.fused_for(x, x.shape[-1], w, scale, pro, unfused)
    return out if out is not None else unfused(w, scale)


def silu_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) * g @ W^T for x = [a | g]: one launch for one row where the one-row kernel is this
    shape's pick; else `silu_mul` and a product."""
    def unfused(w, scale):
        from ..silu_mul import silu_mul
        return linear(silu_mul(x), w, scale)

    out = _calibration.fused_for(x, x.shape[-1] // 2, w, scale, Prologue(PrologueKind.SILU), unfused)
    return out[1] if out is not None else unfused(w, scale)


def add_linear(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None):
    """(x + delta) @ W^T, the add in the activation dtype: one launch for one row where the one-row
    kernel is this shape's pick."""
    def unfused(w, scale):
        return linear(x + delta, w, scale)

    out = _calibration.fused_for(x, x.shape[-1], w, scale, Prologue(PrologueKind.ADD, delta), unfused)
    return out[1] if out is not None else unfused(w, scale)


def attention_linear(qkv: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, step: int, w: torch.Tensor,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """step_attention(qkv, k_buf, v_buf, step) @ W^T (the depformer's in-frame attention and its
    output product): one launch for one row where the one-row kernel is this shape's pick."""
    from ..step_attention import step_attention

    B, _, H, D = qkv.shape

    def unfused(w, scale):
        return linear(step_attention(qkv, k_buf, v_buf, step).reshape(B, H * D), w, scale)

    if qkv.is_contiguous() and B == 1:  # (the kernel's blocks of K hold whole heads)
        pro = Prologue.step_attention(k_buf, v_buf, step)
        out = _calibration.fused_for(qkv.reshape(B, 3 * H * D), H * D, w, scale, pro, unfused, block_k_multiple=D)
        if out is not None:
            return out[1]
    return unfused(w, scale)
