"""`ppx-serve`: the websocket daemon. Many live sessions share one GPU: a tick thread gathers
one 80 ms frame from every session that has one and runs them as one batched `Engine.step`.

A session opens (prompt phase) at a tick boundary and joins the batch when its prompt is
done; a session whose audio is late is simply not in that tick, so it never delays anyone,
and nobody gets a frame of audio before the frame of their own input that produced it.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import http
import json
import logging
import os
import queue
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from engine.config import DEFAULT_TEXT_PROMPT
from engine.errors import UserError
from .common import add_model_args, load_engine, run_main, setup_logging
from .ogg_opus import OggError, OggOpusReader, OggOpusWriter
from .protocol import (AUDIO, CLOSE_BAD_DATA, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_LATER, CONTROL, ERROR,
                       HANDSHAKE, METADATA, PING, TEXT, ProtocolError, parse_chat_query)

log = logging.getLogger("ppx.serve")

STATIC = Path(__file__).parent / "static"
MAX_MESSAGE = 1 << 20          # bytes in one websocket message
# No permessage-deflate: the audio is Opus, which does not compress, and deflating every frame
# both ways costs the event loop CPU time (PPX_WS_COMPRESSION=deflate offers it again).
COMPRESSION = "deflate" if os.environ.get("PPX_WS_COMPRESSION") == "deflate" else None
MAX_QUEUED_FRAMES = 25         # 2 s of input ahead of the model: more is faster than real time
SEND_BUFFER = 64 << 10         # socket send buffer: a few seconds of Opus, so a stalled client shows
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8",
                 ".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
                 ".wasm": "application/wasm", ".map": "application/json", ".txt": "text/plain"}


@dataclass
class Metrics:
    sessions_total: int = 0
    refusals: int = 0
    errors: int = 0
    late_frames: int = 0
    ticks: int = 0
    tick_seconds: float = 0.0
    frames: int = 0
    tick_window: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))
    # per frame, seconds from the input frame being complete to its tick starting, and to its
    # answer being queued for sending (the tick and the encoding included)
    wait_window: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4000))
    answer_window: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4000))


def _quantiles(window: collections.deque, ps=(0.5, 0.99)) -> list[float]:
    w = sorted(window.copy())  # a deque's copy is atomic; other threads append meanwhile
    return [w[min(len(w) - 1, int(p * len(w)))] if w else 0.0 for p in ps]


class Session:
    """One client: its slot, codec state, and the frames between the socket and the ticks."""

    def __init__(self, ws, request, loop, max_outbox: int, opus_complexity: int | None = None):
        self.id = secrets.token_hex(4)
        self.ws = ws
        self.request = request
        self.loop = loop
        self.slot: int | None = None
        self.reader = OggOpusReader(24000)
        self.writer = OggOpusWriter(24000, complexity=opus_complexity)
        self.pending = np.zeros(0, dtype=np.float32)
        self.frames: collections.deque = collections.deque()   # (pcm, time the frame was complete)
        self.outbox: asyncio.Queue = asyncio.Queue(maxsize=max_outbox)
        self.frames_out = 0
        self.late = 0
        self.prompt_tokens = 0
        self.closed = False
        self.error: str | None = None
        self.codec = 0                 # which codec thread encodes this session's answers


class TickLoop(threading.Thread):
    """The only thread that touches the engine: opens and closes slots between ticks, and
    runs each tick over the sessions that have a frame."""

    def __init__(self, server):
        super().__init__(name="ppx-tick", daemon=True)
        self.server = server
        self.engine = server.engine
        self.wake = threading.Event()
        self.opens: queue.Queue = queue.Queue()
        self.closes: queue.Queue = queue.Queue()
        self.live: dict[int, Session] = {}
        self.stopping = False

    def run(self) -> None:
        try:
            next_tick = 0.0
            while not self.stopping:
                self._service()
                ready = [s for s in self.live.values() if s.frames]
                if not ready:
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                # Ticks follow a fixed cadence (a tick as soon as every live session has a
                # frame): each session's frames then wait a steady share of the period, so its
                # answers come back evenly spaced, and sessions at any phase share the ticks.
                while len(ready) < len(self.live) and time.monotonic() < next_tick and not self.stopping:
                    self.wake.wait(next_tick - time.monotonic())
                    self.wake.clear()
                    self._service()
                    ready = [s for s in self.live.values() if s.frames]
                next_tick = time.monotonic() + self.server.tick_period
                ready = [s for s in self.live.values() if s.frames]
                if ready:
                    self._tick(ready)
        except Exception:  # the engine failed: nothing can be served any more
            log.exception("the tick loop failed")
            self.server.loop.call_soon_threadsafe(self.server.fatal)

    def _tick(self, ready: list[Session]) -> None:
        m = self.server.metrics
        frames, born = {}, {}
        for s in ready:
            pcm, t = s.frames.popleft()
            frames[s.slot], born[s.slot] = pcm, t
        t0 = time.monotonic()
        outs = self.engine.step(frames)
        t1 = time.monotonic()
        m.ticks += 1
        m.frames += len(frames)
        m.tick_seconds += t1 - t0
        m.tick_window.append(t1 - t0)
        for s in ready:
            m.wait_window.append(t0 - born[s.slot])
            late = t1 - born[s.slot] > self.server.frame_seconds
            self.server.deliver(s, outs[s.slot], late, born[s.slot])

    def _service(self) -> None:
        while True:
            try:
                s = self.closes.get_nowait()
            except queue.Empty:
                break
            if s.slot is not None and self.live.get(s.slot) is s:
                del self.live[s.slot]
                self.engine.close(s.slot)
        batch = []
        while True:
            try:
                batch.append(self.opens.get_nowait())
            except queue.Empty:
                break
        if batch:
            self._open(batch)

    def _open(self, batch) -> None:
        ok, reqs = [], []
        for s, fut in batch:
            try:
                voice = self.server.voice(s.request.voice)
                reqs.append((voice, s.request.text_prompt, s.request.sampling))
                ok.append((s, fut))
            except Exception as e:  # noqa: BLE001 - reported to that client only
                s.loop.call_soon_threadsafe(_settle, fut, None, e)
        if not ok:
            return
        try:
            slots = self.engine.open_many(reqs)
        except Exception:
            # one bad request fails the batch: open the rest one by one
            slots = []
            for (s, fut), req in zip(ok, reqs):
                try:
                    slots.append(self.engine.open_many([req])[0])
                except Exception as e:  # noqa: BLE001
                    slots.append(None)
                    s.loop.call_soon_threadsafe(_settle, fut, None, e)
        for (s, fut), slot in zip(ok, slots):
            if slot is None:
                continue
            if s.closed:  # the client left during its prompt phase
                self.engine.close(slot)
                continue
            s.slot = slot
            s.prompt_tokens = self.engine.slots[slot].prompt_tokens
            self.live[slot] = s
            s.loop.call_soon_threadsafe(_settle, fut, slot, None)


def _settle(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class CodecThreads:
    """Threads that Opus-encode the sessions' answers. The encoder (C, called through ctypes,
    which releases the GIL) is most of a session's host work, so it runs here in parallel
    instead of on the event loop; a session always uses the same thread, which keeps its
    stream in order."""

    def __init__(self, n: int):
        self.queues = [queue.SimpleQueue() for _ in range(max(1, n))]
        self.threads = [threading.Thread(target=self._run, args=(q,), name=f"ppx-codec-{i}", daemon=True)
                        for i, q in enumerate(self.queues)]
        self._next = 0

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def assign(self) -> int:
        self._next += 1
        return self._next % len(self.queues)

    def submit(self, index: int, fn, *args) -> None:
        self.queues[index].put((fn, args))

    def stop(self) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=2)

    @staticmethod
    def _run(q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - the job reports its own session's failure
                log.exception("codec job failed")


class Server:
    def __init__(self, engine, args):
        self.engine = engine
        self.args = args
        self.metrics = Metrics()
        self.frame_seconds = engine.frame_size / engine.sample_rate
        self.frame_size = engine.frame_size
        self.tick_period = args.tick_period_ms / 1000
        # messages (an audio page and a text piece per frame) a client may leave unread
        self.max_outbox = max(4, int(2 * args.client_buffer_seconds / self.frame_seconds))
        self.max_sessions = args.max_sessions
        self.api_key = args.api_key or os.environ.get("PPX_API_KEY") or None
        self.static = Path(args.static) if args.static else STATIC
        self.sessions: set[Session] = set()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self.ticker = TickLoop(self)
        self.codec = CodecThreads(args.codec_threads)
        self._voices: dict[str, object] = {}
        from voices import VoiceLibrary, hub_voice_dir
        vdir = args.voice_prompt_dir or hub_voice_dir(args.hf_repo)
        self.library = VoiceLibrary(vdir)

    # -------------------------------------------------------------------------------
    # voices (called on the tick thread)

    def voice(self, name: str | None):
        from voices import UnknownVoice, load_voice
        if name is None:
            return None
        try:
            path = self.library.find(name)
        except UnknownVoice:
            # the client learns the names it may use, not where the server keeps them
            shown = repr(name) if len(name) <= 64 else "that name"
            names = ", ".join(self.library.names())
            raise ProtocolError(f"voice {shown} is not available (voices: {names})") from None
        key = str(path)
        if key not in self._voices:
            if len(self._voices) > 256:
                self._voices.clear()
            try:
                self._voices[key] = load_voice(path, self.engine)
            except UserError as e:
                log.warning("voice %s cannot be used: %s", name, e)
                raise ProtocolError(f"voice {name!r} cannot be used by this model") from None
        return self._voices[key]

    # -------------------------------------------------------------------------------
    # HTTP side

    def _authorized(self, request, query: str) -> bool:
        if not self.api_key:
            return True
        got = request.headers.get("X-API-Key") or ""
        auth = request.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            got = got or auth[7:].strip()
        got = got or (parse_qs(query).get("api_key") or [""])[-1]
        return secrets.compare_digest(got.encode(), self.api_key.encode())

    def process_request(self, connection, request):
        url = urlsplit(request.path)
        path = url.path
        if path == "/api/chat":
            if not self._authorized(request, url.query):
                self.metrics.refusals += 1
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "a valid API key is required\n")
            if self.stopping:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down\n")
            return None
        if path == "/health":
            ok = not self.stopping and self.ticker.is_alive()
            return connection.respond(http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      "ready\n" if ok else "not ready\n")
        if path == "/metrics":
            return self._text(connection, self.prometheus(), "text/plain; version=0.0.4")
        if path == "/api/voices":
            return self._text(connection, json.dumps({"voices": self.library.names()}), "application/json")
        return self._static(connection, path)

    @staticmethod
    def _text(connection, body: str | bytes, ctype: str):
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        data = body.encode("utf-8") if isinstance(body, str) else body
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(data))),
                           ("Cache-Control", "no-store")])
        return Response(200, "OK", headers, data)

    def _static(self, connection, path: str):
        rel = "index.html" if path in ("", "/") else path.lstrip("/")
        root = self.static.resolve()
        target = (root / rel).resolve()
        if "\x00" in rel or (root not in target.parents) or not target.is_file():
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        return self._text(connection, target.read_bytes(), CONTENT_TYPES.get(target.suffix, "application/octet-stream"))

    def prometheus(self) -> str:
        m = self.metrics

        def summary(name: str, help_: str, window, extra=()) -> list[str]:
            q50, q99 = _quantiles(window)
            return [f"# HELP {name} {help_}", f"# TYPE {name} summary", f'{name}{{quantile="0.5"}} {q50:.6f}',
                    f'{name}{{quantile="0.99"}} {q99:.6f}', *extra]

        lines = [
            "# HELP ppx_live_sessions Sessions past their prompt phase.", "# TYPE ppx_live_sessions gauge",
            f"ppx_live_sessions {sum(1 for s in self.sessions if s.slot is not None and not s.closed)}",
            "# HELP ppx_connections Open websocket connections.", "# TYPE ppx_connections gauge",
            f"ppx_connections {len(self.sessions)}",
            "# HELP ppx_free_slots Free session slots of the engine.", "# TYPE ppx_free_slots gauge",
            f"ppx_free_slots {self.engine.max_slots - len(self.engine.slots)}",
            "# TYPE ppx_sessions_total counter", f"ppx_sessions_total {m.sessions_total}",
            "# TYPE ppx_refusals_total counter", f"ppx_refusals_total {m.refusals}",
            "# TYPE ppx_errors_total counter", f"ppx_errors_total {m.errors}",
            "# HELP ppx_late_frames_total Frames answered more than one frame period after their input.",
            "# TYPE ppx_late_frames_total counter", f"ppx_late_frames_total {m.late_frames}",
            "# TYPE ppx_frames_total counter", f"ppx_frames_total {m.frames}",
            *summary("ppx_tick_seconds", "Engine step time per tick (recent ticks).", m.tick_window,
                     (f"ppx_tick_seconds_sum {m.tick_seconds:.6f}", f"ppx_tick_seconds_count {m.ticks}")),
            *summary("ppx_frame_wait_seconds", "From an input frame being complete to its tick starting "
                     "(recent frames).", m.wait_window),
            *summary("ppx_answer_seconds", "From an input frame being complete to its answer being queued "
                     "for sending: the wait, the tick and the Opus encoding (recent frames).", m.answer_window),
            "# TYPE ppx_tasks gauge", f"ppx_tasks {len(asyncio.all_tasks(self.loop)) if self.loop else 0}",
        ]
        return "\n".join(lines) + "\n"

    # -------------------------------------------------------------------------------
    # websocket side

    async def handler(self, ws) -> None:
        url = urlsplit(ws.request.path)
        if url.path != "/api/chat":
            await ws.close(CLOSE_POLICY, "unknown path")
            return
        s: Session | None = None
        try:
            if len(self.sessions) >= self.max_sessions:
                self.metrics.refusals += 1
                raise ProtocolError(f"the server is full ({self.max_sessions} sessions); try again later",
                                    CLOSE_TRY_LATER)
            req = parse_chat_query(url.query, self.defaults, self.args.voice_prompt, self.args.text_prompt)
            if req.voice is not None and ("\x00" in req.voice or "/" in req.voice or "\\" in req.voice):
                raise ProtocolError("voice_prompt must be a voice name from /api/voices")
            s = Session(ws, req, self.loop, self.max_outbox, self.args.opus_complexity)
            s.codec = self.codec.assign()
            self.sessions.add(s)
            fut = self.loop.create_future()
            self.ticker.opens.put((s, fut))
            self.ticker.wake.set()
            try:
                await fut
            except UserError as e:
                raise ProtocolError(str(e)) from None
            if self.stopping:
                raise ProtocolError("the server is shutting down", CLOSE_GOING_AWAY)
            self.metrics.sessions_total += 1
            log.info("session %s started: voice %s, %d prompt tokens, slot %d", s.id, req.voice or "none",
                     s.prompt_tokens, s.slot)
            sock = ws.transport.get_extra_info("socket") if getattr(ws, "transport", None) else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            await ws.send(bytes([HANDSHAKE]))
            sender = asyncio.create_task(self._sender(s))
            try:
                await self._receive(s)
            finally:
                sender.cancel()
        except ProtocolError as e:
            await self._fail(ws, s, str(e), e.close_code)
        except OggError as e:
            await self._fail(ws, s, f"bad audio stream: {e}", CLOSE_BAD_DATA)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a connection error ends this session only
            if s is not None and s.error:
                await self._fail(ws, s, s.error, CLOSE_POLICY)
            elif not _is_disconnect(e):
                log.exception("session %s failed", s.id if s else "-")
                await self._fail(ws, s, "internal error", 1011)
        finally:
            self._end(s)

    async def _receive(self, s: Session) -> None:
        async for msg in s.ws:
            if s.error:
                raise ProtocolError(s.error)
            if isinstance(msg, str) or not msg:
                raise ProtocolError("messages must be binary with a kind byte")
            kind = msg[0]
            if kind == AUDIO:
                s.reader.append_bytes(bytes(msg[1:]))
                pcm = s.reader.read_pcm()
                if pcm.size:
                    self._push_audio(s, pcm)
            elif kind in (PING, CONTROL, METADATA):
                continue  # nothing the server needs to act on
            else:
                raise ProtocolError(f"unknown message kind 0x{kind:02x}")

    def _push_audio(self, s: Session, pcm: np.ndarray) -> None:
        buf = np.concatenate([s.pending, pcm]) if s.pending.size else pcm
        n = buf.shape[0] // self.frame_size
        now = time.monotonic()
        for i in range(n):
            s.frames.append((buf[i * self.frame_size:(i + 1) * self.frame_size].copy(), now))
        s.pending = buf[n * self.frame_size:].copy()
        if len(s.frames) > MAX_QUEUED_FRAMES:
            raise ProtocolError("audio is arriving faster than real time")
        if n:
            self.ticker.wake.set()

    def deliver(self, s: Session, out, late: bool, born: float) -> None:
        """One output frame of a session, from the tick thread: encoded on the session's codec
        thread, then queued for sending on the event loop. born: when its input frame was
        complete (time.monotonic)."""
        self.codec.submit(s.codec, self._encode, s, out, late, born)

    def _encode(self, s: Session, out, late: bool, born: float) -> None:
        """On a codec thread. A failure here ends that session (with an error) and nothing else."""
        if s.closed:
            return
        try:
            s.writer.append_pcm(out.pcm)
            msgs = []
            data = s.writer.read_bytes()
            if data:
                msgs.append(bytes([AUDIO]) + data)
            piece = self.engine.tokenizer.piece(out.text_id)
            if piece is not None:
                msgs.append(bytes([TEXT]) + piece.encode("utf-8"))
        except Exception as e:  # noqa: BLE001
            log.exception("session %s: encoding a frame failed", s.id)
            s.error = f"internal error while sending audio ({e.__class__.__name__})"
            s.loop.call_soon_threadsafe(self._abort, s)
            return
        s.loop.call_soon_threadsafe(self._enqueue, s, msgs, late, born)

    def _enqueue(self, s: Session, msgs: list[bytes], late: bool, born: float) -> None:
        if s.closed:
            return
        self.metrics.answer_window.append(time.monotonic() - born)
        s.frames_out += 1
        if late:
            s.late += 1
            self.metrics.late_frames += 1
        for m in msgs:
            try:
                s.outbox.put_nowait(m)
            except asyncio.QueueFull:
                s.error = "the client is not reading its audio"
                self._abort(s)
                return

    async def _sender(self, s: Session) -> None:
        while True:
            m = await s.outbox.get()
            await s.ws.send(m)

    def _abort(self, s: Session) -> None:
        """Drops a connection whose client does not read (a close handshake could not be sent)."""
        if s.closed:
            return
        self.metrics.errors += 1
        log.info("session %s: %s", s.id, s.error)
        transport = getattr(s.ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def _fail(self, ws, s: Session | None, message: str, code: int) -> None:
        self.metrics.errors += 1
        log.info("session %s refused or ended: %s", s.id if s else "-", message)
        try:
            await asyncio.wait_for(ws.send(bytes([ERROR]) + message.encode("utf-8")), 1.0)
            await asyncio.wait_for(ws.close(code, message[:120]), 2.0)
        except Exception:  # noqa: BLE001 - the client is gone or not reading
            transport = getattr(ws, "transport", None)
            if transport is not None:
                transport.abort()

    def _end(self, s: Session | None) -> None:
        if s is None or s.closed:
            return
        s.closed = True
        self.sessions.discard(s)
        if s.slot is not None:
            self.ticker.closes.put(s)
            self.ticker.wake.set()
            log.info("session %s ended: voice %s, %d prompt tokens, %d frames, %d late", s.id,
                     s.request.voice or "none", s.prompt_tokens, s.frames_out, s.late)
        else:
            # its open may still be queued: the tick thread closes it once it lands
            self.ticker.closes.put(s)

    def fatal(self) -> None:
        self.stopping = True
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    # -------------------------------------------------------------------------------

    @property
    def defaults(self):
        from engine.engine import SamplingParams
        a = self.args
        return SamplingParams(temp_text=a.temp_text, temp_audio=a.temp_audio, topk_text=a.topk_text,
                              topk_audio=a.topk_audio, greedy=a.greedy, seed=a.seed)

    async def serve(self) -> None:
        import websockets
        import websockets.http11
        from websockets.asyncio.server import serve

        websockets.http11.MAX_LINE_LENGTH = max(websockets.http11.MAX_LINE_LENGTH, 256 * 1024)  # long role prompts
        self.loop = asyncio.get_running_loop()
        self._stop = self.loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.loop.add_signal_handler(sig, self.fatal)
            except (NotImplementedError, RuntimeError):
                pass
        self.codec.start()
        self.ticker.start()
        ssl_ctx = make_ssl_context(self.args.ssl) if self.args.ssl else None
        async with serve(self.handler, self.args.host, self.args.port, process_request=self.process_request,
                         max_size=MAX_MESSAGE, ssl=ssl_ctx, ping_interval=20, close_timeout=2,
                         server_header="ppx", compression=COMPRESSION) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            scheme = "https" if ssl_ctx else "http"
            log.info("serving on %s://%s:%d (up to %d sessions)", scheme, self.args.host, port, self.max_sessions)
            host = "localhost" if self.args.host in ("0.0.0.0", "::", "") else self.args.host
            log.info("open %s://%s:%d/ in a browser to talk to the model", scheme, host, port)
            print(f"PPX_READY port={port}", flush=True)
            await self._stop
            log.info("shutting down: %d sessions", len(self.sessions))
            self.stopping = True
            await asyncio.gather(*(self._fail(s.ws, s, "the server is shutting down", CLOSE_GOING_AWAY)
                                   for s in list(self.sessions)), return_exceptions=True)
            server.close()
        self.ticker.stopping = True
        self.ticker.wake.set()
        self.ticker.join(timeout=5)
        self.codec.stop()
        log.info("stopped")


def _is_disconnect(e: Exception) -> bool:
    from websockets.exceptions import ConnectionClosed
    return isinstance(e, (ConnectionClosed, ConnectionError, OSError))


def make_ssl_context(directory: str) -> ssl.SSLContext:
    """TLS from DIR/cert.pem and DIR/key.pem, made as a self-signed pair when missing."""
    d = Path(directory)
    cert, key = d / "cert.pem", d / "key.pem"
    if not (cert.exists() and key.exists()):
        d.mkdir(parents=True, exist_ok=True)
        _self_signed(cert, key)
        log.info("made a self-signed certificate in %s", d)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _self_signed(cert: Path, key: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ppx-serve")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=825))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
         .sign(k, hashes.SHA256()))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    os.chmod(key, 0o600)
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def step_threads(args) -> int:
    """Torch threads for a step on the CPU: the cores the codec threads leave (they run beside
    every tick, and intra-op threads that find no free core wait on each other), at least 1."""
    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            raise UserError(f"--cpu-threads must be at least 1 (got {args.cpu_threads})")
        return args.cpu_threads
    return max(1, cpu_cores() - args.codec_threads)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ppx-serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="localhost", help="address to listen on (default localhost)")
    ap.add_argument("--port", type=int, default=8998)
    ap.add_argument("--ssl", type=str, help="directory with cert.pem and key.pem (a self-signed pair is made there "
                                            "when missing)")
    ap.add_argument("--static", type=str, help="serve another client's built files instead of the built-in page")
    ap.add_argument("--max-sessions", type=int, default=None,
                    help="concurrent sessions (default: as many as the GPU memory holds, 1 on the CPU)")
    ap.add_argument("--api-key", type=str, help="require this key (header X-API-Key, 'Authorization: Bearer', or "
                                                "?api_key=) before the websocket upgrade; or set PPX_API_KEY")
    ap.add_argument("--voice-prompt", type=str, default=None, help="voice for sessions that name none")
    ap.add_argument("--voice-prompt-dir", type=str, help="directory of voice prompts (default: the hub's voices)")
    ap.add_argument("--text-prompt", type=str, default=DEFAULT_TEXT_PROMPT, help="role prompt for sessions that send none")
    ap.add_argument("--seed", type=int, default=-1)
    ap.add_argument("--temp-audio", type=float, default=0.8)
    ap.add_argument("--temp-text", type=float, default=0.7)
    ap.add_argument("--topk-audio", type=int, default=250)
    ap.add_argument("--topk-text", type=int, default=25)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--tick-period-ms", type=float, default=20.0,
                    help="ticks start at most this often unless every session has a frame (default 20 ms: "
                         "a frame waits at most that long for others to share its tick)")
    ap.add_argument("--client-buffer-seconds", type=float, default=5.0,
                    help="audio a client may leave unread before it is dropped (default 5 s)")
    ap.add_argument("--codec-threads", type=int, default=max(1, min(8, cpu_cores() // 2)),
                    help="threads that Opus-encode the answers (default: half the CPU cores, at most 8)")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="torch threads of the model's step when --device is cpu (default: the cores the codec "
                         "threads leave, at least 1). More threads than free cores made a step about 3x slower: "
                         "they wait on each other while the codec threads hold the cores")
    ap.add_argument("--opus-complexity", type=int, default=5, choices=range(11), metavar="0-10",
                    help="Opus encoder complexity of the answers (default 5). At 7 and above libopus also "
                         "analyses the signal, which made encoding about 4.5x slower here (1.09 against 0.24 ms of "
                         "host time per 80 ms frame of speech), the host's largest cost per session")
    ap.add_argument("--kv-window", type=int, default=None, help="frames of history per session (default: the "
                                                                "model's full context)")
    ap.add_argument("--random-weights", action="store_true",
                    help="serve random weights of the --config shapes (benchmarks only: the output is noise)")
    ap.add_argument("--demo", action="store_true",
                    help="serve a tiny model with random weights on the CPU, with a demo voice and the built-in page: "
                         "no HF_TOKEN or GPU needed (its output is noise, not speech)")
    add_model_args(ap)
    return ap


def demo_argv(argv: list[str]) -> list[str]:
    """`--demo`'s flags before the user's own (which win): the tiny demo model on the CPU, its
    voice directory and voice, two sessions."""
    from .demo import DEMO_VOICE, demo_model, demo_model_args

    paths = demo_model()
    return [*demo_model_args(paths), "--voice-prompt-dir", str(paths["voices"]), "--voice-prompt", DEMO_VOICE,
            "--max-sessions", "2", *argv]


def check_cpu_serving(args, device) -> None:
    """A 7B-sized model on the CPU cannot keep up with real time: it runs there only when
    `--device cpu` asks for it by name."""
    if device.type != "cpu" or args.device == "cpu":
        return
    from engine.lm import LM, count_parameters
    from .common import model_config

    params = count_parameters(LM(model_config(args).lm, device="meta"))
    if params > 1e9:
        raise UserError(f"no CUDA GPU is visible, and a model of {params / 1e9:.1f} B parameters does not run in real "
                        f"time on the CPU (an 80 ms frame takes seconds there): pass --device cpu to serve it anyway, "
                        f"or serve the tiny demo model with `ppx-serve --demo`")


def run(args) -> int:
    import torch

    from .common import resolve_device

    device = resolve_device(args.device)
    check_cpu_serving(args, device)
    if device.type == "cpu":
        threads = step_threads(args)
        torch.set_num_threads(threads)
        log.info("the step runs on the CPU with %d torch thread(s) beside %d codec thread(s) on %d core(s)",
                 threads, args.codec_threads, cpu_cores())
    if args.no_cuda_graphs:
        os.environ["PPX_CUDA_GRAPHS"] = "0"
    if args.random_weights:
        from engine.config import get_preset, load_config
        from engine.random_weights import random_engine
        cfg = load_config(args.config) if args.config else get_preset("personaplex-7b-v1")
        if not args.tokenizer:
            raise UserError("--random-weights needs --tokenizer (any SentencePiece model)")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if args.quantize == "fp8" or args.kv_cache_dtype == "fp8":
            from engine.quant import check_fp8_device
            check_fp8_device(device)
        engine = random_engine(cfg, args.tokenizer, device=device, dtype=dtype, max_slots=args.max_sessions,
                               kv_window=args.kv_window, quantize=None if args.quantize == "none" else args.quantize,
                               kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype)
        if device.type == "cuda" and os.environ.get("PPX_CUDA_GRAPHS", "1") != "0":
            engine.enable_graphs()
        log.warning("serving RANDOM weights (%s): the agent's audio is noise", cfg.name)
    else:
        engine = load_engine(args, max_slots=args.max_sessions)
    args.max_sessions = engine.max_slots
    server = Server(engine, args)
    asyncio.run(server.serve())
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per session is ours

    def body() -> int:
        nonlocal args
        if args.demo:
            given = [f for f in ("moshi_weight", "mimi_weight", "tokenizer", "config") if getattr(args, f)]
            if given or args.random_weights:
                raise UserError("--demo serves its own tiny model: drop --" + (given[0].replace("_", "-") if given
                                                                                 else "random-weights"))
            args = build_parser().parse_args(demo_argv(argv))
            log.warning("DEMO: a tiny model with random weights on the CPU; its output is noise, not speech "
                        "(the real model: set HF_TOKEN and run on a GPU without --demo)")
        return run(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
