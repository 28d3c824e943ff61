"""Compute kernels of the per-frame step.

Each op has a torch reference (`*_ref`, the definition of what the op computes) and, where it
pays on a GPU, a Triton kernel in `triton_ops`. The model calls the dispatching name (`rms_norm`,
`qkv_rope_write`, ...), which takes the kernel for CUDA tensors; `use_triton(False)` or
`PPX_TRITON=0` forces the references.
"""
from .dispatch import triton_enabled, use_triton  # noqa: F401
from .rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: F401
from .layer_norm import scale_add_layer_norm, scale_add_layer_norm_ref  # noqa: F401
from .rope import qkv_rope_write, qkv_rope_write_ref, rope_qkv, rope_ref  # noqa: F401
from .attention import (causal_suffices, decode_attention, decode_attention_ref, prefill_attention_ref,  # noqa: F401
                        prefill_mask, ring_chunk_attention, ring_chunk_attention_ref, step_attention, step_attention_ref)
from .linear import (add_linear, attention_linear, calibration, embedding_ref, gelu_linear, linear,  # noqa: F401
                     linear_choices, linear_fp8, linear_fp8_ref, linear_ref, norm_linear, product, silu_linear)
from .activations import elu, elu_ref, silu_mul, silu_mul_ref  # noqa: F401
from .sampling import sample_tokens, sample_tokens_ref, uniform_noise  # noqa: F401
