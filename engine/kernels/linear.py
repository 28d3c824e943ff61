"""Matrix products y = x W^T, and the choice of kernel for each shape.

cuBLAS does a product unless a Triton kernel measurably beats it: the first product of each
shape (during warm-up, never inside a graph capture) times cuBLAS and the kernels'
configurations as CUDA-graph replays over weight copies cycled past the L2 cache, and the
fastest is kept. Candidates: the small-batch kernel (up to 64 rows), and for one row the
matrix-vector kernel; e4m3 weights choose among the kernels only. Float32 products (Mimi)
run in full float32 in either, as cuBLAS runs them by default.
Where the one-row kernel wins, `norm_linear`, `silu_linear`, `add_linear` and `attention_linear`
run what comes before the product (the RMSNorm after the residual add or an embedding lookup,
the gated SiLU, the add, the depformer's in-frame attention) in the same launch.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..quant import FP8
from .dispatch import triton_enabled

log = logging.getLogger("ppx.kernels")

# (kernel, (BLOCK_N, BLOCK_K, warps, stages)); "gemv" only for one row
_CONFIGS = (("rows", (16, 256, 4, 3)), ("rows", (32, 128, 4, 4)), ("rows", (16, 512, 8, 2)),
            ("rows", (64, 128, 4, 3)), ("rows", (32, 256, 4, 3)), ("gemv", (8, 256, 4, 3)), ("gemv", (4, 512, 4, 3)),
            ("gemv", (8, 512, 8, 3)), ("gemv", (2, 1024, 4, 4)), ("gemv", (4, 1024, 4, 3)),
            ("gemv", (8, 1024, 8, 3)))
SMALL_ROWS = 64  # rows up to which the Triton kernels are candidates
_choice: dict[tuple, int] = {}  # shape -> -1 for cuBLAS, else an index into _CONFIGS


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


_COLD_BYTES = 192 << 20  # cycled weight copies: well past an H100's 50 MB L2


def _time(fn, n: int) -> float:
    """Milliseconds per call of fn(i) for i in range(n), as a CUDA graph replays them, which is
    how the tick runs: eager timing would measure the host's launch overhead instead."""
    fn(0)  # compiles outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fn(i)
    g.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    g.replay()
    e.record()
    e.synchronize()
    del g
    return s.elapsed_time(e) / n


def _run(i: int, x, w, scale=None):
    """Configuration i of `_CONFIGS` (the kernel and its blocks) on x and W."""
    return _run_kernel(_CONFIGS[i], x, w, scale)


def _candidates(rows: int) -> list[int]:
    return [i for i, (kind, _) in enumerate(_CONFIGS) if kind == "rows" or rows == 1]


