"""CUDA-graph capture of the whole per-frame step, one graph per batch bucket."""
from .capture import DEFAULT_BUCKETS, TickGraphs, graphs_enabled  # noqa: F401
