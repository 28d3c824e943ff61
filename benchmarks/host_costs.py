"""What one session-frame (80 ms) costs the host of `ppx-serve`, part by part, on this machine's
CPU: reading the client's Ogg-Opus (page parsing, CRC, Opus decoding), writing the answer's
(Opus encoding at the server's complexity, pages), and the websocket framing both ways (the
client's masked frame parsed, the server's frames written), each timed alone in a loop over a
recording; and what they add up to in cores at a number of sessions. The event loop's own
work (asyncio, the session's Python) is not in these parts: `benchmarks.serve_host` measures
the whole server.

    python -m benchmarks.host_costs [--wav input.wav] [--complexity 5] [--sessions 64,128,256]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

RATE, FRAME = 24000, 1920
FRAME_SECONDS = FRAME / RATE


def speech(path: str | None, seconds: float = 20.0) -> np.ndarray:
    """The recording (first channel, 24 kHz), or a voiced, syllable-rate-modulated tone."""
    if path:
        from engine.audio import first_channel, read_audio

        return first_channel(read_audio(path, RATE)).astype(np.float32)
    t = np.arange(int(seconds * RATE)) / RATE
    voiced = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 560, 700), 1))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * (np.sin(2 * np.pi * 0.3 * t) > -0.5)
    rng = np.random.default_rng(0)
    return (0.15 * voiced * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def per_frame_us(fn, items: list, min_seconds: float) -> float:
    """Microseconds of CPU time per item of fn over the items, repeated for at least min_seconds."""
    n, t0 = 0, time.process_time()
    while True:
        for item in items:
            fn(item)
        n += len(items)
        dt = time.process_time() - t0
        if dt >= min_seconds:
            return dt / n * 1e6


def measure(pcm: np.ndarray, complexity: int, min_seconds: float = 1.0) -> dict[str, float]:
    """Microseconds of CPU per session-frame of each part (each timed for min_seconds)."""
    from websockets.frames import Frame, Opcode
    from websockets.protocol import Protocol, Side, State

    from frontends.ogg_opus import OggOpusWriter

    frames = [pcm[i:i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME)]
    # the client's side, as the reference's client sends it: one message of pages per 80 ms
    client = OggOpusWriter(RATE, complexity=complexity)
    pages = []
    for f in frames:
        client.append_pcm(f)
        pages.append(client.read_bytes())
    header, pages = pages[0], pages[1:]   # (the first message carries the header pages too)
    out: dict[str, float] = {"ogg_opus_read": _read_stream(header, pages, min_seconds)}
    writer = OggOpusWriter(RATE, complexity=complexity)

    def write(f):
        writer.append_pcm(f)
        writer.read_bytes()

    out["ogg_opus_write"] = per_frame_us(write, frames, min_seconds)
    # websocket framing: a masked client frame of one 80 ms message parsed, the server's audio
    # and text frames serialized (sans-I/O, as the server's connection does it)
    masked = []
    for msg in pages:
        masked.append(Frame(Opcode.BINARY, b"\x01" + msg).serialize(mask=True, extensions=[]))
    server = Protocol(Side.SERVER, state=State.OPEN)

    def parse(data):
        server.receive_data(data)
        return server.events_received()

    got = parse(masked[0])
    if len(got) != 1 or got[0].data != b"\x01" + pages[0]:   # (what is timed is a real parse)
        raise RuntimeError(f"the websocket parser gave {got!r}")
    out["websocket_in"] = per_frame_us(parse, masked, min_seconds)
    answers = pages[:len(frames)]

    def send(msg):
        Frame(Opcode.BINARY, b"\x01" + msg).serialize(mask=False, extensions=[])
        Frame(Opcode.BINARY, b"\x02 word").serialize(mask=False, extensions=[])

    out["websocket_out"] = per_frame_us(send, answers, min_seconds)
    return out


def _read_stream(header: bytes, pages: list[bytes], min_seconds: float) -> float:
    """Microseconds of CPU per 80 ms message of reading the client's stream, over fresh readers
    (a reader takes one stream: its header first)."""
    from frontends.ogg_opus import OggOpusReader

    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < min_seconds:
        reader = OggOpusReader(RATE)
        reader.append_bytes(header)
        reader.read_pcm()
        for msg in pages:
            reader.append_bytes(msg)
            reader.read_pcm()
        n += len(pages)
    return (time.process_time() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_costs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wav", help="a recording (default: a synthetic voiced signal)")
    ap.add_argument("--complexity", type=int, default=5, help="Opus encoder complexity (ppx-serve's default: 5)")
    ap.add_argument("--sessions", default="64,128,256")
    ap.add_argument("--json")
    args = ap.parse_args()
    costs = measure(speech(args.wav), args.complexity)
    total = sum(costs.values())
    counts = [int(x) for x in args.sessions.split(",")]
    print(f"host cost per session-frame (80 ms of audio), {args.complexity=}, one core of this machine:")
    for name, us in costs.items():
        print(f"  {name:16s} {us:8.1f} us   " + "  ".join(f"{n} sessions: {us * n / FRAME_SECONDS / 1e6:5.2f} cores"
                                                      for n in counts))
    print(f"  {'sum':16s} {total:8.1f} us   " + "  ".join(f"{n} sessions: {total * n / FRAME_SECONDS / 1e6:5.2f} cores"
                                                     for n in counts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"complexity": args.complexity, "us_per_session_frame": costs, "sessions": counts}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
