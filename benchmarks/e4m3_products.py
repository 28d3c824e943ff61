"""How fast the products over e4m3 weights stream them, per kernel and per way of decoding the
e4m3 values: at the 7B's shapes and 1, 2, 8 and 64 rows, the one-row kernel (`one_row`, the
compiler's conversion; its columns in runs of 8, as the engine runs it, or as the compiler finds
them) and the small-batch kernel (`rows_linear`, tl.dot) with the compiler's conversion or the
bit moves the engine uses (`e4m3.fast_e4m3`), over every block shape the calibration may pick
(`calibration.CONFIGS`). Weights are cycled past the L2 cache and each call is timed as a
CUDA-graph replay, as the calibration times them. --prefill: a prompt's rows instead (136, the
usual prompt, and 544, four of them), at the temporal transformer's shapes, each block shape
the prefill's calibration may pick.

    python -m benchmarks.e4m3_products [--quick | --one-row | --prefill] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from engine.kernels.products import calibration as L
from engine.kernels.products.one_row import one_row
from engine.kernels.products.rows import rows_linear
from engine.quant import quantize_rows

SHAPES = [(12288, 4096), (22528, 4096), (4096, 11264), (4096, 4096), (32000, 4096), (3072, 1024)]
ROWS = [1, 2, 8, 64]


def _us(fn, w, s) -> float:
    ws, ss, calls = L._cold_copies(w, s)
    n = len(ws)
    return L._time(lambda j: fn(ws[j % n], ss[j % n]), calls) * 1e3


def _run(choice, x, w, s, fast: bool, vec8: bool):
    """The calibration's `run_kernel`, with the decoding chosen: bit moves or the compiler's
    conversion in tl.dot (fast), the one-row kernel's columns in runs of 8 or not (vec8)."""
    kind, cfg = choice
    if kind == "one_row":
        return one_row(x, w, s, cfg, vec=8 if vec8 else 0)
    if kind == "prefill_e4m3":
        return rows_linear(x, w, s, cfg[:4], block_m=cfg[4], m_fast=True, fast_e4m3=fast)
    return rows_linear(x, w, s, cfg[:4], fma=kind == "few_rows", splits=cfg[4] if len(cfg) > 4 else 1, fast_e4m3=fast)


def _times(x, w8, s8, kinds=None, fast: bool = True, vec8: bool = True) -> dict[str, float]:
    """us per product of each block shape the calibration may pick for x's rows (of `kinds`)."""
    out = {}
    for i in L._candidates(x.shape[0], True):
        kind, cfg = L.CONFIGS[i]
        if kinds is not None and kind not in kinds:
            continue
        try:
            out[f"{kind} {cfg}"] = _us(lambda a, b: _run(L.CONFIGS[i], x, a, b, fast, vec8), w8, s8)
        except L._Unrunnable:
            continue
    return out


def _best(x, w8, s8, kinds, fast: bool, vec8: bool) -> tuple[float, str]:
    return min(((us, name) for name, us in _times(x, w8, s8, kinds, fast, vec8).items()), default=(float("inf"), ""))


def _prefill(dev) -> list[dict]:
    out = []
    for N, Kd in SHAPES[:4]:
        w8, s8 = quantize_rows(torch.randn(N, Kd, device=dev) / Kd ** 0.5)
        for M in (136, 544):
            x = torch.randn(M, Kd, device=dev, dtype=torch.bfloat16)
            row = {"shape": [M, N, Kd]}
            for name, us in _times(x, w8, s8).items():
                row[name] = {"us": round(us, 1), "tflops": round(2 * M * N * Kd / us / 1e6, 1)}
            out.append(row)
            print(f"{M:3d} x {N:5d} x {Kd:5d}: " + "; ".join(
                f"{k} {v['us']:.1f} us {v['tflops']:.0f} TFLOP/s" for k, v in row.items() if k != "shape"), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three shapes, 1 and 2 rows")
    ap.add_argument("--one-row", action="store_true", help="every shape, one row, the one-row kernel only")
    ap.add_argument("--prefill", action="store_true", help="a prompt's rows, each prefill block shape")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(0)}: " + ("us per product per block shape, and TFLOP/s" if args.prefill else
                                                     "best us per product over the block shapes, and TB/s of W read"))
    out = _prefill(dev) if args.prefill else []
    for N, Kd in [] if args.prefill else SHAPES[:3] if args.quick else SHAPES:
        w8, s8 = quantize_rows(torch.randn(N, Kd, device=dev) / Kd ** 0.5)
        for M in ([1] if args.one_row else ROWS[:2] if args.quick else ROWS):
            x = torch.randn(M, Kd, device=dev, dtype=torch.bfloat16)
            row = {"shape": [M, N, Kd]}
            modes = [("gemv or few, cvt", False, False, ("one_row", "few_rows")),
                     ("gemv or few, cvt, runs of 8", False, True, ("one_row", "few_rows")),
                     ("tl.dot, cvt", False, True, ("rows", "rows_e4m3")), ("tl.dot, bits", True, True, ("rows", "rows_e4m3"))]
            for name, fast, vec8, kinds in modes[:2] if args.one_row else modes:
                us, cfg = _best(x, w8, s8, kinds, fast, vec8)
                if cfg:
                    row[name] = {"us": round(us, 2), "tbs": round(w8.numel() / us / 1e6, 3), "config": cfg}
            out.append(row)
            print(f"{M:3d} x {N:5d} x {Kd:5d}: " + "; ".join(
                f"{k} {v['us']:7.2f} us {v['tbs']:4.2f} TB/s ({v['config']})" for k, v in row.items() if k != "shape"),
                flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
