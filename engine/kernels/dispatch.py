"""Chooses between the Triton kernels and their torch references."""
from __future__ import annotations

import os

import torch

_enabled = os.environ.get("PPX_TRITON", "1") not in ("0", "false", "no")


def use_triton(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def triton_enabled(t: torch.Tensor) -> bool:
    """Triton runs where the tensor lives on a GPU (or under TRITON_INTERPRET=1 in tests,
    which call the kernels directly)."""
    return _enabled and t.is_cuda
