"""Matrix products y = x W^T, and the choice of kernel for each shape.

cuBLAS does a product unless a Triton kernel measurably beats it: the first product of each
shape (during warm-up, never inside a graph capture) times cuBLAS and the kernels'
configurations as CUDA-graph replays over weight copies cycled past the L2 cache, and the
fastest is kept. Candidates: the small-batch kernel (up to 64 rows; for up to 4, also without
tl.dot), and for one row the matrix-vector kernel; e4m3 weights choose among the kernels
only. Float32 products (Mimi) run in full float32 in all, as cuBLAS runs them by default.
For one row, `norm_linear`, `silu_linear`, `add_linear` and `attention_linear` may run what
comes before the product (the RMSNorm after the residual add or an embedding lookup, the gated
SiLU, the add, the depformer's in-frame attention) in the same launch: that choice is timed
too, against the separate kernels, per shape and prologue. The choices are kept on disk
(`choice_cache`), so a restart on the same GPU and software times only shapes it has not met.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from .dispatch import triton_enabled

log = logging.getLogger("ppx.kernels")

# (kernel, (BLOCK_N, BLOCK_K, warps, stages)); "gemv" only for one row, "few" (the small-batch
# kernel without tl.dot) for up to triton_ops.FEW_ROWS rows, "rows8" (the small-batch kernel's
# larger tiles, and with a fifth number K split in that many parts) only for an e4m3 W, whose
# tiles hold half the bytes of a bf16 W's; "prefill" (the small-batch kernel over a prefill's
# rows, more than SMALL_ROWS, against an e4m3 W: the fifth number is the rows a program takes,
# and the blocks of rows are the grid's first axis)
_CONFIGS = (("rows", (16, 256, 4, 3)), ("rows", (32, 128, 4, 4)), ("rows", (16, 512, 8, 2)),
            ("rows", (64, 128, 4, 3)), ("rows", (32, 256, 4, 3)), ("gemv", (8, 256, 4, 3)), ("gemv", (4, 512, 4, 3)),
            ("gemv", (8, 512, 8, 3)), ("gemv", (2, 1024, 4, 4)), ("gemv", (4, 1024, 4, 3)),
            ("gemv", (8, 1024, 8, 3)), ("few", (8, 256, 4, 3)), ("few", (4, 512, 4, 3)), ("few", (16, 128, 4, 3)),
            ("few", (4, 256, 4, 3)), ("rows8", (32, 512, 4, 3)), ("rows8", (64, 256, 4, 3)),
            ("rows8", (16, 1024, 4, 3)), ("rows8", (64, 512, 8, 3)), ("rows8", (128, 256, 8, 3)),
            ("rows8", (32, 256, 4, 3, 4)), ("rows8", (64, 256, 4, 3, 4)), ("rows8", (32, 512, 4, 3, 2)),
            ("rows8", (16, 256, 4, 3, 8)), ("prefill", (64, 128, 4, 3, 64)), ("prefill", (128, 64, 8, 3, 128)),
            ("prefill", (128, 128, 8, 3, 64)), ("prefill", (128, 64, 4, 4, 64)), ("prefill", (64, 64, 4, 4, 128)),
            ("prefill", (256, 64, 8, 3, 64)))
SMALL_ROWS = 64  # rows up to which the Triton kernels are candidates (for an e4m3 W: the "prefill" ones past it)
# A prefill's products against an e4m3 W before their rows' calibration (one first met inside a
# capture): the small-batch kernel's pick at 64 rows for most 7B shapes, over blocks of 64 rows
PREFILL_FP8_CONFIG = ("rows", (64, 128, 4, 3))
PREFILL_KEY_ROWS = 256  # a prefill's rows are calibrated as the next multiple of 64, at most this
_choice: dict[tuple, int] = {}  # shape -> -1 for cuBLAS, else an index into _CONFIGS
# (shape, prologue kind, has delta, has ids) -> -1 for the separate kernels, else an index into _CONFIGS
_fused_choice: dict[tuple, int] = {}
_calibrated = {"products": 0, "fused": 0, "seconds": 0.0, "from_cache": 0}  # (`calibration`)
_disk = {"path": None, "context": None, "read": False}  # the choices kept on disk (`choice_cache`)


def _read_kept_choices(device: torch.device) -> None:
    """Once per process, before the first shape is timed: the choices kept on disk for this GPU
    and software (`choice_cache`)."""
    from pathlib import Path

    from . import choice_cache

    _disk["read"] = True
    path = choice_cache.cache_file()
    if path is None:
        return
    here = Path(__file__).parent
    _disk["path"] = path
    _disk["context"] = choice_cache.context(device, choice_cache.sources_digest(here / "linear.py",
                                                                                here / "triton_ops.py"))
    n = choice_cache.load(path, _disk["context"], _choice_tables(), len(_CONFIGS))
    _calibrated["from_cache"] += n
    if n:
        log.info("kernel choices: %d read from %s (%s=0 times every shape afresh)", n, path, choice_cache.ENV)


def _keep_choices() -> None:
    from . import choice_cache

    if _disk["path"] is not None and not choice_cache.save(_disk["path"], _disk["context"], _choice_tables()):
        _disk["path"] = None  # (warned once)


def _choice_tables() -> dict[str, dict]:
    return {"products": _choice, "fused": _fused_choice}


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


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
    from ..graphs.capture import capturing

    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with capturing(g, collect=False):  # (a collection per timed candidate would cost seconds in all)
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


def _candidates(rows: int, fp8: bool = False) -> list[int]:
    from .triton_ops import FEW_ROWS
    if rows > SMALL_ROWS:  # a prefill's rows (only against an e4m3 W)
        return [i for i, c in enumerate(_CONFIGS) if c == PREFILL_FP8_CONFIG or (fp8 and c[0] == "prefill")]
    return [i for i, (kind, _) in enumerate(_CONFIGS)
            if kind == "rows" or (kind == "gemv" and rows == 1) or (kind == "few" and rows <= FEW_ROWS)
            or (kind == "rows8" and fp8)]


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


def _kernel(rows: int, K: int, w: torch.Tensor, scale, like: torch.Tensor):
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
        return ("gemv", (8, 256, 4, 3)) if rows == 1 else ("rows", (32, 256, 4, 3) if fp8 else (16, 256, 4, 3))
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
    return _CONFIGS[c] if c >= 0 else None


def _run_kernel(choice, x, w, scale, gelu: bool = False):
    from . import triton_ops

    kind, cfg = choice
    if kind == "gemv":
        y = triton_ops.gemv(x, w, scale, cfg)
        return F.gelu(y) if gelu else y
    if kind == "prefill":
        return triton_ops.rows_linear(x, w, scale, cfg[:4], gelu=gelu, block_m=cfg[4], m_fast=True)
    return triton_ops.rows_linear(x, w, scale, cfg[:4], fma=kind == "few", gelu=gelu,
                                  splits=cfg[4] if len(cfg) > 4 else 1)


def _fused(x: torch.Tensor, K: int, w: torch.Tensor, scale, pro, unfused, block_k_multiple: int = 1):
    """(x or x + delta, y) from the one-row kernel with prologue `pro` (`triton_ops.Prologue`)
    when that is this product's pick, else None (the caller then runs `unfused(w, scale)`: the
    separate kernel before the product, and the product). The pick is timed as it runs, the
    prologue included: each program of the one-row kernel redoes the prologue over the whole
    row, which costs more the more programs a block shape has, so the fastest plain product's
    shape need not be the fastest fused one. Only shapes whose K block is a multiple of
    `block_k_multiple` are candidates. (On several rows a separate kernel before the product
    is cheaper than each program of the small-batch kernel redoing it.)"""
    from . import triton_ops

    rows = x.numel() // x.shape[-1]
    plain = _kernel(rows, K, w, scale, x)  # (calibrates the plain product first: `unfused` runs it)
    if rows != 1 or not triton_enabled(x) or (scale is None and (
            w.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dtype != w.dtype)):
        return None
    ok = [i for i in _candidates(1) if _CONFIGS[i][0] == "gemv" and _CONFIGS[i][1][1] % block_k_multiple == 0]
    p = pro(triton_ops.Prologue)
    if not x.is_cuda:  # the interpreter: the plain pick, so tests exercise the fused kernel
        i = _CONFIGS.index(plain) if plain in [_CONFIGS[j] for j in ok] else -1
    else:
        key = (rows, *w.shape, w.dtype, p.kind, p.delta is not None, p.ids is not None)
        i = _fused_choice.get(key)
        if i is None and torch.cuda.is_current_stream_capturing():
            # first met inside a capture: the plain pick's shape when it is a candidate
            i = _CONFIGS.index(plain) if plain in [_CONFIGS[j] for j in ok] else -1
        elif i is None:
            t0 = time.perf_counter()
            i = _fused_choice[key] = _pick_fused(x, w, scale, p, unfused, ok, key)
            _calibrated["fused"] += 1
            _calibrated["seconds"] += time.perf_counter() - t0
            _keep_choices()
    return triton_ops.gemv(x, w, scale, _CONFIGS[i][1], p) if i >= 0 else None


def _pick_fused(x, w, scale, pro, unfused, candidates: list[int], key) -> int:
    """The fastest of the one-row kernel's block shapes with the prologue `pro`, or -1 for
    `unfused(w, scale)` where that is faster by more than `_EXTRA_LAUNCH_MS`, timed as `_pick`
    times products (weights cycled past the L2 cache). The prologue's writes (x + delta, the
    depformer's k and v) are those the call itself then makes."""
    from . import triton_ops

    ws, ss, calls = _cold_copies(w, scale)
    n = len(ws)
    times = {-1: _time(lambda j: unfused(ws[j % n], ss[j % n]), calls)}
    for i in candidates:
        cfg = _CONFIGS[i][1]
        try:
            times[i] = _time(lambda j: triton_ops.gemv(x, ws[j % n], ss[j % n], cfg, pro), calls)
        except _Unrunnable:  # (a failed capture is an error, not a slow candidate)
            continue
    fused = min((i for i in times if i >= 0), key=times.get, default=-1)
    # The separate kernels must win by more than an extra launch costs in the tick beyond what
    # this timing shows. On an H200: the depformer's separate in-frame attention timed 0.4 us
    # faster per product here, yet made its 8 steps 80 us slower (0.92 vs 0.84 ms); the
    # temporal transformer's norm and ffn_in product, separate, timed 0.7 us faster here and
    # were 3.7 us faster per layer in the tick (3.70 vs 3.81 ms for 32 layers).
    best = fused if fused >= 0 and times[fused] <= times[-1] + _EXTRA_LAUNCH_MS else -1
    log.debug("fused linear %s: best %s %.1f us of %s", key, best, times[best] * 1e3,
              {k: round(v * 1e3, 1) for k, v in times.items()})
    return best


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    c = _kernel(x.numel() // x.shape[-1], x.shape[-1], w, None, x)
    return F.linear(x, w) if c is None else _run_kernel(c, x, w, None)


def gelu_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.gelu(x W^T) (the exact GELU): in the product's own launch where the small-batch kernel
    is the shape's pick (Mimi's feed-forward input, 2 rows per slot), else after it."""
    c = _kernel(x.numel() // x.shape[-1], x.shape[-1], w, None, x)
    return F.gelu(F.linear(x, w)) if c is None else _run_kernel(c, x, w, None, gelu=True)


def calibration() -> dict:
    """How many product shapes ('products') and one-row products with a prologue ('fused') the
    calibration has timed in this process, and the seconds that took, Triton's compilation of
    each candidate included ('seconds'); how many choices it read from disk instead
    ('from_cache', `choice_cache`)."""
    return dict(_calibrated)


def linear_choices() -> dict:
    """What the calibration chose, per (rows, out, in, dtype): 'cublas' or the kernel config;
    and per one-row product with a prologue ('fused (rows, out, in, dtype, prologue kind, has
    delta, has ids)'): 'separate' kernels or the one-row kernel's config."""
    out = {str(k): ("cublas" if v < 0 else _CONFIGS[v]) for k, v in _choice.items()}
    out.update({f"fused {k}": ("separate" if v < 0 else _CONFIGS[v]) for k, v in _fused_choice.items()})
    return out


def linear_fp8_ref(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (x . W8^T) * scale, float32 accumulation, in x's dtype (scale per output channel)."""
    return (F.linear(x.float(), w8.float()) * scale.float()).to(x.dtype)


