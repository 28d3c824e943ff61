"""CUDA graphs of a function over fixed buffers, one graph per bucket size.

A caller gives `fn(*buffers)` and how to make a bucket's buffers; each bucket is warmed up
(compiling kernels and choosing them outside the capture) and captured, largest first, sharing
one memory pool. To run n items, the caller fills the smallest bucket b >= n's buffers (the
rows past n with whatever makes them harmless) and replays its graph; the outputs are the
tensors `fn` returned during the capture, rewritten by every replay. This module knows nothing
of what `fn` computes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..device import capturing


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
class Bucket:
    size: int
    buffers: tuple[torch.Tensor, ...]
    graph: torch.cuda.CUDAGraph | None   # None: no GPU, `replay` runs fn eagerly on the buffers
    outputs: object = None


class BucketGraphs:
    """One graph of `fn(*make_buffers(b))` per bucket size b."""

    def __init__(self, fn: Callable, make_buffers: Callable[[int], tuple[torch.Tensor, ...]], sizes: Sequence[int],
                 warmups: int = 1):
        self.fn = fn
        self.make_buffers = make_buffers
        self.sizes = sorted(set(sizes))
        self.warmups = warmups
        self.buckets: dict[int, Bucket] = {}
        self.seconds = 0.0  # the last capture's

    def capture(self, cuda: bool = True, progress: Callable[[int, int, int, float], None] | None = None) -> float:
        """Makes every bucket's buffers and captures its graph (without a GPU, only the
        buffers); returns seconds. progress(i, n, size, seconds so far) is called before the
        i-th of the n buckets (largest first)."""
        t0 = time.monotonic()
        pool = torch.cuda.graph_pool_handle() if cuda else None
        stream = torch.cuda.Stream() if cuda else None
        order = sorted(self.sizes, reverse=True)
        for i, b in enumerate(order):
            if progress is not None:
                progress(i, len(order), b, time.monotonic() - t0)
            bufs = tuple(self.make_buffers(b))
            if cuda:
                g, out = warm_and_capture(lambda: self.fn(*bufs), pool, stream, self.warmups)
                self.buckets[b] = Bucket(b, bufs, g, out)
            else:
                self.buckets[b] = Bucket(b, bufs, None)
        if cuda:
            torch.cuda.synchronize()
        self.seconds = time.monotonic() - t0
        return self.seconds

    def bucket(self, n: int) -> Bucket | None:
        """The smallest bucket that holds n items (None: none does)."""
        return next((self.buckets[b] for b in self.sizes if b >= n), None)

    def replay(self, bucket: Bucket):
        """Runs the bucket's graph over its buffers as the caller filled them; its outputs."""
        if bucket.graph is None:
            return self.fn(*bucket.buffers)
        bucket.graph.replay()
        return bucket.outputs
