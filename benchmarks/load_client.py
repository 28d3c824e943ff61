"""Load client for `ppx-serve`: N concurrent sessions on /api/chat (or /v1/realtime), each streaming
a WAV like a browser (or a Realtime client).

    python -m benchmarks.load_client --url ws://host:8998 --sessions 8 --duration 30 --wav user.wav
    python -m benchmarks.load_client --url ws://host:8998 --sweep 1,2,4,8 --duration 20 --wav user.wav

Each session connects, waits for the 0x00 handshake, then sends its WAV (looped, 24 kHz mono)
as Ogg-Opus in 80 ms chunks paced at real time, and reads the server's audio, text and errors.
Output frame k (1920 samples of decoded audio) is the answer to input frame k, so its lag is the
time from sending input chunk k to having decoded output frame k. Because the server's Opus
decoder needs the encoder's lookahead (6.5 ms of the *next* chunk) before input frame k is whole,
lag includes one chunk period (80 ms) on top of queueing, the tick and the network.
A session stayed real time when it got the handshake, saw no error, received every frame it sent
and the p99 interval between consecutive output frames stayed under 100 ms.

--endpoint realtime: the same sessions on /v1/realtime, the audio as base64 PCM16 in
`input_audio_buffer.append` events (one per 80 ms chunk), the answers counted from the samples
of `response.output_audio.delta` events; `session.created` stands for the handshake. The server
sends no audio between responses (the agent quiet), so frame counts and lags are exact only for
an agent that never stops, as random weights never do.

Sessions of mixed lengths (`--duration 60,300`: session i gets the (i mod n)-th) start at spread
times (`--ramp` evenly, `--spread` a seeded random extra delay), not in lockstep. Each session
records how late its own client sent each chunk: a session whose client fell a frame behind its
pacing is marked, so a busy client machine is not taken for a slow server. Each round reports
the clients' CPU per session-frame and, from the server's /metrics sampled every second, the
server's CPU per session-frame (over every frame it stepped), its busy cores and its GPU memory.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from frontends.ogg_opus import OggOpusReader, OggOpusWriter

RATE, FRAME = 24000, 1920
FRAME_S = FRAME / RATE
GAP_LIMIT_S = 0.100            # a session is real time while its p99 gap stays under this
SEND_TIMEOUT_S = 5.0           # one send that blocks longer means the server stopped reading
DRAIN_S = 3.0                  # after the last chunk, how long to wait for the answers still due
CLIENT_LATE_S = FRAME / RATE   # a client that sent a chunk a frame late fell behind itself
HANDSHAKE, AUDIO, TEXT, ERROR = 0x00, 0x01, 0x02, 0x05


@dataclass
class SessionStats:
    index: int
    handshake_s: float | None = None
    refusal: str | None = None            # why the session never got its handshake
    errors: list[str] = field(default_factory=list)   # after the handshake
    sent: list[float] = field(default_factory=list)   # monotonic time input chunk k went out
    recv: list[float] = field(default_factory=list)   # monotonic time output frame k was complete
    late: list[float] = field(default_factory=list)   # how late this client sent chunk k (its own pacing)
    start_s: float | None = None          # when it connected, from the round's start
    text_pieces: int = 0

    def lags(self) -> np.ndarray:
        n = min(len(self.sent), len(self.recv))
        return np.array(self.recv[:n]) - np.array(self.sent[:n])

    def gaps(self) -> np.ndarray:
        return np.diff(np.array(self.recv))

    def summary(self) -> dict:
        lags, gaps = self.lags(), self.gaps()
        late = np.array(self.late)
        real_time = (self.handshake_s is not None and not self.errors and len(gaps) > 0
                     and len(self.recv) >= len(self.sent) and np.percentile(gaps, 99) < GAP_LIMIT_S)
        return dict(session=self.index, start_ms=_ms(self.start_s), handshake_ms=_ms(self.handshake_s),
                    refusal=self.refusal,
                    errors=self.errors, frames_sent=len(self.sent), frames_received=len(self.recv),
                    text_pieces=self.text_pieces, lag_median_ms=_q(lags, 50), lag_p99_ms=_q(lags, 99),
                    lag_max_ms=_q(lags, 100), gap_p99_ms=_q(gaps, 99), gap_max_ms=_q(gaps, 100),
                    gaps_over_100ms=int((gaps > GAP_LIMIT_S).sum()), real_time=bool(real_time),
                    send_late_p99_ms=_q(late, 99), send_late_max_ms=_q(late, 100),
                    client_behind=bool(len(late) and late.max() > CLIENT_LATE_S))


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 2)


def _q(x: np.ndarray, p: float):
    return None if len(x) == 0 else round(float(np.percentile(x, p)) * 1000, 2)


def load_wav(path: str) -> np.ndarray:
    import soundfile as sf
    import soxr

    pcm, rate = sf.read(path, dtype="float32", always_2d=True)
    pcm = pcm.mean(axis=1)
    if rate != RATE:
        pcm = soxr.resample(pcm, rate, RATE).astype(np.float32)
    if len(pcm) < FRAME:
        raise ValueError(f"{path} holds less than one 80 ms frame of audio")
    return np.clip(pcm, -1.0, 1.0)


ENDPOINTS = {"chat": "/api/chat", "realtime": "/v1/realtime"}


def chat_url(base: str, voice: str | None, text_prompt: str | None, seed: int | None, endpoint: str = "chat") -> str:
    """`base` with the endpoint's path (when it has none) and the session's query parameters."""
    u = urlsplit(base)
    if u.scheme not in ("ws", "wss"):
        raise ValueError(f"--url must be ws:// or wss://, got {base!r}")
    query = parse_qsl(u.query, keep_blank_values=True)
    query += [(k, str(v)) for k, v in (("voice_prompt", voice), ("text_prompt", text_prompt), ("seed", seed))
              if v is not None]
    path = u.path if u.path not in ("", "/") else ENDPOINTS[endpoint]
    return urlunsplit((u.scheme, u.netloc, path, urlencode(query), ""))


def _connector():
    from websockets.asyncio.client import connect

    class NoRedirect(connect):  # only ever talk to the URL given
        def process_redirect(self, exc):
            return exc
    return NoRedirect


def _opus_pre_skip(data: bytes) -> int:
    """Samples at 24 kHz the decoder drops at the start (the OpusHead pre-skip): the decoded stream
    lags the server's frames by this much, so it counts towards frame completion."""
    i = data.find(b"OpusHead")
    return 0 if i < 0 or len(data) < i + 12 else struct.unpack_from("<H", data, i + 10)[0] * RATE // 48000


