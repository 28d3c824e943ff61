"""Chooses between the Triton kernels and their torch references."""
from __future__ import annotations

import os

import torch


def env_flag(name: str) -> bool:
    """A switch that is on unless the environment sets it to 0, false or no."""
    return os.environ.get(name, "1") not in ("0", "false", "no")


_enabled = env_flag("PPX_TRITON")


def use_triton(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


# Tests may run the whole engine through the Triton interpreter on the CPU.
_on_cpu = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PPX_TRITON_ON_CPU") == "1"


def triton_enabled(t: torch.Tensor) -> bool:
    """Triton runs where the tensor lives on a GPU (on the CPU only under the interpreter,
    when PPX_TRITON_ON_CPU=1 asks for it)."""
    return _enabled and (t.is_cuda or _on_cpu)
