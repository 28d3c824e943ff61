"""CUDA-graph capture of the whole per-frame step, one graph per batch bucket, and of the
prompt's prefill, one graph per prompt-length bucket."""
from .capture import DEFAULT_BUCKETS, TickGraphs, graphs_enabled  # noqa: F401
from .prefill import PREFILL_BUCKETS, PrefillGraphs  # noqa: F401