async def _receive_loop(ws, st: SessionStats, caught_up: asyncio.Event, done_sending: asyncio.Event,
                        on_message) -> None:
    """Reads the server's messages until it closes, each through `on_message(msg, now)`; records
    why the stream ended early, if it did."""
    from websockets.exceptions import ConnectionClosed

    try:
        async for msg in ws:
            on_message(msg, time.monotonic())
            if done_sending.is_set() and len(st.recv) >= len(st.sent):
                caught_up.set()
        if not done_sending.is_set() or len(st.recv) < len(st.sent):
            st.errors.append(f"the server closed the connection (close {ws.close_code} {ws.close_reason!r})")
    except ConnectionClosed:
        st.errors.append(f"the connection broke (close {ws.close_code} {ws.close_reason!r})")
    except Exception as e:  # noqa: BLE001 - e.g. an undecodable stream: this session's error
        st.errors.append(f"{type(e).__name__}: {e}")
    finally:
        caught_up.set()  # the sender stops too: it checks whether this task is done


async def _receive(ws, st: SessionStats, caught_up: asyncio.Event, done_sending: asyncio.Event) -> None:
    """/api/chat: records when each output frame is complete (decoded from the Ogg-Opus stream)."""
    reader, decoded, skip = OggOpusReader(RATE), 0, None

    def on_message(msg, now):
        nonlocal decoded, skip
        if isinstance(msg, str) or not msg:
            return
        kind = msg[0]
        if kind == AUDIO:
            if skip is None:
                skip = _opus_pre_skip(msg[1:])
            reader.append_bytes(msg[1:])
            decoded += len(reader.read_pcm())
            while decoded + skip >= (len(st.recv) + 1) * FRAME:
                st.recv.append(now)
        elif kind == TEXT:
            st.text_pieces += 1
        elif kind == ERROR:
            st.errors.append(msg[1:].decode("utf-8", "replace"))

    await _receive_loop(ws, st, caught_up, done_sending, on_message)


