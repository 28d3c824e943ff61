"""CUDA graphs of a function over fixed buffers, one per bucket size (`capture.BucketGraphs`):
the engine captures its whole tick per batch bucket and its prompt's prefill per length bucket."""
from .capture import BucketGraphs, warm_and_capture  # noqa: F401
