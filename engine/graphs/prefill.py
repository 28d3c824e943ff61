"""CUDA graphs of the prompt phase's prefill, one per prompt-length bucket.

Launched eagerly, a prefill of the 7B model is bound by the host: each of its 32 layers
launches about ten kernels (far more with e4m3 weights or KV), and the GPU waits for Python
between them. A graph replays the whole pass with one launch. A prompt of n positions runs
in the smallest bucket T >= n: its rows are copied into the bucket's input, the rows past n
are zeros, and every row is written to the KV rings (those past n write entries that
stepping writes again before any query reads them; `LM.temporal_prefill`). Buckets stop at
the KV window; a longer prompt, or several at once, runs eagerly as before.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..quant import FP8
from .capture import warm_and_capture

log = logging.getLogger("ppx.graphs")

# Prompt positions (voice frames + 12 + role-prompt tokens). A bucket past a prompt's length
# costs the padding rows' products; steps of 32 up to 512 keep that under a third.
PREFILL_BUCKETS = tuple(range(64, 513, 32)) + (640, 768, 1024)
# Uncached prompts opened together that replay a graph each rather than running one eager
# batched pass (each replay reads every weight once; the eager pass pays the host's launches).
# On an H200, four 136-position prompts took 32-37 ms either way with bf16 weights; with e4m3
# weights 75 ms as replays and 53 ms as one pass, so there only a prompt alone replays.
MAX_PROMPTS = 4
MAX_PROMPTS_FP8 = 1


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: the same body runs eagerly (no GPU)
    x: torch.Tensor      # [1, T, dim]
    slot: torch.Tensor   # [1]


class PrefillGraphs:
    def __init__(self, engine, buckets=PREFILL_BUCKETS):
        self.engine = engine
        self.buckets = sorted(b for b in buckets if b <= engine.lm_state.kv.window)
        fp8 = engine.lm.layers[0].attn_in.weight.dtype == FP8
        self.max_prompts = MAX_PROMPTS_FP8 if fp8 else MAX_PROMPTS
        self.graphs: dict[int, _Graph] = {}
        self.seconds = 0.0  # (the capture's)

    def capture(self) -> float:
        """Captures every bucket (largest first, sharing one memory pool of their own);
        returns seconds. Without a GPU it only sets up the buckets' buffers, and `run` runs
        the same padded pass eagerly."""
        eng = self.engine
        t0 = time.monotonic()
        cuda = eng.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if cuda else None
        stream = torch.cuda.Stream() if cuda else None
        dim = eng.cfg.lm.temporal.dim
        for T in sorted(self.buckets, reverse=True):
            x = torch.zeros(1, T, dim, device=eng.device, dtype=eng.dtype)
            slot = torch.full((1,), eng.lm_state.scratch, dtype=torch.long, device=eng.device)
            g = warm_and_capture(lambda: self._body(x, slot), pool, stream)[0] if cuda else None
            self.graphs[T] = _Graph(g, x, slot)
        if cuda:
            torch.cuda.synchronize()
        dt = self.seconds = time.monotonic() - t0
        if cuda and self.buckets:
            log.info("captured CUDA graphs of the prompt's prefill for %d lengths (%d..%d positions) in %.1f s",
                     len(self.buckets), self.buckets[0], self.buckets[-1], dt)
        return dt

    def _body(self, x: torch.Tensor, slot: torch.Tensor) -> None:
        eng = self.engine
        eng.lm.temporal_prefill(x, eng.lm_state.kv, slot, [x.shape[1]])

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def takes(self, lengths: list[int]) -> bool:
        """Whether these prompts, opened together, run as replays."""
        return len(lengths) <= self.max_prompts and all(self.bucket(n) is not None for n in lengths)

    def run(self, slot: int, rows: torch.Tensor) -> None:
        """Prefills one slot from its prompt's input rows [n, dim]."""
        n = rows.shape[0]
        g = self.graphs[self.bucket(n)]
        g.x[0, :n].copy_(rows)
        g.x[0, n:].zero_()
        g.slot.fill_(slot)
        if g.graph is not None:
            g.graph.replay()
        else:
            self._body(g.x, g.slot)
