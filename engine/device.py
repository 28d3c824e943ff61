"""The GPU: checks that it and the installed torch and triton can run the engine (saying what to
install when they cannot, instead of failing inside a kernel), and the safe way to capture a
CUDA graph on it."""
from __future__ import annotations

import gc
from contextlib import contextmanager

import torch

from .errors import UserError

CUDA13_INSTALL = "pip install --upgrade --force-reinstall torch triton --index-url https://download.pytorch.org/whl/cu130"


def check_device(device: torch.device) -> None:
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UserError("a CUDA device was asked for but no CUDA GPU is visible; pass --device cpu")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    name = torch.cuda.get_device_name(idx)
    arch = f"sm_{major}{minor}"
    archs = torch.cuda.get_arch_list()
    if major >= 10 and arch not in archs and f"compute_{major}{minor}" not in archs:
        raise UserError(
            f"this torch ({torch.__version__}) has no kernels for the {name} ({arch}; it was built for "
            f"{', '.join(archs) or 'no GPU'}): install the CUDA 13.0 build with: {CUDA13_INSTALL}")
    if major < 8:
        raise UserError(f"the {name} ({arch}) is too old: the engine needs bfloat16 (compute capability 8.0+)")


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool=None, collect: bool = True, thread_local: bool = False):
    """`torch.cuda.graph` with Python's garbage collector held off. A collection that runs
    inside a capture may free what an unreachable cycle held (a dropped engine's graphs, its
    memory), which CUDA forbids while a stream captures: the capture fails ("operation not
    permitted when stream is capturing"). torch no longer collects before a capture by
    default; with `collect`, this does, so that what dead cycles hold is free for the graph.
    thread_local: only this thread's CUDA calls are checked against the capture, so another
    thread (one encoding a voice, say) may use the GPU meanwhile on its own stream."""
    enabled = gc.isenabled()
    if collect:
        gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local" if thread_local else "global"):
            yield
    finally:
        if enabled:
            gc.enable()
