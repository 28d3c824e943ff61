"""`make bench`: the per-frame tick of the 7B on random weights of the real shapes, on a GPU.

Reports, per batch size and context: tick latency (median, p99 over CUDA-event timings of graph
replays), the bytes a tick must move (every weight it uses once, plus the KV entries it reads),
the GB/s that makes, the bandwidth floor (those bytes over the device-to-device copy bandwidth
measured in the same run) and the ratio floor / median; the prompt phase uncached and cached;
GPU memory per session; and Kyutai's `moshi` (the reference's model code) at the same
configuration when it is importable. Writes `<out>/<card>.json` and a PNG plot; never fails on time.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "golden" / "tiny-1234" / "tokenizer.model"
# 100 tokens with the system tags, with the test tokenizer the random-weight runs use
PROMPT_100 = ("You work for Brightline Appliances, an appliance repair company, and your name is Dana Ortiz. "
              "Visits cost sixty an hour.")


def card_slug() -> str:
    name = torch.cuda.get_device_name().replace("NVIDIA ", "")
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def copy_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / float(np.median(times))


def weight_bytes(engine) -> dict[str, int]:
    """Bytes of the weights one tick reads: the temporal transformer and text head, the
    depformer steps it runs, Mimi."""
    lm, steps = engine.lm, engine.depformer_steps
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    temporal = sum(nb(p) for p in lm.layers.parameters()) + nb(lm.out_norm) + nb(lm.text_head.weight)
    dep = lm.depformer
    S = dep.inp.weight.shape[0]
    per_step = sum(nb(p) for n, p in dep.named_parameters() if p.dim() == 3 and p.shape[0] == S) // S
    dep_bytes = steps * per_step + sum(nb(layer.norm1) + nb(layer.norm2) for layer in dep.layers)
    mimi = sum(nb(p) for p in engine.mimi.parameters())
    return {"temporal": temporal, "depformer": dep_bytes, "mimi": mimi}


def kv_read_bytes(engine, positions: int) -> int:
    kv = engine.lm_state.kv
    return kv.bytes_per_slot() * min(positions, kv.window) // kv.window


def prepare_slots(engine, B: int, voice, context: str = "short") -> tuple[list[int], int]:
    """B slots opened with the bench prompt; context "minute" or "full": their KV filled with
    finite values and their position moved a minute (750 frames) or ten windows on. Returns
    the slots and how many of them hold KV pages of their own."""
    from engine.sampling import SamplingParams

    prompt = (None, None) if engine.cfg.moshi else (voice, PROMPT_100)
    slots = []
    for i in range(0, B, 8):   # (eight prompts a pass: a pass over 256 would need tens of GB of activations)
        slots += engine.open_many([(*prompt, SamplingParams(seed=j)) for j in range(i, min(B, i + 8))])
    st = engine.lm_state
    kv = st.kv
    # (step_tensors takes no KV pages itself: each slot gets its whole window's now, as many
    # as the pool holds; past that, slots read the pages of earlier ones, each as its own, so
    # a tick still reads every slot's window from memory: see `distinct_windows`)
    owners = [s for s in slots if kv.reserve(s, kv.window)]
    kv.flush()
    if not owners:
        raise RuntimeError("the KV cache holds no session's whole window")
    for i, s in enumerate(slots[len(owners):]):
        kv.table[s] = kv.table[owners[i % len(owners)]]
    if context != "short":
        idx = torch.tensor(slots, device=engine.device)
        pages = kv.table[idx].flatten().unique()
        for i in range(kv.k.shape[0]):  # a ring full of finite keys and values
            for ring in (kv.k, kv.v):
                ring[i, pages] = torch.randn(ring[i, pages].shape, device=ring.device).to(ring.dtype)
            if kv.quantized:  # e4m3 codes of N(0, 1) with scale 1/16: small finite vectors
                kv.k_scale[i, pages] = 1 / 16
                kv.v_scale[i, pages] = 1 / 16
        st.offset[idx] = st.offset[idx] + (10 * kv.window if context == "full" else 750)
    return slots, len(owners)


def release_shared(engine, slots: list[int]) -> None:
    """Closes bench slots (those reading another's pages point at the scratch page again)."""
    for s in slots:
        engine.lm_state.kv.table[s] = 0
        engine.close(s)


def time_ticks(engine, slots: list[int], ticks: int, warmup: int = 10) -> list[float]:
    idx = torch.tensor(slots, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    pcm = [0.1 * torch.randn(len(slots), engine.frame_size, device="cuda", generator=g) for _ in range(8)]
    for t in range(warmup):
        engine.step_tensors(idx, pcm[t % 8])
    events = []
    for t in range(ticks):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        engine.step_tensors(idx, pcm[t % 8])
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def wall_tick_ms(engine, slot: int, n: int = 50) -> float:
    """One session through `Engine.step` (host audio in and out), wall clock."""
    frame = np.zeros(engine.frame_size, np.float32)
    for _ in range(5):
        engine.step({slot: frame})
    t0 = time.perf_counter()
    for _ in range(n):
        engine.step({slot: frame})
    return (time.perf_counter() - t0) / n * 1e3


def long_session(engine, voice, frames: int) -> dict:
    """One session through `frames` ticks (past the 3 000-frame context, so the KV ring wraps):
    tick time and GPU memory at the start and at the end, which must match."""
    from engine.sampling import SamplingParams

    slot = engine.open(*((None, None) if engine.cfg.moshi else (voice, PROMPT_100)), SamplingParams(seed=1))
    engine.reserve_kv(slot, engine.lm_state.kv.window)   # (step_tensors takes no KV pages itself)
    idx = torch.tensor([slot], device="cuda")
    pcm = 0.1 * torch.randn(1, engine.frame_size, device="cuda")
    marks, window = {}, 200
    for t in range(frames):
        if t in (0, frames - window):
            torch.cuda.synchronize()
            t0, mem0 = time.perf_counter(), torch.cuda.memory_allocated()
        engine.step_tensors(idx, pcm)
        if t in (window - 1, frames - 1):
            torch.cuda.synchronize()
            marks["start" if t < frames // 2 else "end"] = {
                "ms_per_tick": (time.perf_counter() - t0) / window * 1e3,
                "memory_GB": torch.cuda.memory_allocated() / 1e9, "memory_delta_MB": (torch.cuda.memory_allocated() - mem0) / 1e6}
    engine.close(slot)
    return {"frames": frames, **marks}


def prompt_timings(engine, n: int = 10) -> dict:
    """The prompt phase of a new slot, uncached and cached (median of n); and four uncached
    prompts opened together, as the engine runs them (with prefill graphs: a replay each)
    and as one eager batched pass."""
    from engine.random_weights import random_voice

    def timed(requests) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        slots = engine.open_many(requests)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) * 1e3
        for s in slots:
            engine.close(s)
        return dt

    out = {"uncached_ms": [], "cached_ms": []}
    for i in range(n):
        voice = random_voice(engine.cfg.lm, seed=1000 + i)
        for kind in ("uncached_ms", "cached_ms"):
            out[kind].append(timed([(voice, PROMPT_100, None)]))
    plan_positions = voice.frames + 12 + len(engine.tokenizer.encode_prompt(PROMPT_100))
    pg = engine.prefill_graphs
    res = {"positions": plan_positions, "uncached_ms": float(np.median(out["uncached_ms"])),
           "cached_ms": float(np.median(out["cached_ms"])), "runs": n,
           "prefill_graph_buckets": pg.sizes if pg is not None else [],
           "prefill_capture_s": pg.seconds if pg is not None else 0.0}
    if engine.max_slots >= 4:
        together = {"graphs": [], "eager": []}
        for i in range(max(3, n // 2)):
            for kind in ("graphs", "eager") if pg is not None else ("eager",):
                engine.prefill_graphs = pg if kind == "graphs" else None
                try:
                    reqs = [(random_voice(engine.cfg.lm, seed=2000 + 10 * i + j + (5 if kind == "eager" else 0)),
                             PROMPT_100, None) for j in range(4)]
                    together[kind].append(timed(reqs))
                finally:
                    engine.prefill_graphs = pg
        res["four_together_ms"] = {k: float(np.median(v)) for k, v in together.items() if v}
    return res


def run_reference(batches: list[int]) -> dict | None:
    """Kyutai's moshi at the same configuration, in its own process (its own GPU memory)."""
    cmd = [sys.executable, "-m", "benchmarks.reference_moshi", "--batches", ",".join(map(str, batches))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 240 s"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ctx, marker in (("short", "o"), ("full", "s")):
        rows = [r for r in results["ticks"] if r["context"] == ctx and "median_ms" in r]
        if rows:
            ax.plot([r["batch"] for r in rows], [r["median_ms"] for r in rows], marker=marker, label=f"ppx, {ctx} context")
            ax.plot([r["batch"] for r in rows], [r["floor_ms"] for r in rows], marker=marker, linestyle=":",
                    alpha=0.6, label=f"bandwidth floor, {ctx}")
    ref = results.get("reference") or {}
    if ref.get("lm_step_ms"):
        bs = sorted(int(b) for b in ref["lm_step_ms"])
        ax.plot(bs, [ref["lm_step_ms"][str(b)] for b in bs], marker="^", color="gray",
                label="moshi 0.2.13 LM step (no Mimi)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("live sessions (batch)")
    ax.set_ylabel("ms per 80 ms frame")
    ax.axhline(80, color="red", linewidth=0.8)
    ax.set_title(f"PersonaPlex 7B full tick, {results['card']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make bench", description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--ticks", type=int, default=200)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--long-session", type=int, default=10000, help="frames of the one-session run (0: none)")
    ap.add_argument("--quantize", choices=["none", "fp8"], default="none", help="fp8: e4m3 weights")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="fp8: e4m3 KV cache")
    ap.add_argument("--model", choices=["personaplex", "moshi"], default="personaplex",
                    help="moshi: Kyutai's Moshi 7B shapes (a depformer of 8 steps, no prompt phase)")
    ap.add_argument("--reference-only", action="store_true", help="only Kyutai's moshi, added to an existing result")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("make bench needs a CUDA GPU; none is visible")
        return 1
    from engine.config import MOSHI_7B, PERSONAPLEX_7B
    from engine.engine import Engine, kv_position_bytes
    from engine.random_weights import random_voice
    from engine.state import PAGE_SIZE

    # no TF32 switch: Mimi's float32 products run as ppx-serve and ppx-offline run them
    batches = [int(b) for b in args.batches.split(",")]
    if args.reference_only:
        path = Path(args.out) / f"{card_slug()}.json"
        results = json.loads(path.read_text())
        results["reference"] = run_reference([b for b in batches if b <= 32])
        path.write_text(json.dumps(results, indent=1))
        plot(results, path.with_suffix(".png"))
        print_table(results)
        return 0
    results = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "python": platform.python_version(),
               "command": "make bench (python -m benchmarks.bench " + " ".join(argv or sys.argv[1:]) + ")",
               "weights": "random bf16 of the 7B's shapes; Mimi float32", "ticks": []}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass
    bw = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    print(f"{results['card']}: device-to-device copy {bw / 1e12:.2f} TB/s", flush=True)

    total_mem = torch.cuda.get_device_properties(0).total_memory
    quantize = None if args.quantize == "none" else args.quantize
    kv_dtype = None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    results["variant"] = {"weights": quantize or "bf16", "kv_cache": kv_dtype or "bf16"}
    cfg = MOSHI_7B if args.model == "moshi" else PERSONAPLEX_7B
    results["model"] = cfg.name
    base = Engine.load(config=cfg, tokenizer=TOKENIZER, random_weights=True, cuda_graphs=False,
                       device="cuda", dtype=torch.bfloat16, seed=0, max_slots=1, quantize=quantize,
                       kv_cache_dtype=kv_dtype)
    wb = weight_bytes(base)
    results["gpu_memory_after_load_GB"] = torch.cuda.memory_allocated() / 1e9
    results["weight_bytes"] = wb
    weights_gb = sum(p.numel() * p.element_size() for p in base.lm.parameters()) / 1e9
    results["lm_weights_GB"] = weights_gb
    kv_slot = base.lm_state.kv_bytes_per_slot()
    results["kv_bytes_per_session"] = kv_slot
    voice = random_voice(base.cfg.lm, seed=7)
    lm, mimi, tok = base.lm, base.mimi, base.tokenizer
    del base
    gc.collect()
    torch.cuda.empty_cache()
    full_window = cfg.lm.temporal.window
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = card_slug() + ("" if results["variant"] == {"weights": "bf16", "kv_cache": "bf16"} else
                          f"-w{results['variant']['weights']}-kv{results['variant']['kv_cache']}") + \
        ("-moshi" if cfg.moshi else "")

    def engine(slots: int, window: int) -> Engine:
        page = min(PAGE_SIZE, 1 << (window - 1).bit_length())
        pages = int((torch.cuda.mem_get_info()[0] - (6 << 30) - slots * (24 << 20))
                    // (page * kv_position_bytes(cfg, torch.bfloat16, kv_dtype)))
        pages = max(1, min(pages, slots * -(-window // page)))
        # (a short-context engine's 512-frame rings are deliberate: it reads only the prompt's
        # entries; the engine's warning about rings shorter than the model's window is for users)
        log = logging.getLogger("ppx.engine")
        was = log.disabled
        log.disabled = was or window < full_window
        try:
            return Engine(cfg, lm, mimi, tok, max_slots=slots, kv_window=window, checkpoint_id="bench",
                          kv_cache_dtype=kv_dtype, kv_pages=pages)
        finally:
            log.disabled = was

    def save():
        (out / f"{slug}.json").write_text(json.dumps(results, indent=1))

    for B in batches:
        for ctx in ("short", "minute", "full"):
            row = {"batch": B, "context": ctx}
            # short context reads only the prompt's KV entries, so a small ring gives the same tick
            window = 512 if ctx == "short" else full_window
            eng = engine(B, window)
            cap_s = eng.enable_graphs(buckets=(B,), prefill_buckets=())  # (the prompt phase: `prompt_timings`)
            slots, distinct = prepare_slots(eng, B, voice, context=ctx)
            torch.cuda.reset_peak_memory_stats()
            ms = time_ticks(eng, slots, args.ticks)
            pos = int(eng.lm_state.offset[slots[0]]) - 1
            positions = min(pos + 1, full_window)
            nbytes = sum(wb.values()) + B * kv_read_bytes(eng, positions)
            med = float(np.median(ms))
            row.update(median_ms=med, p99_ms=float(np.percentile(ms, 99)), mean_ms=float(np.mean(ms)),
                       kv_positions_read=min(positions, full_window), bytes=nbytes,
                       achieved_GBps=nbytes / (med / 1e3) / 1e9, floor_ms=nbytes / bw * 1e3,
                       floor_ratio=(nbytes / bw * 1e3) / med, capture_s=cap_s, graph_memory_GB=eng.graph_memory / 1e9,
                       peak_memory_GB=torch.cuda.max_memory_allocated() / 1e9, kv_window=window,
                       distinct_windows=distinct)
            if B == 1:
                row["wall_step_ms"] = wall_tick_ms(eng, slots[0])
            results["ticks"].append(row)
            save()
            print(f"batch {B:3d} {ctx:5s}: {med:6.2f} ms median, {row['p99_ms']:6.2f} p99; "
                  f"floor {row['floor_ms']:5.2f} ms ({row['floor_ratio'] * 100:4.0f}%), "
                  f"{row['achieved_GBps']:5.0f} GB/s", flush=True)
            if B == batches[0] and ctx == "full" and args.long_session:
                release_shared(eng, slots)
                results["long_session"] = long_session(eng, voice, args.long_session)
                print(f"one session of {args.long_session} frames: {results['long_session']}", flush=True)
            del eng
            gc.collect()
            torch.cuda.empty_cache()
    # the prompt phase on an engine of 4 slots (prompts opened together too), its prefill graphs
    # captured (Moshi has none)
    eng = engine(4, 512)
    if not cfg.moshi:
        eng.enable_graphs(buckets=(1,))
        results["prompt_phase"] = prompt_timings(eng)
        p = results["prompt_phase"]
        print(f"prompt phase ({p['positions']} positions): {p['uncached_ms']:.1f} ms uncached, "
              f"{p['cached_ms']:.2f} ms cached; four opened together {p.get('four_together_ms')}", flush=True)
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    from engine.kernels.products import calibration_stats, linear_choices
    results["linear_choices"] = linear_choices()
    results["calibration"] = calibration_stats()  # every engine of this run: shapes timed, seconds (compiles included)
    results["memory_per_session_GB"] = kv_slot / 1e9
    results["sessions_that_fit_full_context"] = int((total_mem - weights_gb * 1e9 - (4 << 30)) // kv_slot)
    del lm, mimi
    gc.collect()
    torch.cuda.empty_cache()
    if not args.no_reference:
        print("reference: Kyutai moshi 0.2.13 ...", flush=True)
        results["reference"] = run_reference([b for b in batches if b <= 32])
        print(json.dumps(results["reference"]), flush=True)
    save()
    plot(results, out / f"{slug}.png")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print(f"\n{results['card']}, copy bandwidth {results['copy_bandwidth_GBps'] / 1e3:.2f} TB/s, "
          f"torch {results['torch']}")
    print("| batch | context | median ms | p99 ms | floor ms | floor/median | GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results["ticks"]:
        if "skipped" in r:
            print(f"| {r['batch']} | {r['context']} | skipped: {r['skipped']} | | | | |")
        else:
            print(f"| {r['batch']} | {r['context']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['floor_ms']:.2f} | {r['floor_ratio'] * 100:.0f}% | {r['achieved_GBps']:.0f} |")
    ls = results.get("long_session")
    if ls:
        print(f"one session of {ls['frames']} frames: {ls['start']['ms_per_tick']:.2f} ms/tick at the start, "
              f"{ls['end']['ms_per_tick']:.2f} at the end; GPU memory {ls['start']['memory_GB']:.2f} -> "
              f"{ls['end']['memory_GB']:.2f} GB")
    p = results.get("prompt_phase")
    if p:
        four = p.get("four_together_ms", {})
        print(f"prompt phase ({p['positions']} positions): uncached {p['uncached_ms']:.1f} ms, "
              f"cached {p['cached_ms']:.2f} ms" + (f"; four uncached opened together {four.get('graphs', 0):.1f} ms "
                                                  f"as graph replays, {four.get('eager', 0):.1f} ms as one eager pass"
                                                  if four else ""))
    c = results.get("calibration")
    if c:
        print(f"kernel calibration: {c['products']} product shapes and {c['fused']} with a prologue timed in "
              f"{c['seconds']:.1f} s, Triton's compilation included; {c.get('from_cache', 0)} choices read from "
              f"disk (PPX_KERNEL_CACHE)")
    ref = results.get("reference") or {}
    if "lm_step_ms" in ref:
        print("reference (moshi 0.2.13, same GPU): LM step " +
              ", ".join(f"batch {b}: {v:.1f} ms" for b, v in ref["lm_step_ms"].items()) +
              f"; Mimi encode {ref.get('mimi_encode_ms', float('nan')):.1f} ms, "
              f"decode {ref.get('mimi_decode_ms', float('nan')):.1f} ms")
    elif ref:
        print(f"reference: {ref}")


if __name__ == "__main__":
    sys.exit(main())
