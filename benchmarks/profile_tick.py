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


def _kernel_times(prof) -> tuple[collections.Counter, collections.Counter]:
    """GPU microseconds and launches per kernel name in a profile."""
    times, counts = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            counts[e.name] += 1
    return times, counts


def _graph_ms(fn, reps: int = 50) -> float:
    """Median ms of one CUDA-graph replay of fn (run twice eagerly first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return sorted(ms)[len(ms) // 2]


def _kernels(fn) -> tuple[collections.Counter, collections.Counter]:
    """GPU microseconds and launches per kernel name of one eager call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return _kernel_times(prof)


def profile_stages(eng, idx: torch.Tensor, pcm: torch.Tensor, top: int = 0) -> None:
    """Each stage of the tick captured alone as a graph: replay ms and kernels launched (and
    the stage's `top` kernels by eager GPU time)."""
    from engine.tick import lm_tick

    cfg = eng.cfg.lm
    B = idx.shape[0]
    lm, st = eng.lm, eng.lm_state
    codes = torch.zeros(B, cfg.agent_codebooks, dtype=torch.long, device=idx.device)
    x = torch.zeros(B, cfg.temporal.dim, dtype=lm.dtype, device=idx.device)
    off = st.offset[idx]
    h = lm.temporal_decode(x, st.kv, idx, off - 1)
    stages = {
        "mimi encode": lambda: eng.mimi.encode(pcm, eng.mimi_state, idx),
        "mimi decode": lambda: eng.mimi.decode(codes, eng.mimi_state, idx),
        "lm step (temporal + depformer + sampling)": lambda: lm_tick(lm, st, idx, None, None, eng.depformer_steps,
                                                                     return_logits=True),
        "temporal transformer": lambda: lm.temporal_decode(x, st.kv, idx, off - 1),
        "text head": lambda: lm.text_logits(h),
        "depformer inputs": lambda: lm.depformer_inputs(h, eng.depformer_steps),
    }
    dep_kv = lm.depformer_cache(B, eng.depformer_steps, idx.device)
    dep_in = lm.depformer_inputs(h, eng.depformer_steps)
    prev = torch.zeros(B, dtype=torch.long, device=idx.device)
    stages["depformer steps (no sampling)"] = lambda: [lm.depformer_step(k, dep_in[:, k], prev, dep_kv)
                                                      for k in range(eng.depformer_steps)]
    for name, fn in stages.items():
        times, counts = _kernels(fn)
        print(f"stage {name:45s} {_graph_ms(fn):7.3f} ms  {sum(counts.values()):5d} kernels", flush=True)
        for k, v in times.most_common(top):
            print(f"    {v / 1e3:7.3f}  {counts[k]:5d}  {k[:100]}")


def profile_prefill(eng) -> None:
    """Host ops and GPU kernels of one uncached prompt phase (a new voice each run)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from engine.random_weights import random_voice

    for i in range(2):  # warm: allocator, Triton compilation
        eng.close(eng.open(random_voice(eng.cfg.lm, seed=500 + i), PROMPT_100))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.close(eng.open(random_voice(eng.cfg.lm, seed=600), PROMPT_100))
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eng.close(eng.open(random_voice(eng.cfg.lm, seed=601), PROMPT_100))
        torch.cuda.synchronize()
    gpu, n = _kernel_times(prof)
    print(f"prefill: wall {wall:.1f} ms, GPU kernel time {sum(gpu.values()) / 1e3:.2f} ms, "
          f"{sum(n.values())} kernels")
    for k, v in gpu.most_common(15):
        print(f"  {v / 1e3:7.3f}  {n[k]:5d}  {k[:110]}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ticks", type=int, default=10)
    ap.add_argument("--stages", action="store_true", help="time each stage of the tick as its own graph")
    ap.add_argument("--quantize", choices=["none", "fp8"], default="none", help="fp8: e4m3 weights")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="fp8: e4m3 KV cache")
    ap.add_argument("--stage-top", type=int, default=0, metavar="N",
                    help="with --stages, each stage's N largest kernels (eager GPU ms, launches)")
    ap.add_argument("--prefill", action="store_true", help="also profile an uncached prompt phase (host and GPU)")
    args = ap.parse_args()
    from engine.config import PERSONAPLEX_7B
    from engine.engine import Engine
    from engine.random_weights import random_voice

    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("ppx.kernels").setLevel(logging.DEBUG)  # the linear calibration's timings
    B = args.batch
    eng = Engine.load(config=PERSONAPLEX_7B, tokenizer=TOKENIZER, random_weights=True, cuda_graphs=False,
                      device="cuda", dtype=torch.bfloat16, seed=0, max_slots=B + 1, kv_window=512,
                      quantize=None if args.quantize == "none" else args.quantize,
                      kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype)
    slots = eng.open_many([(random_voice(eng.cfg.lm, seed=i), PROMPT_100, None) for i in range(B)])
    for s in slots:   # (Engine.tick takes no KV pages itself)
        eng.reserve_kv(s, eng.lm_state.kv.window)
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
    per_kernel, count = _kernel_times(prof)
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
    if args.stages:
        profile_stages(eng, idx, pcm, args.stage_top)
    if args.prefill:
        profile_prefill(eng)
    eng.enable_graphs(buckets=(B,))
    ms = time_ticks(eng, slots, 50)
    ms.sort()
    print(f"graph replay: median {ms[len(ms) // 2]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