async def _receive_realtime(ws, st: SessionStats, caught_up: asyncio.Event, done_sending: asyncio.Event) -> None:
    """/v1/realtime: output frames counted from the audio deltas' samples."""
    decoded = 0

    def on_message(msg, now):
        nonlocal decoded
        event = json.loads(msg)
        kind = event.get("type")
        if kind == "response.output_audio.delta":
            decoded += len(base64.b64decode(event["delta"])) // 2
            while decoded >= (len(st.recv) + 1) * FRAME:
                st.recv.append(now)
        elif kind == "response.output_audio_transcript.delta":
            st.text_pieces += 1
        elif kind == "error":
            st.errors.append(f"{event['error'].get('code')}: {event['error'].get('message')}")

    await _receive_loop(ws, st, caught_up, done_sending, on_message)


async def _paced(st: SessionStats, duration: float, receiver: asyncio.Task):
    """Chunk indices k = 0, 1, ..., each when its 80 ms of audio would have been captured (against
    the clock: no drift), until `duration` or the receiver ends; records how late the client itself
    was for each (a busy client process is not a slow server)."""
    start = time.monotonic()
    for k in range(max(1, round(duration / FRAME_S))):
        due = start + (k + 1) * FRAME_S
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        if receiver.done():
            return
        st.late.append(max(0.0, time.monotonic() - due))
        yield k


async def _send_realtime(ws, st: SessionStats, pcm: np.ndarray, duration: float, receiver: asyncio.Task) -> None:
    """`_send` for /v1/realtime: each 80 ms chunk as base64 PCM16 in an append event."""
    async for k in _paced(st, duration, receiver):
        chunk = np.take(pcm, np.arange(k * FRAME, (k + 1) * FRAME), mode="wrap")
        data = (chunk * 32767).round().astype("<i2").tobytes()
        await asyncio.wait_for(ws.send(json.dumps({"type": "input_audio_buffer.append",
                                                   "audio": base64.b64encode(data).decode()})), SEND_TIMEOUT_S)
        st.sent.append(time.monotonic())


async def _send(ws, st: SessionStats, pcm: np.ndarray, duration: float, receiver: asyncio.Task) -> None:
    """Streams pcm (looped) in 80 ms chunks, each sent when its audio would have been captured."""
    # complexity 5, as the server encodes: at libopus's default (10) one client process spent
    # 4.5x the time encoding, time the server on the same machine then lacks
    writer = OggOpusWriter(RATE, complexity=5)
    async for k in _paced(st, duration, receiver):
        writer.append_pcm(np.take(pcm, np.arange(k * FRAME, (k + 1) * FRAME), mode="wrap"))
        await asyncio.wait_for(ws.send(bytes([AUDIO]) + writer.read_bytes()), SEND_TIMEOUT_S)
        st.sent.append(time.monotonic())
    if receiver.done():
        return
    await asyncio.wait_for(ws.send(bytes([AUDIO]) + writer.flush()), SEND_TIMEOUT_S)  # completes the last frame


