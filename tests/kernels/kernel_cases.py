"""What the kernel tests share: tolerances against a float64 reference, inputs on the test
device, and the half-precision dtype each device runs.

Tolerances, as relative L2 error against the reference computed in float64 where the op is
continuous: float32 1e-5, half precision within 2x of the torch half-precision reference's own
error (plus 1e-3)."""
from __future__ import annotations

import torch

from conftest import CUDA, DEVICE, gpu

# Half precision: bfloat16 on a GPU; float16 under the interpreter, which rounds to bfloat16 by
# truncation and whose tl.dot mishandles it.
HALF = torch.bfloat16 if CUDA else torch.float16
# float32 everywhere; bfloat16 on a GPU
DTYPES = [torch.float32, gpu(torch.bfloat16)]


def rel(a, ref) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check(out, ref_lowp, ref64, dtype) -> None:
    if dtype == torch.float32:
        assert rel(out, ref64) < 1e-5
    else:
        assert rel(out, ref64) <= 2 * rel(ref_lowp, ref64) + 1e-3


def randn(*shape, dtype, g, device=DEVICE):
    return torch.randn(*shape, generator=g).to(device, dtype)


__all__ = ["CUDA", "DEVICE", "DTYPES", "HALF", "check", "gpu", "randn", "rel"]


def to_pages(rings, P: int, g):
    """Rings [S, H, W, ...] as a page pool [1 + S * n, H, P, ...] (page 0 the scratch page) with
    the pages of each slot scattered at random, and their table [S, n] (n = ceil(W / P))."""
    S, H, W = rings.shape[:3]
    n = -(-W // P)
    table = (torch.randperm(S * n, generator=g) + 1).view(S, n).to(rings.device)
    pool = torch.zeros((1 + S * n, H, P) + rings.shape[3:], dtype=rings.dtype, device=rings.device)
    padded = torch.zeros((S, H, n * P) + rings.shape[3:], dtype=rings.dtype, device=rings.device)
    padded[:, :, :W] = rings
    pool[table.flatten()] = padded.unflatten(2, (n, P)).transpose(1, 2).flatten(0, 1)
    return pool, table


def from_pages(pool, table, W: int):
    """`to_pages` undone: rings [S, H, W, ...]."""
    return pool[table].transpose(1, 2).flatten(2, 3)[:, :, :W]
