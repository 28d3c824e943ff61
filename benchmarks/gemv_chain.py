"""Times the one-row products of a batch-1 tick as the tick chains them, in one CUDA graph:
the temporal transformer's 4 per layer (norm+qkv, out, norm+ffn_in, silu+ffn_out) over 32
layers of distinct random weights, and the depformer's over 8 steps x 6 layers, for each
one-row kernel configuration, with and without programmatic dependent launch, and cuBLAS
(with the separate norm and SiLU kernels) beside them. Prints ms and the GB/s of weights read.

    python -m benchmarks.gemv_chain [--quantize fp8]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from engine.config import LMConfig
from engine.kernels.rms_norm import add_rms_norm
from engine.kernels.silu_mul import silu_mul
from engine.kernels.common import _HAS_GDC, set_pdl
from engine.kernels.products import calibration as L
from engine.kernels.products.one_row import Prologue, PrologueKind, one_row
from engine.kernels.products.rows import rows_linear
from engine.quant import quantize_rows


# configurations tried here beside the calibrated set (BLOCK_N, BLOCK_K, warps, stages)
EXTRA = ((16, 128, 4, 3), (16, 512, 8, 3), (4, 2048, 4, 3), (8, 2048, 8, 3), (2, 4096, 4, 2))


def _layers(n, dim, hidden, fp8, dev):
    out = []
    for _ in range(n):
        ws = [torch.randn(o, i, device=dev, dtype=torch.bfloat16) * 0.02
              for o, i in ((3 * dim, dim), (dim, dim), (2 * hidden, dim), (dim, hidden))]
        out.append([quantize_rows(w) if fp8 else (w, None) for w in ws])
    return out


def _prod(x, w, s):
    return F.linear(x, w) if s is None else rows_linear(x, w, s, (32, 256, 4, 3))


def _chain(layers, dim, cfg, dev):
    alpha = torch.ones(dim, device=dev, dtype=torch.bfloat16)
    x0 = torch.randn(1, dim, device=dev, dtype=torch.bfloat16)

    def run():
        x, delta = x0, None
        for (wq, sq), (wo, so), (wi, si), (wf, sf) in layers:
            if cfg is None:
                x, h = add_rms_norm(x, delta, alpha, 1e-5) if delta is not None else (x, x)
                qkv = _prod(h, wq, sq)
                o = _prod(qkv[:, :dim].contiguous(), wo, so)
                x, h = add_rms_norm(x, o, alpha, 1e-5)
                delta = _prod(silu_mul(_prod(h, wi, si)), wf, sf)
            else:
                x, qkv = one_row(x, wq, sq, cfg, Prologue(PrologueKind.RMS_NORM, delta, alpha=alpha, eps=1e-5))
                o = one_row(qkv[:, :dim], wo, so, cfg)
                x, f = one_row(x, wi, si, cfg, Prologue(PrologueKind.RMS_NORM, o, alpha=alpha, eps=1e-5))
                delta = one_row(f, wf, sf, cfg, Prologue(PrologueKind.SILU))[1]
        return delta
    return run


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    del g
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", choices=["none", "fp8"], default="none")
    args = ap.parse_args()
    dev = torch.device("cuda")
    fp8 = args.quantize == "fp8"
    c = LMConfig()
    print(torch.cuda.get_device_name(), "fp8 weights" if fp8 else "bf16 weights", "| gdc:", _HAS_GDC)
    for name, n, dim, hidden in (("temporal 32 layers", c.temporal.num_layers, c.temporal.dim, c.temporal.hidden),
                                 ("depformer 8x6 layers", 8 * c.depformer.num_layers, c.depformer.dim,
                                  c.depformer.hidden)):
        layers = _layers(n, dim, hidden, fp8, dev)
        nbytes = sum(w.numel() * w.element_size() for layer in layers for w, _ in layer)
        rows = [("cublas + norm/silu kernels" if not fp8 else "rows kernel + norm/silu", None, False)]
        cfgs = [cfg for kind, cfg in L.CONFIGS if kind == "one_row"] + list(EXTRA)
        rows += [(f"gemv {cfg}", cfg, pdl) for cfg in cfgs for pdl in (False, True)]
        print(f"== {name}: {nbytes / 1e9:.2f} GB of weights")
        for label, cfg, pdl in rows:
            set_pdl(pdl)
            try:
                ms = _time(_chain(layers, dim, cfg, dev))
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  {label:32s} pdl={pdl!s:5s}  failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            print(f"  {label:32s} pdl={pdl!s:5s} {ms:8.3f} ms {nbytes / ms / 1e6:7.0f} GB/s")
        del layers
        torch.cuda.empty_cache()
    a = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
    b = torch.empty_like(a)
    ms = _time(lambda: b.copy_(a))
    print(f"copy 1 GiB: {ms:.3f} ms, {2 * a.numel() / ms / 1e6:.0f} GB/s (read + write)")


if __name__ == "__main__":
    main()