async def run_session(st: SessionStats, url: str, pcm: np.ndarray, duration: float, delay: float,
                      api_key: str | None, handshake_timeout: float) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    begin = time.monotonic()
    await asyncio.sleep(delay)
    st.start_s = time.monotonic() - begin
    headers = {"X-API-Key": api_key} if api_key else {}
    t0 = time.monotonic()
    try:
        ws = await _connector()(url, additional_headers=headers, proxy=None, open_timeout=handshake_timeout,
                                close_timeout=2, max_size=1 << 22)
    except InvalidStatus as e:
        st.refusal = f"HTTP {e.response.status_code} {e.response.reason_phrase}"
        return
    except Exception as e:  # noqa: BLE001 - refused, unreachable, timed out, not a websocket server
        st.refusal = f"{type(e).__name__}: {e}"
        return
    try:
        try:
            first = await asyncio.wait_for(ws.recv(), max(0.1, handshake_timeout - (time.monotonic() - t0)))
        except ConnectionClosed:
            st.refusal = f"closed before the handshake (close {ws.close_code} {ws.close_reason!r})"
            return
        except TimeoutError:
            st.refusal = f"no handshake within {handshake_timeout:g} s"
            return
        realtime = urlsplit(url).path.endswith("realtime")
        if realtime:
            event = json.loads(first)
            if event.get("type") != "session.created":
                try:
                    await asyncio.wait_for(ws.wait_closed(), 2)
                except TimeoutError:
                    pass
                st.refusal = (f"error before the session (close {ws.close_code}): "
                              f"{event.get('error', {}).get('message', event.get('type'))}")
                return
        elif isinstance(first, str) or first[:1] != bytes([HANDSHAKE]):
            if first[:1] != bytes([ERROR]):
                st.refusal = f"the first message is not the handshake: {first[:20]!r}"
                return
            try:  # the server closes right after its error: wait for the close code
                await asyncio.wait_for(ws.wait_closed(), 2)
            except TimeoutError:
                pass
            st.refusal = f"error before the handshake (close {ws.close_code}): {first[1:].decode('utf-8', 'replace')}"
            return
        st.handshake_s = time.monotonic() - t0
        caught_up, done_sending = asyncio.Event(), asyncio.Event()
        receiver = asyncio.create_task((_receive_realtime if realtime else _receive)(ws, st, caught_up, done_sending))
        try:
            await (_send_realtime if realtime else _send)(ws, st, pcm, duration, receiver)
            done_sending.set()
            if len(st.recv) >= len(st.sent):
                caught_up.set()
            await asyncio.wait_for(caught_up.wait(), DRAIN_S)
        except (ConnectionClosed, OSError) as e:
            await asyncio.wait({receiver}, timeout=2)  # the receiver reports how the connection ended
            if not receiver.done():
                st.errors.append(f"sending failed: {type(e).__name__}: {e}")
        except TimeoutError:
            st.errors.append("timed out sending or waiting for the last frames")
        finally:
            done_sending.set()
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    finally:
        try:
            await asyncio.wait_for(ws.close(), 3)
        except Exception:  # noqa: BLE001 - the server is gone: nothing left to close
            pass


def aggregate(stats: list[SessionStats]) -> dict:
    rows = [s.summary() for s in stats]
    lags = np.concatenate([s.lags() for s in stats] or [np.zeros(0)])
    gaps = np.concatenate([s.gaps() for s in stats] or [np.zeros(0)])
    hs = np.array([s.handshake_s for s in stats if s.handshake_s is not None])
    rt = sum(r["real_time"] for r in rows)
    return dict(sessions=len(stats), handshakes=len(hs), refusals=sum(r["refusal"] is not None for r in rows),
                sessions_with_errors=sum(bool(r["errors"]) for r in rows), errors=sum(len(r["errors"]) for r in rows),
                handshake_median_ms=_q(hs, 50), handshake_max_ms=_q(hs, 100),
                frames_sent=sum(r["frames_sent"] for r in rows),
                frames_received=sum(r["frames_received"] for r in rows),
                lag_median_ms=_q(lags, 50), lag_p99_ms=_q(lags, 99), gap_p99_ms=_q(gaps, 99),
                gap_max_ms=_q(gaps, 100), gaps_over_100ms=int((gaps > GAP_LIMIT_S).sum()),
                real_time_sessions=rt, real_time_fraction=rt / len(stats) if stats else 0.0,
                all_real_time=bool(stats) and rt == len(stats))


