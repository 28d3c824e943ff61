"""Where a tick's time goes: GPU kernel time per kernel and per stage of the 7B tick (random
weights), from the torch profiler over eager ticks, beside the graph replay time."""
from __future__ import annotations

import argparse
import collections
import re
import sys

import torch

from benchmarks.bench import PROMPT_100, TOKENIZER, time_ticks


def _kind(name: str) -> str:
    n = name.lower()
    for pat, kind in ((r"gemv|gemm|cutlass|sm90_xmma|ampere|nvjet|cublas", "matmul"), (r"conv|cudnn|implicit", "conv"),
                      (r"_attn_|flash|fmha|attention|sdpa", "attention"), (r"_sample|sort|topk", "sampling"),
                      (r"_add_rms|_rms", "rmsnorm"), (r"_qkv_rope", "rope+kv"), (r"_silu", "silu"),
                      (r"_elu|elu", "elu"), (r"index|gather|scatter", "index"), (r"layer_norm", "layernorm"),
                      (r"copy|cat|stack", "copy"), (r"elementwise|vectorized|reduce", "elementwise")):
        if re.search(pat, n):
            return kind
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ticks", type=int, default=10)
    args = ap.parse_args()
    from engine.config import PERSONAPLEX_7B
    from engine.random_weights import random_engine, random_voice

    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("ppx.kernels").setLevel(logging.DEBUG)  # the linear calibration's timings
    B = args.batch
    eng = random_engine(PERSONAPLEX_7B, TOKENIZER, device="cuda", dtype=torch.bfloat16, seed=0, max_slots=B,
                        kv_window=512)
    slots = eng.open_many([(random_voice(eng.cfg.lm, seed=i), PROMPT_100, None) for i in range(B)])
    idx = torch.tensor(slots, device="cuda")
    pcm = 0.1 * torch.randn(B, 1920, device="cuda")
    for _ in range(3):
        eng.tick(idx, pcm)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.ticks):
            eng.tick(idx, pcm)
        torch.cuda.synchronize()
    per_kernel = collections.Counter()
    count = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            count[e.name] += 1
    total = sum(per_kernel.values()) / args.ticks / 1e3
    kinds = collections.Counter()
    for k, v in per_kernel.items():
        kinds[_kind(k)] += v
    print(f"batch {B}: GPU kernel time per tick {total:.2f} ms, {sum(count.values()) // args.ticks} kernels per tick")
    for k, v in kinds.most_common():
        print(f"  {k:12s} {v / args.ticks / 1e3:7.3f} ms")
    print("top kernels (ms per tick, launches per tick):")
    for k, v in per_kernel.most_common(25):
        print(f"  {v / args.ticks / 1e3:7.3f}  {count[k] // args.ticks:5d}  {k[:110]}")
    eng.enable_graphs(buckets=(B,))
    ms = time_ticks(eng, slots, 50)
    ms.sort()
    print(f"graph replay: median {ms[len(ms) // 2]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
