"""FP8 (e4m3) weights and KV cache.

Weights: each output channel (row of W) gets a float32 scale s = max|row| / 448, and stores
round(row / s) in e4m3; the product is y = (x . W8^T) * s with float32 accumulation. The
temporal transformer's and the depformer's linears (and the two heads) are quantized;
embeddings and norms stay in the activation dtype. Quantization happens as each checkpoint
tensor is loaded, so the bf16 model never exists whole on the device.

KV cache: each key and value vector (one head at one position) gets its own scale, the same
way; attention reads k = k8 * s.
"""
from __future__ import annotations

import torch

from .errors import UserError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] -> (w8 [..., K] e4m3, scale [...] float32) with w ~= w8 * scale."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX
    return (wf / scale.unsqueeze(-1)).to(FP8), scale


def dequantize_rows(w8: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (w8.float() * scale.float().unsqueeze(-1)).to(dtype)


def check_fp8_device(device: torch.device) -> None:
    """FP8 runs on the CPU (slowly, for tests) and on GPUs with FP8 (compute capability 8.9+)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"FP8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                        f"the {torch.cuda.get_device_name(device)} is {major}.{minor}: drop --quantize / "
                        f"--kv-cache-dtype fp8")
