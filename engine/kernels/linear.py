"""Matrix products y = x W^T. cuBLAS does them unless, for a few rows against a small
half-precision W (the depformer's per-step weights), a Triton launch that streams W once
measurably beats it: the first product of each shape (during warm-up, never inside a graph
capture) times cuBLAS and the kernel's configurations, and the fastest is kept."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .dispatch import triton_enabled

log = logging.getLogger("ppx.kernels")

_SMALL_W = 16 << 20  # elements: the depformer's matrices are up to 5.8 M, the temporal's 92 M
_CONFIGS = ((16, 256, 4, 3), (32, 128, 4, 4), (16, 512, 8, 2), (64, 128, 4, 3))  # BLOCK_N, BLOCK_K, warps, stages
_choice: dict[tuple, int] = {}  # shape -> -1 for cuBLAS, else an index into _CONFIGS


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _time(fn, n: int = 30) -> float:
    fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


def _pick(x, w, key) -> int:
    from . import triton_ops

    if torch.cuda.is_current_stream_capturing():
        return -1
    times = {-1: _time(lambda: F.linear(x, w))}
    for i, cfg in enumerate(_CONFIGS):
        try:
            times[i] = _time(lambda: triton_ops.small_linear(x, w, cfg))
        except Exception:  # a configuration the GPU cannot run
            continue
    best = min(times, key=times.get)
    log.debug("linear %s: cuBLAS %.1f us, best %s %.1f us", key, times[-1] * 1e3, best, times[best] * 1e3)
    return best


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if (triton_enabled(x) and w.dtype in (torch.bfloat16, torch.float16) and w.numel() <= _SMALL_W
            and x.numel() // x.shape[-1] <= 16 and x.dtype == w.dtype):
        from . import triton_ops

        if not x.is_cuda:  # the interpreter: always the kernel, so tests exercise it
            return triton_ops.small_linear(x, w)
        key = (x.numel() // x.shape[-1], *w.shape, w.dtype)
        c = _choice.get(key)
        if c is None:
            c = _choice[key] = _pick(x, w, key) if not torch.cuda.is_current_stream_capturing() else -1
        if c >= 0:
            return triton_ops.small_linear(x, w, _CONFIGS[c])
    return F.linear(x, w)


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
        return triton_ops.fp8_linear(x, w8, scale)
    if x.is_cuda:
        # many rows (a prefill): dequantize once to the activation dtype and use cuBLAS
        return F.linear(x, (w8.to(x.dtype) * scale.to(x.dtype).unsqueeze(-1)))
    return linear_fp8_ref(x, w8, scale)
