"""What every kernel file shares: whether an op runs its Triton kernel or its torch reference,
programmatic dependent launch, and the small helpers launchers use.

An op runs its Triton kernel where its tensors live on a GPU (`PPX_TRITON` on); on the CPU only
under the Triton interpreter when asked (`PPX_TRITON_ON_CPU=1` with `TRITON_INTERPRET=1`, or
`triton_on_cpu(True)`), which is how the tests run the kernels without a GPU. Nothing here
synchronises with the host, so every launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import switches

try:  # grid dependency control (programmatic dependent launch), Hopper and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # an older triton: the kernels launch the plain way
    _HAS_GDC = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass

_state = {"triton": switches.TRITON, "on_cpu": switches.TRITON_ON_CPU, "pdl": switches.PDL}


def use_triton(on: bool) -> None:
    """Triton kernels on (the default) or every op on its torch reference."""
    _state["triton"] = bool(on)


def triton_on_cpu(on: bool) -> None:
    """Whether ops on CPU tensors run their Triton kernels (needs TRITON_INTERPRET=1)."""
    _state["on_cpu"] = bool(on)


def triton_enabled(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs its Triton kernel."""
    return _state["triton"] and (t.is_cuda or _state["on_cpu"])


def set_pdl(on: bool) -> None:
    _state["pdl"] = bool(on)


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether the tick's kernels launch as programmatic dependents of the kernel before them
    (while a CUDA graph is captured, on Hopper and later; PPX_PDL=0 turns it off): a kernel is
    then scheduled while the previous one finishes and waits for it (`gdc_wait`) before it
    reads anything that one may write, so the launch gap is hidden and a product starts
    streaming its weights early. Every kernel launched this way waits before it ends, which
    keeps the stream's order transitive. Eager launches (a prefill) are host-bound and gain
    nothing from it."""
    return (_state["pdl"] and _HAS_GDC and t.is_cuda and torch.cuda.is_current_stream_capturing()
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A programmatic dependent's first step: wait for the kernel before (its writes visible),
    then let the next kernel be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_kw(t: torch.Tensor) -> dict:
    """A launch's PDL arguments: the kernel's constexpr and, when on, the launch option."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(t) else {"PDL": False}


def pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


def rows2d(t: torch.Tensor) -> torch.Tensor:
    """t as rows of its last dimension, which must be contiguous."""
    assert t.stride(-1) == 1, "last dim must be contiguous"
    return t.reshape(-1, t.shape[-1])


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (8 for the CPU, so the interpreter runs few programs)."""
    idx = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else -1
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count if device.type == "cuda" else 8
    return _SM_COUNT[idx]


def row_blocks(C: int, L: int, t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_T) for kernels that each own BLOCK_C whole rows of length L (the
    interpreter on the CPU: few programs of large blocks, which it runs faster)."""
    bt = min(pow2(L), 1024)
    return min(pow2(C), max(1, (2048 if t.is_cuda else 1 << 16) // bt)), bt
