"""The PersonaPlex inference engine: model configs, checkpoint loading, the batched per-frame
step (`engine.engine.Engine`), its Triton kernels and CUDA graphs."""
