"""Checks that the GPU and the installed torch and triton can run the engine, and says what to
install when they cannot, instead of failing inside a kernel."""
from __future__ import annotations

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
