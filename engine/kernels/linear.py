"""Matrix products y = x W^T, and the choice of kernel for each shape.

cuBLAS does a product unless a Triton kernel measurably beats it: the first product of each
shape (during warm-up, never inside a graph capture) times cuBLAS and the kernels'
configurations as CUDA-graph replays over weight copies cycled past the L2 cache, and the
fastest is kept. Candidates: the small-batch kernel (up to 64 rows), and for one row the
matrix-vector kernel; e4m3 weights choose among the kernels only.
Where the matrix-vector kernel wins, `norm_linear` and `silu_linear` run the RMSNorm (with the
residual add) or the gated SiLU in front of the product in the same launch.
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
    from . import triton_ops

    kind, cfg = _CONFIGS[i]
    if kind == "gemv":
        return triton_ops.gemv(x, w, scale, cfg)
    return triton_ops.small_linear(x, w, cfg) if scale is None else triton_ops.fp8_linear(x, w, scale, cfg)


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


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if (triton_enabled(x) and w.dtype in (torch.bfloat16, torch.float16) and x.numel() // x.shape[-1] <= SMALL_ROWS
            and x.dtype == w.dtype):
        from . import triton_ops

        rows = x.numel() // x.shape[-1]
        if not x.is_cuda:  # the interpreter: always a kernel, so tests exercise them
            return triton_ops.gemv(x, w) if rows == 1 else triton_ops.small_linear(x, w)
        key = (rows, *w.shape, w.dtype)
        c = _choice.get(key)
        if c is None:
            c = _choice[key] = _pick(x, w, key) if not torch.cuda.is_current_stream_capturing() else -1
        if c >= 0:
            return _run(c, x, w)
    return F.linear(x, w)


def gemv_choice(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None):
    """For one row x against W of any size: the one-row kernel's configuration when the
    calibration picks it for this shape (so a prologue may be fused into it), else None."""
    if not (triton_enabled(x) and x.numel() == x.shape[-1] and w.dtype in (torch.bfloat16, torch.float16, FP8)):
        return None
    if not x.is_cuda:  # the interpreter: always, so tests exercise the fused paths
        return (8, 256, 4, 3)
    key = (1, *w.shape, w.dtype)
    c = _choice.get(key)
    if c is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        c = _choice[key] = _pick(torch.randn(1, w.shape[1], device=x.device, dtype=x.dtype), w, key, scale)
    return _CONFIGS[c][1] if c >= 0 and _CONFIGS[c][0] == "gemv" else None


def linear_choices() -> dict:
    """What the calibration chose, per (rows, out, in, dtype): 'cublas' or the kernel config."""
    return {str(k): ("cublas" if v < 0 else _CONFIGS[v]) for k, v in _choice.items()}


def linear_fp8_ref(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (x . W8^T) * scale, float32 accumulation, in x's dtype (scale per output channel)."""
    return (F.linear(x.float(), w8.float()) * scale.float()).to(x.dtype)


def linear_fp8(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if triton_enabled(x) and rows <= 64:
        from . import triton_ops
        if not x.is_cuda:
            return triton_ops.gemv(x, w8, scale) if rows == 1 else triton_ops.fp8_linear(x, w8, scale)
        if rows > SMALL_ROWS:
            return triton_ops.fp8_linear(x, w8, scale)
        key = (rows, *w8.shape, w8.dtype)
        c = _choice.get(key)
        if c is None:
            c = _choice[key] = _pick(x, w8, key, scale) if not torch.cuda.is_current_stream_capturing() else -1
        if c < 0:  # chosen inside a capture, with no timing: the small-batch kernel
            return triton_ops.fp8_linear(x, w8, scale)
        return _run(c, x, w8, scale)
    if x.is_cuda:
        # many rows (a prefill): dequantize once to the activation dtype and use cuBLAS
        return F.linear(x, (w8.to(x.dtype) * scale.to(x.dtype).unsqueeze(-1)))
    return linear_fp8_ref(x, w8, scale)


def product(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T for a half-precision W, or (x W8^T) * scale for an e4m3 one."""
    return linear(x, w) if scale is None else linear_fp8(x, w, scale)


def norm_linear(x: torch.Tensor, delta: torch.Tensor | None, alpha: torch.Tensor, eps: float, w: torch.Tensor,
                scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * alpha @ W^T) (delta None: x itself): for one row, one
    launch when the one-row kernel is this shape's pick; else `add_rms_norm` and a product."""
    cfg = gemv_choice(x, w, scale)
    if cfg is not None:
        from . import triton_ops
        return triton_ops.norm_gemv(x, delta, alpha, eps, w, scale, cfg)
    from .rms_norm import add_rms_norm, rms_norm
    x, h = add_rms_norm(x, delta, alpha, eps) if delta is not None else (x, rms_norm(x, alpha, eps))
    return x, product(h, w, scale)


def silu_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) * g @ W^T for x = [a | g]: one launch for one row when the one-row kernel is this
    shape's pick; else `silu_mul` and a product."""
    cfg = gemv_choice(x[..., :x.shape[-1] // 2], w, scale)
    if cfg is not None:
        from . import triton_ops
        return triton_ops.silu_gemv(x, w, scale, cfg)
    from .activations import silu_mul
    return product(silu_mul(x), w, scale)
