"""The calibration's choices kept on disk (`calibration.kernel_for`, `calibration.fused_for`), so that a
restart on the same GPU with the same torch, triton and kernels takes them instead of timing
every product shape again. Each choice only picks among correct kernels, so a choice read
from here can cost speed, never correctness; entries are keyed by the GPU, the software
versions and a digest of the kernels' source, and anything unreadable is ignored.

Where: `switches.KERNEL_CACHE` (PPX_KERNEL_CACHE; default $XDG_CACHE_HOME/ppx or ~/.cache/ppx),
or nowhere when it is 0: every shape is then timed afresh.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ... import switches

log = logging.getLogger("ppx.kernels")

FILE = "linear-choices.json"


def cache_file() -> Path | None:
    """Where the choices are kept, or None when the cache is off."""
    d = switches.KERNEL_CACHE
    return None if d is None else d / FILE


def sources_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def context(device: torch.device, digest: str) -> str:
    """What a choice was timed on: the GPU, torch, triton and the kernels' source."""
    import triton

    props = torch.cuda.get_device_properties(device)
    return f"{props.name} sm_{props.major}{props.minor} torch {torch.__version__} triton {triton.__version__} " \
           f"kernels {digest}"


def _encode(key: tuple) -> str:
    return json.dumps([f"dtype:{str(e).removeprefix('torch.')}" if isinstance(e, torch.dtype) else e for e in key])


def _decode(text: str) -> tuple:
    out = []
    for e in json.loads(text):
        if isinstance(e, str) and e.startswith("dtype:"):
            e = getattr(torch, e[6:])
            if not isinstance(e, torch.dtype):
                raise ValueError(text)
        elif not isinstance(e, (int, str, bool)):
            raise ValueError(text)
        out.append(e)
    return tuple(out)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the kernel choices in %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def load(path: Path, ctx: str, tables: dict[str, dict], n_configs: int) -> int:
    """Fills each table ({name: {key: choice}}) with the entries kept for `ctx` that it lacks
    (a choice is -1 or an index below n_configs); returns how many it took."""
    entry = _read(path).get(ctx)
    if not isinstance(entry, dict):
        return 0
    n = 0
    for name, table in tables.items():
        kept = entry.get(name)
        for text, choice in (kept.items() if isinstance(kept, dict) else ()):
            try:
                key = _decode(text)
            except (ValueError, TypeError, AttributeError):
                continue
            if type(choice) is int and -1 <= choice < n_configs and key not in table:
                table[key] = choice
                n += 1
    return n


def save(path: Path, ctx: str, tables: dict[str, dict]) -> bool:
    """Writes the tables as `ctx`'s entry, keeping other contexts' entries; False (and a
    warning) when the file cannot be written."""
    data = _read(path)
    data[ctx] = {name: {_encode(k): v for k, v in table.items()} for name, table in tables.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot keep the kernel choices in %s (%s); set PPX_KERNEL_CACHE to a writable folder, or to 0",
                    path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True