async def run_round(url: str, sessions: int, duration: float | list[float], wavs: list[np.ndarray],
                    voice: str | None = None, text_prompt: str | None = None, seed: int | None = 0, ramp: float = 0.0,
                    api_key: str | None = None, handshake_timeout: float = 30.0, endpoint: str = "chat",
                    spread: float = 0.0) -> dict:
    """One round of `sessions` concurrent sessions (session i streams duration[i % len] seconds and
    starts at ramp * i / sessions plus a random share of `spread`, so sessions are not in lockstep);
    returns {"sessions": [...], "aggregate": {...}, "server": {...}}, the last from the server's
    /metrics sampled every second (its CPU, GPU memory and live sessions over the round)."""
    import resource

    durations = list(duration) if isinstance(duration, (list, tuple)) else [duration]
    rng = np.random.default_rng(seed if seed is not None and seed >= 0 else None)
    offsets = [ramp * i / sessions + (float(rng.uniform(0, spread)) if spread > 0 else 0.0) for i in range(sessions)]
    stats = [SessionStats(i) for i in range(sessions)]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    sampler = asyncio.create_task(sample_server(url))
    tasks = [asyncio.create_task(run_session(
        st, chat_url(url, voice, text_prompt, None if seed is None or seed < 0 else seed + st.index, endpoint),
        wavs[st.index % len(wavs)], durations[st.index % len(durations)], offsets[st.index], api_key,
        handshake_timeout)) for st in stats]
    budget = max(offsets, default=0) + handshake_timeout + max(durations) + DRAIN_S + SEND_TIMEOUT_S + 10
    _, late = await asyncio.wait(tasks, timeout=budget)
    for t in late:  # cannot happen with the timeouts above; never hang anyway
        t.cancel()
        stats[tasks.index(t)].errors.append("session cancelled at the round's deadline")
    await asyncio.gather(*tasks, return_exceptions=True)
    sampler.cancel()
    samples = await asyncio.gather(sampler, return_exceptions=True)
    samples = samples[0] if isinstance(samples[0], list) else []
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    agg = aggregate(stats)
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    agg["client_cpu_s"] = round(client_cpu, 3)
    agg["client_cpu_ms_per_frame"] = round(client_cpu * 1e3 / agg["frames_sent"], 3) if agg["frames_sent"] else None
    return dict(sessions=[s.summary() for s in stats], aggregate=agg, server=server_summary(samples, agg))


SAMPLED = ("process_cpu_seconds_total", "ppx_frames_total", "ppx_gpu_memory_bytes", "ppx_live_sessions")


async def sample_server(url: str, every: float = 1.0) -> list[dict]:
    """The server's /metrics, every `every` seconds until cancelled: [{t, name: value}]."""
    import urllib.request

    u = urlsplit(url)
    metrics = urlunsplit(("https" if u.scheme == "wss" else "http", u.netloc, "/metrics", "", ""))
    out: list[dict] = []

    def get() -> dict:
        with urllib.request.urlopen(metrics, timeout=2) as r:
            text = r.read().decode()
        row = {"t": time.monotonic()}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in SAMPLED:
                row[name] = float(value)
        return row

    try:
        while True:
            try:
                out.append(await asyncio.to_thread(get))
            except OSError:
                pass  # the server is busy or gone: a missing sample
            await asyncio.sleep(every)
    except asyncio.CancelledError:
        return out


def server_summary(samples: list[dict], agg: dict) -> dict:
    """The server's CPU per session-frame over the round, and its GPU memory and live sessions."""
    out: dict = {"samples": len(samples)}
    cpu = [s for s in samples if "process_cpu_seconds_total" in s and "ppx_frames_total" in s]
    if len(cpu) >= 2:
        d = cpu[-1]["process_cpu_seconds_total"] - cpu[0]["process_cpu_seconds_total"]
        frames = cpu[-1]["ppx_frames_total"] - cpu[0]["ppx_frames_total"]
        span = cpu[-1]["t"] - cpu[0]["t"]
        out["cpu_s"] = round(d, 3)
        out["cpu_cores_busy"] = round(d / span, 3) if span > 0 else None
        # over the frames the server stepped meanwhile (every client's: several load-client
        # processes may share a round)
        out["cpu_ms_per_session_frame"] = round(d * 1e3 / frames, 3) if frames else None
    mem = [s["ppx_gpu_memory_bytes"] for s in samples if "ppx_gpu_memory_bytes" in s]
    if mem:
        out["gpu_memory_GB_max"] = round(max(mem) / 1e9, 3)
        out["gpu_memory_GB"] = [round(m / 1e9, 3) for m in mem]
    live = [s["ppx_live_sessions"] for s in samples if "ppx_live_sessions" in s]
    if live:
        out["live_sessions_max"] = int(max(live))
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)


