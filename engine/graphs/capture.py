"""One CUDA graph per batch bucket, capturing the whole tick (Mimi encode, temporal
transformer, depformer, sampling, Mimi decode) over fixed input and output buffers.

A batch of n live slots runs in the smallest bucket b >= n; rows n..b-1 point at the scratch
slot, so they change no session. The graphs replay exactly the code the eager path runs
(`Engine.tick`), captured after a warm-up that compiles every kernel. Set PPX_CUDA_GRAPHS=0
(or pass `--no-cuda-graphs`) to run eagerly.
"""
from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..kernels.dispatch import env_flag

log = logging.getLogger("ppx.graphs")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def graphs_enabled(flag: bool | None = None) -> bool:
    if flag is not None:
        return flag
    return env_flag("PPX_CUDA_GRAPHS")


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool=None, collect: bool = True):
    """`torch.cuda.graph` with Python's garbage collector held off. A collection that runs
    inside a capture may free what an unreachable cycle held (a dropped engine's graphs, its
    memory), which CUDA forbids while a stream captures: the capture fails ("operation not
    permitted when stream is capturing"). torch no longer collects before a capture by
    default; with `collect`, this does, so that what dead cycles hold is free for the graph."""
    enabled = gc.isenabled()
    if collect:
        gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        if enabled:
            gc.enable()


def warm_and_capture(fn, pool, stream: torch.cuda.Stream, warmups: int = 1):
    """(graph, fn's outputs): fn run `warmups` times on `stream` (compiling and picking kernels
    outside the capture), then captured into a new graph sharing `pool`."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with capturing(g, pool), torch.no_grad():
        out = fn()
    return g, out


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    slots: torch.Tensor
    pcm: torch.Tensor
    outputs: tuple[torch.Tensor, ...]


class TickGraphs:
    def __init__(self, engine, buckets=DEFAULT_BUCKETS):
        self.engine = engine
        cap = engine.max_slots
        self.buckets = sorted({b for b in buckets if b < cap} | {cap})
        self.graphs: dict[int, _Graph] = {}

    def capture(self) -> float:
        """Captures every bucket (largest first, sharing one memory pool); returns seconds."""
        from ..kernels import calibration

        eng = self.engine
        t0 = time.monotonic()
        cal0 = calibration()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in sorted(self.buckets, reverse=True):
            slots = torch.full((b,), eng.lm_state.scratch, dtype=torch.long, device=eng.device)
            pcm = torch.zeros(b, eng.frame_size, device=eng.device)
            g, outputs = warm_and_capture(lambda: eng.tick(slots, pcm), pool, stream, warmups=2)
            self.graphs[b] = _Graph(g, slots, pcm, outputs)
        torch.cuda.synchronize()
        dt = time.monotonic() - t0
        cal = calibration()
        log.info("captured CUDA graphs for batch buckets %s in %.1f s (of which %.1f s timing the kernels for %d "
                 "products and %d with a prologue, their compilation included; %d choices read from disk)",
                 self.buckets, dt, cal["seconds"] - cal0["seconds"], cal["products"] - cal0["products"],
                 cal["fused"] - cal0["fused"], cal["from_cache"] - cal0["from_cache"])
        return dt

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} slots exceed the largest bucket {self.buckets[-1]}")

    def run(self, slots: torch.Tensor, pcm: torch.Tensor):
        n = slots.shape[0]
        g = self.graphs[self.bucket(n)]
        g.slots[:n].copy_(slots)
        g.slots[n:].fill_(self.engine.lm_state.scratch)
        g.pcm[:n].copy_(pcm)
        g.graph.replay()
        return tuple(o[:n] for o in g.outputs)