def _pick(x, w, key, scale=None) -> int:
    """Times cuBLAS (for half-precision W) and every candidate kernel on copies of W cycled so
    that each call reads its weights from memory, as the tick does, not from L2."""
    if torch.cuda.is_current_stream_capturing():
        return -1
    n = max(2, min(64, -(-_COLD_BYTES // (w.numel() * w.element_size()))))
    ws = [w] + [w.clone() for _ in range(n - 1)]
    ss = [scale] * n if scale is None else [scale] + [scale.clone() for _ in range(n - 1)]
    calls = max(n, 16)
    times = {}
    if scale is None:
        times[-1] = _time(lambda j: F.linear(x, ws[j % n]), calls)
    for i in _candidates(key[0]):
        try:
            times[i] = _time(lambda j: _run(i, x, ws[j % n], ss[j % n]), calls)
        except Exception:  # a configuration the GPU cannot run
            continue
    best = min(times, key=times.get)
    log.debug("linear %s: best %s %.1f us of %s", key, best, times[best] * 1e3,
              {k: round(v * 1e3, 1) for k, v in times.items()})
    return best


def _kernel(rows: int, K: int, w: torch.Tensor, scale, like: torch.Tensor):
    """The Triton kernel and configuration for a product of `rows` rows of width K against W
    (e4m3 when scale is given), or None for cuBLAS. The first product of each shape outside a
    capture is timed (`_pick`); one first met inside a capture takes cuBLAS, or for an e4m3 W
    the small-batch kernel."""
    fp8 = scale is not None
    if not triton_enabled(like) or rows > SMALL_ROWS or (not fp8 and (
            w.dtype not in (torch.bfloat16, torch.float16, torch.float32) or like.dtype != w.dtype)):
        return None
    if not like.is_cuda:  # the interpreter: always a kernel, so tests exercise them
        return ("gemv", (8, 256, 4, 3)) if rows == 1 else ("rows", (32, 256, 4, 3) if fp8 else (16, 256, 4, 3))
    key = (rows, *w.shape, w.dtype)
    c = _choice.get(key)
    if c is None:
        if torch.cuda.is_current_stream_capturing():
            return ("rows", (32, 256, 4, 3)) if fp8 else None
        x = torch.randn(rows, K, device=like.device, dtype=like.dtype)
        c = _choice[key] = _pick(x, w, key, scale)
    return _CONFIGS[c] if c >= 0 else None


def _run_kernel(choice, x, w, scale):
    from . import triton_ops

    kind, cfg = choice
    return (triton_ops.gemv if kind == "gemv" else triton_ops.rows_linear)(x, w, scale, cfg)


def _fused(x: torch.Tensor, K: int, w: torch.Tensor, scale, pro, block_k_multiple: int = 1):
    """(x or x + delta, y) from the one-row kernel with prologue `pro` (`triton_ops.Prologue`)
    when it is this shape's pick (with a K block that is a multiple of `block_k_multiple`), else
    None. (On several rows a separate kernel before the product is cheaper than each program of
    the small-batch kernel redoing it.)"""
    c = _kernel(x.numel() // x.shape[-1], K, w, scale, x)
    if c is None or c[0] != "gemv" or c[1][1] % block_k_multiple:
        return None
    from . import triton_ops
    return triton_ops.gemv(x, w, scale, c[1], pro(triton_ops.Prologue))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    c = _kernel(x.numel() // x.shape[-1], x.shape[-1], w, None, x)
    return F.linear(x, w) if c is None else _run_kernel(c, x, w, None)


def linear_choices() -> dict:
    """What the calibration chose, per (rows, out, in, dtype): 'cublas' or the kernel config."""
    return {str(k): ("cublas" if v < 0 else _CONFIGS[v]) for k, v in _choice.items()}


def linear_fp8_ref(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (x . W8^T) * scale, float32 accumulation, in x's dtype (scale per output channel)."""
    return (F.linear(x.float(), w8.float()) * scale.float()).to(x.dtype)


def linear_fp8(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    c = _kernel(x.numel() // x.shape[-1], x.shape[-1], w8, scale, x)
    if c is not None:
        return _run_kernel(c, x, w8, scale)
    if x.is_cuda:
        # many rows (a prefill): dequantize once to the activation dtype and use cuBLAS
        return F.linear(x, (w8.to(x.dtype) * scale.to(x.dtype).unsqueeze(-1)))
    return linear_fp8_ref(x, w8, scale)


def product(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T for a half-precision W, or (x W8^T) * scale for an e4m3 one."""
    return linear(x, w) if scale is None else linear_fp8(x, w, scale)


def embedding_ref(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The reference's ScaledEmbedding: id -1 gives a zero vector, other negatives clamp to 0."""
    out = F.embedding(ids.clamp(min=0), table)
    return torch.where((ids == -1).unsqueeze(-1), torch.zeros((), dtype=out.dtype, device=out.device), out)


def norm_linear(x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float, w: torch.Tensor,
                scale: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * alpha @ W^T) (delta None: x itself; with ids, delta is an
    embedding table and the delta of row m is `embedding_ref(ids, delta)[m]`): one launch for one
    row where the one-row kernel is this shape's pick; else the embedding, `add_rms_norm` and a
    product."""
    out = _fused(x, x.shape[-1], w, scale, lambda P: P(1, delta, ids, alpha, eps))
    if out is not None:
        return out
    from .rms_norm import add_rms_norm, rms_norm
    if ids is not None:
        delta = embedding_ref(ids, delta)
    x, h = add_rms_norm(x, delta, alpha, eps) if delta is not None else (x, rms_norm(x, alpha, eps))
    return x, product(h, w, scale)


def silu_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) * g @ W^T for x = [a | g]: one launch for one row where the one-row kernel is this
    shape's pick; else `silu_mul` and a product."""
    out = _fused(x, x.shape[-1] // 2, w, scale, lambda P: P(2))
    if out is not None:
        return out[1]
    from .activations import silu_mul
    return product(silu_mul(x), w, scale)


def add_linear(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None):
    """(x + delta) @ W^T, the add in the activation dtype: one launch for one row where the one-row
    kernel is this shape's pick."""
    out = _fused(x, x.shape[-1], w, scale, lambda P: P(3, delta))
    return out[1] if out is not None else product(x + delta, w, scale)


def attention_linear(qkv: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, step: int, w: torch.Tensor,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """step_attention(qkv, k_buf, v_buf, step) @ W^T (the depformer's in-frame attention and
    its output product): one launch for one row where the one-row kernel is this shape's pick."""
    from .attention import step_attention

    B, _, H, D = qkv.shape
    if qkv.is_contiguous():  # (the kernel's blocks of K hold whole heads)
        out = _fused(qkv.reshape(B, 3 * H * D), H * D, w, scale,
                     lambda P: P.step_attention(k_buf, v_buf, step), block_k_multiple=D)
        if out is not None:
            return out[1]
    return product(step_attention(qkv, k_buf, v_buf, step).reshape(B, H * D), w, scale)
