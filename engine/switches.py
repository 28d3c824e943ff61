"""Every environment switch of ppx, read once, here, when this module is first imported.

| switch | default | what it does |
| --- | --- | --- |
| `PPX_TRITON` | on | the Triton kernels on a GPU; off: every op runs its torch reference |
| `PPX_PDL` | on | the tick's kernels launch as programmatic dependents inside CUDA graphs (Hopper and later) |
| `PPX_CUDA_GRAPHS` | on | the tick and the prefill are captured as CUDA graphs; off: they run eagerly (`--no-cuda-graphs`) |
| `PPX_KERNEL_CACHE` | `$XDG_CACHE_HOME/ppx` or `~/.cache/ppx` | where the product kernels' timed choices are kept; `0`: time every shape afresh and keep nothing |
| `PPX_CACHE` | `$XDG_CACHE_HOME/ppx` or `~/.cache/ppx` | where ppx keeps what it makes once: the demo model, encoded voice recordings |
| `PPX_TRITON_ON_CPU` | off | with `TRITON_INTERPRET=1`, the Triton kernels run on the CPU through the interpreter (tests) |
| `PPX_API_KEY` | none | `ppx-serve`'s API key when `--api-key` is not given |
| `PPX_WS_COMPRESSION` | none | `deflate`: `ppx-serve` offers permessage-deflate (Opus does not compress; off saves CPU) |

An on/off switch is off when set to `0`, `false`, `no` or `off`.
"""
from __future__ import annotations

import os
from pathlib import Path

_OFF = ("0", "false", "no", "off")


def _flag(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in _OFF


def _cache_base() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ppx"


def _kernel_cache() -> Path | None:
    v = os.environ.get("PPX_KERNEL_CACHE")
    if v is not None and v.strip().lower() in ("", *_OFF):
        return None
    return Path(v).expanduser() if v else _cache_base()


TRITON: bool = _flag("PPX_TRITON")
PDL: bool = _flag("PPX_PDL")
CUDA_GRAPHS: bool = _flag("PPX_CUDA_GRAPHS")
KERNEL_CACHE: Path | None = _kernel_cache()
CACHE: Path = Path(os.environ["PPX_CACHE"]).expanduser() if os.environ.get("PPX_CACHE") else _cache_base()
TRITON_ON_CPU: bool = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PPX_TRITON_ON_CPU") == "1"
API_KEY: str | None = os.environ.get("PPX_API_KEY") or None
WS_COMPRESSION: str | None = "deflate" if os.environ.get("PPX_WS_COMPRESSION") == "deflate" else None
