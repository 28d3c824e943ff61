"""Which kernel runs each product, chosen by timing.

cuBLAS does a product unless a Triton kernel measurably beats it: the first product of each
shape (during warm-up, never inside a graph capture) times cuBLAS and the kernels'
configurations as CUDA-graph replays over weight copies cycled past the L2 cache, and the
fastest is kept. Candidates: the small-batch kernel (`rows`, up to 64 rows; for up to 4, also
without tl.dot), and for one row the one-row kernel (`one_row`); e4m3 weights choose among the
kernels only. For one row, whether what comes before a product (a `Prologue`) runs inside its
launch is timed too, against the separate kernels, per shape and prologue. The choices are kept
on disk (`choice_cache`), so a restart on the same GPU and software times only shapes it has
not met. Float32 products (Mimi) run in full float32 in all, as cuBLAS runs them by default.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...device import capturing
from ..common import triton_enabled
from . import choice_cache
from .one_row import Prologue, one_row
from .rows import FEW_ROWS, rows_linear

log = logging.getLogger("ppx.kernels")

# (kernel, (BLOCK_N, BLOCK_K, warps, stages)); "one_row" only for one row, "few_rows" (the small-batch
# kernel without tl.dot) for up to rows.FEW_ROWS rows, "rows_e4m3" (the small-batch kernel's
# larger tiles, and with a fifth number K split in that many parts) only for an e4m3 W, whose
# tiles hold half the bytes of a bf16 W's; "prefill_e4m3" (the small-batch kernel over a prefill's
# rows, more than SMALL_ROWS, against an e4m3 W: the fifth number is the rows a program takes,
# and the blocks of rows are the grid's first axis)
CONFIGS = (
    ("rows", (16, 256, 4, 3)), ("rows", (32, 128, 4, 4)), ("rows", (16, 512, 8, 2)), ("rows", (64, 128, 4, 3)),
    ("rows", (32, 256, 4, 3)),
    ("one_row", (8, 256, 4, 3)), ("one_row", (4, 512, 4, 3)), ("one_row", (8, 512, 8, 3)),
    ("one_row", (2, 1024, 4, 4)), ("one_row", (4, 1024, 4, 3)), ("one_row", (8, 1024, 8, 3)),
    ("few_rows", (8, 256, 4, 3)), ("few_rows", (4, 512, 4, 3)), ("few_rows", (16, 128, 4, 3)),
    ("few_rows", (4, 256, 4, 3)),
    ("rows_e4m3", (32, 512, 4, 3)), ("rows_e4m3", (64, 256, 4, 3)), ("rows_e4m3", (16, 1024, 4, 3)),
    ("rows_e4m3", (64, 512, 8, 3)), ("rows_e4m3", (128, 256, 8, 3)), ("rows_e4m3", (32, 256, 4, 3, 4)),
    ("rows_e4m3", (64, 256, 4, 3, 4)), ("rows_e4m3", (32, 512, 4, 3, 2)), ("rows_e4m3", (16, 256, 4, 3, 8)),
    ("prefill_e4m3", (64, 128, 4, 3, 64)), ("prefill_e4m3", (128, 64, 8, 3, 128)),
    ("prefill_e4m3", (128, 128, 8, 3, 64)), ("prefill_e4m3", (128, 64, 4, 4, 64)),
    ("prefill_e4m3", (64, 64, 4, 4, 128)), ("prefill_e4m3", (256, 64, 8, 3, 64)),
)
SMALL_ROWS = 64  # rows up to which the Triton kernels are candidates (for an e4m3 W: the "prefill_e4m3" ones past it)
# A prefill's products against an e4m3 W before their rows' calibration (one first met inside a
# capture): the small-batch kernel's pick at 64 rows for most 7B shapes, over blocks of 64 rows
PREFILL_FP8_CONFIG = ("rows", (64, 128, 4, 3))
PREFILL_KEY_ROWS = 256  # a prefill's rows are calibrated as the next multiple of 64, at most this
_choice: dict[tuple, int] = {}  # shape -> -1 for cuBLAS, else an index into CONFIGS
# (shape, prologue kind, has delta, has ids) -> -1 for the separate kernels, else an index into CONFIGS
_fused_choice: dict[tuple, int] = {}
_calibrated = {"products": 0, "fused": 0, "seconds": 0.0, "from_cache": 0}  # (`calibration`)
_disk = {"path": None, "context": None, "read": False}  # the choices kept on disk (`choice_cache`)


def _read_kept_choices(device: torch.device) -> None:
    """Once per process, before the first shape is timed: the choices kept on disk for this GPU
    and software (`choice_cache`)."""
    _disk["read"] = True
    path = choice_cache.cache_file()
    if path is None:
        return
    here = Path(__file__).parent
    _disk["path"] = path
    _disk["context"] = choice_cache.context(device, choice_cache.sources_digest(
        *(here / f for f in ("calibration.py", "one_row.py", "rows.py", "e4m3.py"))))
    n = choice_cache.load(path, _disk["context"], _choice_tables(), len(CONFIGS))
    _calibrated["from_cache"] += n
    if n:
        log.info("kernel choices: %d read from %s (PPX_KERNEL_CACHE=0 times every shape afresh)", n, path)


def _keep_choices() -> None:
    if _disk["path"] is not None and not choice_cache.save(_disk["path"], _disk["context"], _choice_tables()):
        _disk["path"] = None  # (warned once)


def _choice_tables() -> dict[str, dict]:
    return {"products": _choice, "fused": _fused_choice}


_EXTRA_LAUNCH_MS = 0.5e-3  # (`_pick_fused`)
_COLD_BYTES = 192 << 20  # cycled weight copies: well past an H100's 50 MB L2


class _Unrunnable(Exception):
    """A kernel configuration the GPU cannot run (too much shared memory, say)."""


def _time(fn, n: int) -> float:
    """Milliseconds per call of fn(i) for i in range(n), as a CUDA graph replays them, which is
    how the tick runs: eager timing would measure the host's launch overhead instead. fn(0)
    runs first, outside the capture (it compiles); what it raises is `_Unrunnable`."""
    try:
        fn(0)
    except Exception as e:
        raise _Unrunnable(str(e)) from e
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with capturing(g, collect=False, thread_local=True):  # (a collection per timed candidate would cost seconds in all)
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
    """Configuration i of `CONFIGS` (the kernel and its blocks) on x and W."""
    return run_kernel(CONFIGS[i], x, w, scale)


def _candidates(rows: int, fp8: bool = False) -> list[int]:
    if rows > SMALL_ROWS:  # a prefill's rows (only against an e4m3 W)
        return [i for i, c in enumerate(CONFIGS) if c == PREFILL_FP8_CONFIG or (fp8 and c[0] == "prefill_e4m3")]
    return [i for i, (kind, _) in enumerate(CONFIGS)
            if kind == "rows" or (kind == "one_row" and rows == 1) or (kind == "few_rows" and rows <= FEW_ROWS)
            or (kind == "rows_e4m3" and fp8)]


def _cold_copies(w: torch.Tensor, scale):
    """(copies of W, of its scale, calls): enough copies that cycling them reads W from memory."""
    n = max(2, min(64, -(-_COLD_BYTES // (w.numel() * w.element_size()))))
    ws = [w] + [w.clone() for _ in range(n - 1)]
    ss = [scale] * n if scale is None else [scale] + [scale.clone() for _ in range(n - 1)]
    return ws, ss, max(n, 16)


def _pick(x, w, key, scale=None) -> int:
    """Times cuBLAS (for half-precision W) and every candidate kernel on copies of W cycled so
    that each call reads its weights from memory, as the tick does, not from L2."""
    if torch.cuda.is_current_stream_capturing():
        return -1
    ws, ss, calls = _cold_copies(w, scale)
    n = len(ws)
    times = {}
    if scale is None:
        times[-1] = _time(lambda j: F.linear(x, ws[j % n]), calls)
    for i in _candidates(key[0], scale is not None):
        try:
            times[i] = _time(lambda j: _run(i, x, ws[j % n], ss[j % n]), calls)
        except _Unrunnable:  # (a failed capture is an error, not a slow candidate)
            continue
    best = min(times, key=times.get)
    log.debug("linear %s: best %s %.1f us of %s", key, best, times[best] * 1e3,
              {k: round(v * 1e3, 1) for k, v in times.items()})
    return best


def kernel_for(rows: int, K: int, w: torch.Tensor, scale, like: torch.Tensor):
    """The Triton kernel and configuration for a product of `rows` rows of width K against W
    (e4m3 when scale is given), or None for cuBLAS. The first product of each shape outside a
    capture is timed (`_pick`); one first met inside a capture takes cuBLAS, or for an e4m3 W
    the small-batch kernel. Past SMALL_ROWS rows only an e4m3 W's products (a prefill's) take a
    kernel, timed once per number of rows rounded up to 64 (at most PREFILL_KEY_ROWS)."""
    fp8 = scale is not None
    if not triton_enabled(like) or (rows > SMALL_ROWS and not (fp8 and like.is_cuda)) or (not fp8 and (
            w.dtype not in (torch.bfloat16, torch.float16, torch.float32) or like.dtype != w.dtype)):
        return None
    if not like.is_cuda:  # the interpreter: always a kernel, so tests exercise them
        return ("one_row", (8, 256, 4, 3)) if rows == 1 else ("rows", (32, 256, 4, 3) if fp8 else (16, 256, 4, 3))
    if rows > SMALL_ROWS:
        rows = min(PREFILL_KEY_ROWS, -(-rows // 64) * 64)
    key = (rows, *w.shape, w.dtype)
    c = _choice.get(key)
    if c is None and not _disk["read"] and not torch.cuda.is_current_stream_capturing():
        _read_kept_choices(like.device)
        c = _choice.get(key)
    if c is None:
        if torch.cuda.is_current_stream_capturing():
            return (PREFILL_FP8_CONFIG if rows > SMALL_ROWS else ("rows", (32, 256, 4, 3))) if fp8 else None
        # (a private generator: calibration leaves torch's own random state as it was)
        gen = torch.Generator(like.device).manual_seed(0)
        x = torch.randn(rows, K, device=like.device, dtype=like.dtype, generator=gen)
        t0 = time.perf_counter()
        c = _choice[key] = _pick(x, w, key, scale)
        _calibrated["products"] += 1
        _calibrated["seconds"] += time.perf_counter() - t0
        _keep_choices()
    return CONFIGS[c] if c >= 0 else None


def run_kernel(choice, x, w, scale, gelu: bool = False):
    """The product by the kernel and configuration `choice` (an entry of CONFIGS)."""
    kind, cfg = choice
    if kind == "one_row":
        y = one_row(x, w, scale, cfg)
        return F.gelu(y) if gelu else y
    if kind == "prefill_e4m3":
        return rows_linear(x, w, scale, cfg[:4], gelu=gelu, block_m=cfg[4], m_fast=True)
    return rows_linear(x, w, scale, cfg[:4], fma=kind == "few_rows", gelu=gelu, splits=cfg[4] if len(cfg) > 4 else 1)


def fused_for(x: torch.Tensor, K: int, w: torch.Tensor, scale, pro: Prologue, unfused, block_k_multiple: int = 1):
    """(x or x + delta, y) from the one-row kernel with prologue `pro` (`one_row.Prologue`)
    when that is this product's pick, else None (the caller then runs `unfused(w, scale)`: the
    separate kernel before the product, and the product). The pick is timed as it runs, the
    prologue included: each program of the one-row kernel redoes the prologue over the whole
    row, which costs more the more programs a block shape has, so the fastest plain product's
    shape need not be the fastest fused one. Only shapes whose K block is a multiple of
    `block_k_multiple` are candidates. (On several rows a separate kernel before the product
    is cheaper than each program of the small-batch kernel redoing it.)"""
    rows = x.numel() // x.shape[-1]
    plain = kernel_for(rows, K, w, scale, x)  # (calibrates the plain product first: `unfused` runs it)
    if rows != 1 or not triton_enabled(x) or (scale is None and (
            w.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dtype != w.dtype)):
        return None
    ok = [i for i in _candidates(1) if CONFIGS[i][0] == "one_row" and CONFIGS[i][1][1] % block_k_multiple == 0]
    if not x.is_cuda:  # the interpreter: the plain pick, so tests exercise the fused kernel
        i = CONFIGS.index(plain) if plain in [CONFIGS[j] for j in ok] else -1
    else:
        key = (rows, *w.shape, w.dtype, int(pro.kind), pro.delta is not None, pro.ids is not None)
        i = _fused_choice.get(key)
        if i is None and torch.cuda.is_current_stream_capturing():
            # first met inside a capture: the plain pick's shape when it is a candidate
            i = CONFIGS.index(plain) if plain in [CONFIGS[j] for j in ok] else -1
        elif i is None:
            t0 = time.perf_counter()
            i = _fused_choice[key] = _pick_fused(x, w, scale, pro, unfused, ok, key)
            _calibrated["fused"] += 1
            _calibrated["seconds"] += time.perf_counter() - t0
            _keep_choices()
    return one_row(x, w, scale, CONFIGS[i][1], pro) if i >= 0 else None


def _pick_fused(x, w, scale, pro, unfused, candidates: list[int], key) -> int:
    """The fastest of the one-row kernel's block shapes with the prologue `pro`, or -1 for
    `unfused(w, scale)` where that is faster by more than `_EXTRA_LAUNCH_MS`, timed as `_pick`
    times products (weights cycled past the L2 cache). The prologue's writes (x + delta, the
    depformer's k and v) are those the call itself then makes."""
    ws, ss, calls = _cold_copies(w, scale)
    n = len(ws)
    times = {-1: _time(lambda j: unfused(ws[j % n], ss[j % n]), calls)}
    for i in candidates:
        cfg = CONFIGS[i][1]
        try:
            times[i] = _time(lambda j: one_row(x, ws[j % n], ss[j % n], cfg, pro), calls)
        except _Unrunnable:  # (a failed capture is an error, not a slow candidate)
            continue
    fused = min((i for i in times if i >= 0), key=times.get, default=-1)
    # The separate kernels must win by more than an extra launch costs in the tick beyond what
    # this timing shows: timed alone, a product does not see the gap a separate kernel before it
    # opens in a chain of dependent launches.
    best = fused if fused >= 0 and times[fused] <= times[-1] + _EXTRA_LAUNCH_MS else -1
    log.debug("fused linear %s: best %s %.1f us of %s", key, best, times[best] * 1e3,
              {k: round(v * 1e3, 1) for k, v in times.items()})
    return best


def calibration_stats() -> dict:
    """How many product shapes ('products') and one-row products with a prologue ('fused') the
    calibration has timed in this process, and the seconds that took, Triton's compilation of
    each candidate included ('seconds'); how many choices it read from disk instead
    ('from_cache', `choice_cache`)."""
    return dict(_calibrated)


def linear_choices() -> dict:
    """What the calibration chose, per (rows, out, in, dtype): 'cublas' or the kernel config;
    and per one-row product with a prologue ('fused (rows, out, in, dtype, prologue kind, has
    delta, has ids)'): 'separate' kernels or the one-row kernel's config."""
    out = {str(k): ("cublas" if v < 0 else CONFIGS[v]) for k, v in _choice.items()}
    out.update({f"fused {k}": ("separate" if v < 0 else CONFIGS[v]) for k, v in _fused_choice.items()})
    return out


