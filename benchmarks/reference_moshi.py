"""The reference figure for `make bench`: Kyutai's `moshi` (0.2.13, the model code PersonaPlex
builds on) at PersonaPlex's configuration (16 depformer steps, context 3000), random bf16
weights, CUDA-graphed as its `LMGen` does by itself: median LM step per batch size, and one
Mimi encode and decode of a frame. Prints one JSON line."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def _median_ms(fn, n: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    import moshi
    from moshi.models import LMGen, loaders

    out = {"moshi": moshi.__version__, "lm_step_ms": {}}
    kw = dict(loaders._lm_kwargs)
    kw["dep_q"] = 16
    with torch.no_grad():
        lm = loaders.get_moshi_lm(None, lm_kwargs=kw, device="cuda", dtype=torch.bfloat16)
        for B in [int(b) for b in args.batches.split(",")]:
            gen = LMGen(lm, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
            gen.streaming_forever(B)
            codes = torch.randint(0, 2048, (B, 8, 1), device="cuda")
            out["lm_step_ms"][str(B)] = _median_ms(lambda g=gen: g.step(codes), args.steps)
            print(f"moshi LM step batch {B}: {out['lm_step_ms'][str(B)]:.2f} ms", file=sys.stderr, flush=True)
            # the model streams on its own (detached) beside the generator: stop both
            gen._stop_streaming()
            if getattr(lm, "_streaming_state", None) is not None:
                lm._stop_streaming()
            del gen
            torch.cuda.empty_cache()
        del lm
        torch.cuda.empty_cache()
        mimi = loaders.get_mimi(None, device="cuda")
        mimi.streaming_forever(1)
        frame = 0.1 * torch.randn(1, 1, 1920, device="cuda")
        codes = torch.randint(0, 2048, (1, 8, 1), device="cuda")
        out["mimi_encode_ms"] = _median_ms(lambda: mimi.encode(frame), args.steps)
        out["mimi_decode_ms"] = _median_ms(lambda: mimi.decode(codes), args.steps)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
