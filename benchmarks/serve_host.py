"""The host side of `ppx-serve` alone: the real server (websockets, Ogg/Opus both ways, the tick
thread, the codec threads) over a stand-in engine whose tick waits `--tick-ms` (the GIL
released, as a GPU tick's wait is) and answers noise (as random weights do; `--answer echo`
returns the user's frame). How many sessions the host keeps in real time, with no GPU.

    python -m benchmarks.serve_host --sweep 8,16,32 --wav a.wav [--wav b.wav] [--json out.json]

Starts that server in a subprocess on a free port, runs `benchmarks.load_client` against it
(in `--clients` processes), and prints the client's summary per round. Never fails on time."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "golden" / "tiny-1234" / "tokenizer.model"


class StandInEngine:
    """What `frontends.serve.server.Server` needs of an engine: each tick sleeps tick_s, then answers
    every frame with noise (or the user's frame) and a fixed word piece."""

    frame_size = 1920
    sample_rate = 24000
    from engine.config import PERSONAPLEX_7B as cfg  # (a PersonaPlex engine's config: prompts taken)

    def __init__(self, max_slots: int, tick_s: float = 0.0, answer: str = "noise"):
        self.tick_s, self.answer = tick_s, answer
        # (noise made once and cycled: the stand-in's own work stays out of the server's CPU figures)
        self.noise = (0.1 * np.random.default_rng(0).standard_normal((64, self.frame_size))).astype(np.float32)
        self.ticks = 0
        from engine.tokenizer import Tokenizer

        self.max_slots = max_slots
        self.tokenizer = Tokenizer(str(TOKENIZER))
        self.slots: dict[int, object] = {}
        self._free = list(range(max_slots))
        self.text_id = next(i for i in range(100, 1000) if self.tokenizer.piece(i))
        self.mimi_id = "stand-in"

    def open_many(self, requests) -> list[int]:
        from types import SimpleNamespace

        out = []
        for _ in requests:
            slot = self._free.pop(0)
            self.slots[slot] = SimpleNamespace(prompt_tokens=0, frames=0)
            out.append(slot)
        return out

    def encode_voice(self, pcm, name: str = "voice"):
        return None  # (the stand-in has no voices: its sessions name none)

    def kv_room(self) -> int:
        return len(self._free)   # (no KV cache: only slots limit it)

    def gpu_memory(self) -> int:
        return 0

    def used_slots(self) -> int:
        return len(self.slots)

    def process_cpu(self) -> float:
        return time.process_time()

    def kv_stats(self) -> dict:
        return {"pages": 0, "used": 0, "free": 0, "page_positions": 0, "page_bytes": 0, "shrunk": 0}

    def close(self, slot: int) -> None:
        if self.slots.pop(slot, None) is not None:
            self._free.append(slot)

    def step(self, frames):
        from engine.engine import FrameOut

        if self.tick_s:
            time.sleep(self.tick_s)
        out = {}
        self.ticks += 1
        for i, (slot, pcm) in enumerate(frames.items()):
            self.slots[slot].frames += 1
            agent = self.noise[(self.ticks + i) % len(self.noise)] if self.answer == "noise" \
                else np.asarray(pcm, dtype=np.float32)
            out[slot] = FrameOut(pcm=agent, text_id=self.text_id, tokens=None)
        return out


def serve(argv: list[str]) -> int:
    """The stand-in server (the subprocess): TICK_MS ANSWER, then `ppx-serve`'s own flags."""
    import asyncio
    import logging

    from frontends.serve.cli import build_parser
    from frontends.serve.server import Server

    tick_ms, answer = float(argv[0]), argv[1]
    args = build_parser().parse_args(argv[2:])
    logging.basicConfig(level=logging.WARNING)
    args.max_sessions = args.max_sessions or 64
    engine = StandInEngine(args.max_sessions, tick_ms / 1000, answer)
    if args.frontends > 1:   # (the engine process of --frontends N, its frontends started as ppx-serve's)
        from frontends.serve.frontends import run_core

        return run_core(args, argv[2:], engine, Path(args.voice_prompt_dir), None, str(TOKENIZER))
    asyncio.run(Server(engine, args, Path(args.voice_prompt_dir), None).serve())
    return 0


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user and system) of the server's processes: the one started here ("server";
    with --frontends, the engine process) and each child ("frontend-N"), from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(p: int) -> float:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            return 0.0

    out = {"server": cpu(pid)}
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for i, c in enumerate(sorted(children)):
        out[f"frontend-{i}"] = cpu(c)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        return serve(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_host", description=__doc__)
    ap.add_argument("--sweep", default="8,16,32")
    ap.add_argument("--wav", action="append", required=True)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=1, help="load-client processes per round")
    ap.add_argument("--server-args", default="", help="extra ppx-serve flags, e.g. '--codec-threads 1'")
    ap.add_argument("--tick-ms", type=float, default=12.0, help="how long each stand-in tick waits")
    ap.add_argument("--answer", choices=["noise", "echo"], default="noise")
    ap.add_argument("--json")
    args = ap.parse_args()
    vdir = tempfile.mkdtemp()
    srv = subprocess.Popen([sys.executable, "-m", "benchmarks.serve_host", "--serve", str(args.tick_ms), args.answer,
                            "--port", "0",
                            "--host", "127.0.0.1", "--voice-prompt-dir", vdir, "--max-sessions", "64",
                            *args.server_args.split()], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while "PPX_READY" not in line:
            line = srv.stdout.readline()
            if not line and srv.poll() is not None:
                print("the stand-in server did not start")
                return 1
        port = int(line.split("port=")[1].split()[0])
        rounds, cpu_by_process = {}, {}
        for n in (int(x) for x in args.sweep.split(",")):
            per = [n // args.clients + (1 if i < n % args.clients else 0) for i in range(args.clients)]
            procs, files = [], []
            for i, k in enumerate(p for p in per if p):
                f = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
                files.append(f)
                cmd = [sys.executable, "-m", "benchmarks.load_client", "--url", f"ws://127.0.0.1:{port}",
                       "--sessions", str(k), "--duration", str(args.duration), "--ramp", "2",
                       "--seed", str(100 * i), "--json", f]
                for w in args.wav:
                    cmd += ["--wav", w]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True))
            cpu0 = process_cpu(srv.pid)
            outs = [p.communicate()[0] for p in procs]
            cpu1 = process_cpu(srv.pid)
            by_process = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items()}
            summary = [ln for o in outs for ln in o.splitlines() if ln.startswith(("all:", "clients:"))]
            print(f"== {n} sessions ({len(procs)} client process(es))")
            for ln in summary:
                print("  " + ln)
            print("  server CPU seconds by process over the round: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in by_process.items()))
            rounds[n] = [json.loads(Path(f).read_text()) for f in files if os.path.getsize(f)]
            cpu_by_process[n] = by_process
            time.sleep(1)
        if args.json:
            Path(args.json).write_text(json.dumps({"server_args": args.server_args, "clients": args.clients,
                                                   "tick_ms": args.tick_ms, "answer": args.answer,
                                                   "cpus": os.cpu_count(), "rounds": rounds,
                                                   "server_cpu_s_by_process": cpu_by_process}, indent=1))
    finally:
        srv.terminate()
        srv.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
