"""`ppx-offline` over many files on a GPU: N recordings of S seconds run as slots of one engine
(B at a time, as `ppx-offline --input-dir` runs them: `frontends.offline.run_items`), and the
same engine one file at a time, on random weights of the 7B's shapes. Prints and writes x real
time and GPU-hours per 1 000 hours of audio; never fails on time.

    python -m benchmarks.offline_batch --wav REC.wav [--files 256 --seconds 30 --batch 64]
        [--quantize fp8 --kv-cache-dtype fp8] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "golden" / "tiny-1234" / "tokenizer.model"
PROMPT = ("You work for a bicycle shop in the city centre. Answer customers' questions about repairs, "
          "prices and opening hours briefly and kindly.")


def _items(d: Path, n: int, seconds: float, wavs: list[str]):
    import soundfile as sf

    from engine.audio import first_channel, read_audio
    from engine.sampling import SamplingParams
    from frontends.offline import Item

    src = np.concatenate([first_channel(read_audio(w, 24000)) for w in wavs])
    n_samples = int(seconds * 24000)
    src = np.tile(src, -(-(n_samples * 2) // src.shape[0]))
    items = []
    for i in range(n):
        at = (i * 7919 * 240) % (src.shape[0] - n_samples)
        path = d / "in" / f"{i:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, src[at:at + n_samples], 24000)
        items.append(Item(path.name, path, d / "out" / f"{i:04d}.wav", d / "out" / f"{i:04d}.json", "voice", PROMPT,
                          SamplingParams(seed=i), seconds=seconds))
    (d / "out").mkdir(exist_ok=True)
    return items


def main() -> int:
    import torch

    from engine.config import PERSONAPLEX_7B
    from engine.engine import Engine
    from engine.random_weights import random_voice
    from frontends.offline import run_items

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wav", action="append", required=True, help="recordings the items are cut from (looped)")
    ap.add_argument("--files", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--single", type=int, default=2, help="files run one at a time for the one-file rate")
    ap.add_argument("--quantize", choices=["none", "fp8"], default="none")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--config", help="a model config JSON (default: the 7B's shapes)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    args = ap.parse_args()
    quantize = None if args.quantize == "none" else args.quantize
    kv = None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    eng = Engine.load(config=args.config or PERSONAPLEX_7B, tokenizer=TOKENIZER, random_weights=True,
                      device=args.device, max_slots=args.batch, quantize=quantize, kv_cache_dtype=kv)
    voices = {"voice": random_voice(eng.cfg.lm, seed=1)}
    out = {"card": card, "files": args.files, "seconds": args.seconds, "batch": args.batch,
           "variant": {"weights": quantize or "bf16", "kv_cache": kv or "bf16"}}
    with tempfile.TemporaryDirectory() as d:
        items = _items(Path(d), args.files, args.seconds, args.wav)
        run_items(eng, items[:2], voices, False, False)  # (warm: first prompts, first writes)
        t0 = time.monotonic()
        failed = run_items(eng, items, voices, False, False)
        wall = time.monotonic() - t0
        audio = args.files * args.seconds
        out["batch_run"] = {"wall_s": wall, "x_real_time": audio / wall, "failed": len(failed),
                            "gpu_hours_per_1000_audio_hours": 1000 * wall / audio}
        one = Engine(eng.cfg, eng.lm, eng.mimi, eng.tokenizer, max_slots=1, checkpoint_id=eng.checkpoint_id,
                     kv_cache_dtype=kv)
        one.enable_graphs(buckets=(1,))
        run_items(one, items[:1], voices, False, False)
        t0 = time.monotonic()
        run_items(one, items[: args.single], voices, False, False)
        wall1 = time.monotonic() - t0
        audio1 = args.single * args.seconds
        out["one_file_at_a_time"] = {"wall_s": wall1, "x_real_time": audio1 / wall1,
                                     "gpu_hours_per_1000_audio_hours": 1000 * wall1 / audio1}
    b, s = out["batch_run"], out["one_file_at_a_time"]
    print(f"{card}, {out['variant']}: {args.files} files of {args.seconds:g} s at batch {args.batch}: "
          f"{b['wall_s']:.1f} s, {b['x_real_time']:.0f}x real time, {b['gpu_hours_per_1000_audio_hours']:.2f} GPU-hours "
          f"per 1000 h; one file at a time: {s['x_real_time']:.1f}x real time, "
          f"{s['gpu_hours_per_1000_audio_hours']:.1f} GPU-hours per 1000 h", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