def linear_fp8(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # (many rows, a prefill's, also run a Triton kernel that reads the e4m3 W itself:
    # dequantizing W for cuBLAS moved 7 bytes per weight and took ~45 ms of GPU time per 7B
    # prompt on an H200)
    c = _kernel(x.numel() // x.shape[-1], x.shape[-1], w8, scale, x)
    if c is not None:
        return _run_kernel(c, x, w8, scale)
    if x.is_cuda:
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
    def unfused(w, scale):
        from .rms_norm import add_rms_norm, rms_norm
        d = embedding_ref(ids, delta) if ids is not None else delta
        xo, h = add_rms_norm(x, d, alpha, eps) if d is not None else (x, rms_norm(x, alpha, eps))
        return xo, product(h, w, scale)

    out = _fused(x, x.shape[-1], w, scale, lambda P: P(1, delta, ids, alpha, eps), unfused)
    return out if out is not None else unfused(w, scale)


def silu_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) * g @ W^T for x = [a | g]: one launch for one row where the one-row kernel is this
    shape's pick; else `silu_mul` and a product."""
    def unfused(w, scale):
        from .activations import silu_mul
        return product(silu_mul(x), w, scale)

    out = _fused(x, x.shape[-1] // 2, w, scale, lambda P: P(2), unfused)
    return out[1] if out is not None else unfused(w, scale)


def add_linear(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None):
    """(x + delta) @ W^T, the add in the activation dtype: one launch for one row where the one-row
    kernel is this shape's pick."""
    def unfused(w, scale):
        return product(x + delta, w, scale)

    out = _fused(x, x.shape[-1], w, scale, lambda P: P(3, delta), unfused)
    return out[1] if out is not None else unfused(w, scale)


def attention_linear(qkv: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, step: int, w: torch.Tensor,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """step_attention(qkv, k_buf, v_buf, step) @ W^T (the depformer's in-frame attention and
    its output product): one launch for one row where the one-row kernel is this shape's pick."""
    from .attention import step_attention

    B, _, H, D = qkv.shape

    def unfused(w, scale):
        return product(step_attention(qkv, k_buf, v_buf, step).reshape(B, H * D), w, scale)

    if qkv.is_contiguous():  # (the kernel's blocks of K hold whole heads)
        out = _fused(qkv.reshape(B, 3 * H * D), H * D, w, scale,
                     lambda P: P.step_attention(k_buf, v_buf, step), unfused, block_k_multiple=D)
        if out is not None:
            return out[1]
    return unfused(w, scale)