def print_round(res: dict, out=sys.stdout) -> None:
    cols = ["session", "handshake_ms", "frames_sent", "frames_received", "lag_median_ms", "lag_p99_ms",
            "gap_p99_ms", "gap_max_ms", "gaps_over_100ms"]
    heads = ["#", "hs ms", "sent", "recv", "lag p50", "lag p99", "gap p99", "gap max", ">100ms", "status"]
    print("  ".join(f"{h:>8}" for h in heads), file=out)
    for r in res["sessions"]:
        status = ("refused: " + r["refusal"] if r["refusal"] else "error: " + r["errors"][0][:60] if r["errors"]
                  else "real time" if r["real_time"] else "NOT real time")
        if r["client_behind"]:
            status += f" (the client itself fell behind by up to {_f(r['send_late_max_ms'])} ms)"
        print("  ".join(f"{_f(r[c]):>8}" for c in cols) + f"  {status}", file=out)
    a = res["aggregate"]
    print(f"all: {a['handshakes']}/{a['sessions']} handshakes (median {_f(a['handshake_median_ms'])} ms), "
          f"{a['refusals']} refused, {a['errors']} errors; frames {a['frames_sent']} sent, "
          f"{a['frames_received']} received; lag p50 {_f(a['lag_median_ms'])} ms, p99 {_f(a['lag_p99_ms'])} ms; "
          f"gap p99 {_f(a['gap_p99_ms'])} ms, max {_f(a['gap_max_ms'])} ms, {a['gaps_over_100ms']} over 100 ms; "
          f"real time {a['real_time_sessions']}/{a['sessions']}", file=out)
    behind = sum(r["client_behind"] for r in res["sessions"])
    srv = res.get("server", {})
    print(f"clients: {a.get('client_cpu_ms_per_frame', '-')} ms CPU per session-frame, {behind} session(s) whose "
          f"client fell a frame behind its own pacing; server: {srv.get('cpu_ms_per_session_frame', '-')} ms CPU per "
          f"session-frame, GPU memory max {srv.get('gpu_memory_GB_max', '-')} GB", file=out)


async def amain(args) -> dict:
    wavs = [load_wav(p) for p in args.wav]
    counts = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.sessions]
    kw = dict(voice=args.voice, text_prompt=args.text_prompt, seed=args.seed, ramp=args.ramp, spread=args.spread,
              api_key=args.api_key, handshake_timeout=args.handshake_timeout, endpoint=args.endpoint)
    rounds = []
    for i, n in enumerate(counts):
        if i:
            await asyncio.sleep(1.0)  # let the server free the last round's slots
        print(f"== {n} session(s) for {args.duration} s against {args.url}", flush=True)
        res = await run_round(args.url, n, args.durations, wavs, **kw)
        print_round(res)
        rounds.append(dict(count=n, **res))
    report = dict(url=args.url, endpoint=args.endpoint, duration_s=args.durations, spread_s=args.spread,
                  rounds=rounds)
    if args.sweep:
        ok = [r["count"] for r in rounds if r["aggregate"]["all_real_time"]]
        report["max_real_time_sessions"] = max(ok, default=0)
        print("\nsweep: " + ", ".join(f"{r['count']}: {'real time' if r['aggregate']['all_real_time'] else 'NO'}"
                                      for r in rounds) + f"\nlargest all-real-time count: {max(ok, default=0)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load_client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="ws://host:port (the endpoint's path is added when missing)")
    ap.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat",
                    help="chat: /api/chat, Ogg-Opus (default); realtime: /v1/realtime, base64 PCM16 in JSON events")
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--duration", default="10",
                    help="seconds of audio each session streams; a list such as 60,300 gives session i the "
                         "(i mod n)-th length")
    ap.add_argument("--wav", action="append", required=True, help="input audio, looped; repeat to vary by session")
    ap.add_argument("--voice", help="voice_prompt query parameter (default: the server's)")
    ap.add_argument("--text-prompt", help="text_prompt query parameter (default: the server's)")
    ap.add_argument("--seed", type=int, default=0, help="session i gets seed + i (-1: leave it to the server)")
    ap.add_argument("--ramp", type=float, default=0.0, help="start the sessions evenly over this many seconds")
    ap.add_argument("--spread", type=float, default=0.0,
                    help="and each at a random extra delay within this many seconds (seeded by --seed)")
    ap.add_argument("--api-key", help="sent as X-API-Key")
    ap.add_argument("--handshake-timeout", type=float, default=30.0)
    ap.add_argument("--sweep", help="comma-separated session counts, one round each (e.g. 1,2,4,8)")
    ap.add_argument("--json", help="write every number (per session and aggregate) to this file")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.durations = [float(d) for d in str(args.duration).split(",")]
    except ValueError:
        args.durations = []
    if args.sessions < 1 or not args.durations or min(args.durations) <= 0 or args.spread < 0:
        print("--sessions must be >= 1, every --duration > 0 and --spread >= 0", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(amain(args))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"load_client: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if all(r["aggregate"]["handshakes"] for r in report["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
