"""A session of `/api/chat`: the websocket handler, the session's codec state, and the rules
that keep one client from hurting the others.

* **Pacing** is judged by the client's own sending: a token bucket over the arrival of its audio
  frames, refilled at real time, holding up to `burst_seconds` of audio. A client back from a
  network stall that sends what it held is served; one that keeps sending several times faster
  than real time is refused (0x05, 1008).
* **A slow reader** is dropped once more than `client_buffer_seconds` of answers wait on the
  server's side for it: in its outbox, in the websocket's write buffer and in the socket's send
  queue (the client's own receive buffer is beyond the server's sight).
* **An idle client** (no audio for `idle_timeout` seconds) is closed, freeing its slot.
* Answers are Opus-encoded on codec threads, not on the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import queue
import secrets
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from engine.engine import EngineFull
from engine.errors import UserError

from ..ogg_opus import OggOpusReader, OggOpusWriter
from ..protocol import (AUDIO, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_LATER, CONTROL, ERROR, HANDSHAKE, METADATA,
                        PING, TEXT, ProtocolError)
from .scheduler import OpenRequest

log = logging.getLogger("ppx.serve")

TIOCOUTQ = 0x5411        # Linux: bytes in a socket's send queue not yet acknowledged by the peer
WS_FRAME_OVERHEAD = 4    # bytes of websocket framing per server message (unmasked, under 64 KiB)


@dataclass
class SessionLimits:
    frame_seconds: float
    burst_seconds: float = 8.0
    client_buffer_seconds: float = 5.0
    idle_timeout: float = 300.0


class Pacing:
    """A token bucket over a client's audio frames: `burst` frames of allowance, refilled at one
    frame per frame period. `take(n)` is False once the client has sent more than real time
    allows, the burst included."""

    def __init__(self, frame_seconds: float, burst_seconds: float):
        self.rate = 1.0 / frame_seconds
        self.capacity = max(1.0, burst_seconds / frame_seconds)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return self.tokens >= 0


class CodecThreads:
    """Threads that Opus-encode the sessions' answers. The encoder (C, called through ctypes,
    which releases the GIL) is most of a session's host work, so it runs here in parallel
    instead of on the event loop; a session always uses the same thread, which keeps its stream
    in order. A job returns what the event loop should then do (`(loop, fn, *args)`, or None);
    a thread takes the jobs waiting for it (a tick's answers arrive together) and wakes the
    event loop once per `POST_EVERY` of them, so that no answer waits long for the others."""

    POST_EVERY = 8

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
            jobs = [q.get()]
            while len(jobs) < CodecThreads.POST_EVERY and not q.empty():
                jobs.append(q.get())
            posts: dict = {}   # loop -> what it should run
            for job in jobs:
                if job is None:
                    break
                fn, args = job
                try:
                    then = fn(*args)
                except Exception:  # noqa: BLE001 - the job reports its own session's failure
                    log.exception("codec job failed")
                    continue
                if then is not None:
                    posts.setdefault(then[0], []).append(then[1:])
            for loop, calls in posts.items():
                try:
                    loop.call_soon_threadsafe(_run_all, calls)
                except RuntimeError:   # (the loop has closed: the server is stopping)
                    pass
            if any(job is None for job in jobs):
                return


def _run_all(calls: list) -> None:
    for fn, *args in calls:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - one session's failure is not the others'
            log.exception("handling an encoded frame failed")


class Outbox:
    """Messages waiting for one client, and how many seconds of its audio wait on the server's
    side in all: here, in the websocket's write buffer, and in the socket's send queue."""

    def __init__(self, ws, frame_seconds: float):
        self.ws = ws
        self.frame_seconds = frame_seconds
        self.queue: asyncio.Queue = asyncio.Queue()
        self.written = 0           # bytes handed to the transport
        self.frame_ends: collections.deque = collections.deque()   # `written` at the end of each frame
        self.queued_frames = 0     # frames in `queue`
        self.wake = asyncio.Event()
        transport = getattr(ws, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        self._transport = transport
        self._fd = sock.fileno() if sock is not None else None

    def put(self, msgs: list[bytes]) -> None:
        """One frame's messages."""
        self.queue.put_nowait(msgs)
        self.queued_frames += 1

    def unsent_bytes(self) -> int:
        n = self._transport.get_write_buffer_size() if self._transport is not None else 0
        if self._fd is not None:
            try:
                n += struct.unpack("i", fcntl.ioctl(self._fd, TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass
        return n

    def waiting_seconds(self) -> float:
        """Seconds of answers the client has not taken off the server's hands."""
        left = self.written - self.unsent_bytes()
        while self.frame_ends and self.frame_ends[0] <= left:
            self.frame_ends.popleft()
        return (self.queued_frames + len(self.frame_ends)) * self.frame_seconds

    async def run(self) -> None:
        while True:
            msgs = await self.queue.get()
            self.queued_frames -= 1
            for m in msgs:
                await self.ws.send(m)
                self.written += len(m) + WS_FRAME_OVERHEAD
            self.frame_ends.append(self.written)


class Session:
    """What every endpoint's session shares: its slot, pacing, outbox, idle timeout, and the
    scheduler's sink (`answer`, `behind`: the `scheduler.Sink` of this session). An endpoint
    says how its frames are written (`encode_frame`, on a codec thread), how an error is told
    (`error_message`) and how the client's messages are read (`serve`)."""

    endpoint = ""

    def __init__(self, server, ws):
        self.id = secrets.token_hex(4)
        self.server = server
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self.limits: SessionLimits = server.limits
        self.pacing = Pacing(self.limits.frame_seconds, self.limits.burst_seconds)
        self.outbox = Outbox(ws, self.limits.frame_seconds)
        self.pending = np.zeros(0, dtype=np.float32)
        self.codec = server.codec.assign()
        self.open: OpenRequest | None = None
        self.slot: int | None = None
        self.voice_name: str | None = None
        self.prompt_tokens = 0
        self.frames_out = 0
        self.late = 0
        self.dropped = 0
        self.closed = False
        self.reported = False      # its error was told (`Server.fail`)
        self.error: tuple[str, int] | None = None   # set off the event loop: (message, close code)
        self.last_audio = time.monotonic()

    # ------------------------------------------------------------------------------
    # what an endpoint says

    def encode_frame(self, out) -> list:
        """One output frame (`engine.FrameOut`) as the messages to send; on a codec thread."""
        raise NotImplementedError

    def error_message(self, message: str, code: int):
        """The message that tells the client about an error before its connection closes."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------
    # the scheduler's sink (tick thread)

    def answer(self, out, born: float, late: bool) -> None:
        if not out.valid:  # (a Moshi session's first frame: nothing to say yet, as Kyutai's server)
            return
        self.server.codec.submit(self.codec, self._encode, out, born, late)

    def behind(self, dropped: int) -> None:
        self.dropped += dropped

    # ------------------------------------------------------------------------------

    def _encode(self, out, born: float, late: bool):
        """On a codec thread: what the event loop then does with the frame (`CodecThreads`). A
        failure here ends this session (with an error) and nothing else."""
        if self.closed:
            return None
        try:
            msgs = self.encode_frame(out)
        except Exception as e:  # noqa: BLE001
            log.exception("session %s: encoding a frame failed", self.id)
            return self.loop, self._stop, f"internal error while sending audio ({e.__class__.__name__})", 1011
        return self.loop, self._enqueue, msgs, late, born

    def _enqueue(self, msgs: list, late: bool, born: float) -> None:
        if self.closed:
            return
        self.server.answer_window.append(time.monotonic() - born)
        self.frames_out += 1
        self.late += late
        self.outbox.put(msgs)
        if self.outbox.waiting_seconds() > self.limits.client_buffer_seconds:
            self._stop(f"the client is not reading its audio (over {self.limits.client_buffer_seconds:g} s "
                       f"waiting)", CLOSE_POLICY, abort=True)

    def _stop(self, message: str, code: int, abort: bool = False) -> None:
        """Ends the session from outside its handler: the handler's receive loop is woken by
        closing the connection (or, for a client that does not read, by dropping it)."""
        if self.closed or self.error is not None:
            return
        self.error = (message, code)
        if abort:  # (a client that does not read would not take a close handshake either)
            transport = getattr(self.ws, "transport", None)
            if transport is not None:
                transport.abort()
        else:
            self.loop.create_task(self.server.fail(self.ws, self, message, code))

    async def open_slot(self, voice_name: str | None, text_prompt: str, sampling) -> None:
        """Loads the voice (off the tick thread), then runs the prompt phase into a slot."""
        server = self.server
        if server.engine.cfg.moshi:  # (no voice or role prompt: those of the query are ignored)
            voice_name, text_prompt = None, None
        voice = await server.voices.get(voice_name)
        if self.closed:
            raise ConnectionAbortedError("the client left")
        self.open = OpenRequest(voice, text_prompt, sampling, self)
        try:
            self.slot = await asyncio.wrap_future(server.scheduler.open(self.open))
        except EngineFull as e:   # (the KV cache has no room: try again later, elsewhere)
            raise ProtocolError(str(e), CLOSE_TRY_LATER) from None
        except UserError as e:
            raise ProtocolError(str(e)) from None
        self.prompt_tokens = server.engine.slots[self.slot].prompt_tokens if self.slot in server.engine.slots else 0
        if server.stopping:
            raise ProtocolError("the server is shutting down", CLOSE_GOING_AWAY)
        server.sessions_total += 1
        self.voice_name = voice_name
        log.info("session %s started (%s): voice %s, %d prompt tokens, slot %d", self.id, self.endpoint,
                 voice_name or "none", self.prompt_tokens, self.slot)
        self.last_audio = time.monotonic()

    def push_audio(self, pcm: np.ndarray) -> None:
        """The client's audio (float32, 24 kHz), cut into frames for the scheduler, paced by the
        client's own sending."""
        self.last_audio = time.monotonic()
        size = self.server.frame_size
        buf = np.concatenate([self.pending, pcm]) if self.pending.size else pcm
        n = buf.shape[0] // size
        now = time.monotonic()
        if n and not self.pacing.take(n, now):
            raise ProtocolError(f"audio is arriving faster than real time (more than "
                                f"{self.limits.burst_seconds:g} s ahead of the clock)")
        for i in range(n):
            self.server.scheduler.push(self.slot, buf[i * size:(i + 1) * size].copy(), now)
        self.pending = buf[n * size:].copy()

    async def _idle_watch(self) -> None:
        limit = self.limits.idle_timeout
        if limit <= 0:
            return
        while True:
            left = self.last_audio + limit - time.monotonic()
            if left <= 0:
                self._stop(f"no audio for {limit:g} s: the session is closed", CLOSE_POLICY)
                return
            await asyncio.sleep(min(left, 5.0))

    def end(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.open is not None:
            self.server.scheduler.close(self.open)
        if self.slot is not None:
            log.info("session %s ended: voice %s, %d prompt tokens, %d frames, %d late, %d input frames dropped "
                     "while the server was behind", self.id, self.voice_name or "none", self.prompt_tokens,
                     self.frames_out, self.late, self.dropped)




class ChatSession(Session):
    """One `/api/chat` client: the reference's binary protocol, Ogg-Opus both ways."""

    endpoint = "/api/chat"

    def __init__(self, server, ws, request):
        super().__init__(server, ws)
        self.request = request
        self.reader = OggOpusReader(server.sample_rate)
        self.writer = OggOpusWriter(server.sample_rate, complexity=server.args.opus_complexity)

    def encode_frame(self, out) -> list[bytes]:
        self.writer.append_pcm(out.pcm)
        msgs = []
        data = self.writer.read_bytes()
        if data:
            msgs.append(bytes([AUDIO]) + data)
        piece = self.server.engine.tokenizer.piece(out.text_id)
        if piece is not None:
            msgs.append(bytes([TEXT]) + piece.encode("utf-8"))
        return msgs

    def error_message(self, message: str, code: int) -> bytes:
        return bytes([ERROR]) + message.encode("utf-8")

    async def serve(self) -> None:
        """From the upgrade to the close: the prompt phase, the handshake, then the audio."""
        req = self.request
        await self.open_slot(req.voice, req.text_prompt, req.sampling)
        await self.ws.send(bytes([HANDSHAKE]))
        sender = asyncio.create_task(self.outbox.run())
        idle = asyncio.create_task(self._idle_watch())
        try:
            async for msg in self.ws:
                if isinstance(msg, str) or not msg:
                    raise ProtocolError("messages must be binary with a kind byte")
                kind = msg[0]
                if kind == AUDIO:
                    self.reader.append_bytes(bytes(msg[1:]))
                    pcm = self.reader.read_pcm()
                    if pcm.size:
                        self.push_audio(pcm)
                elif kind in (PING, CONTROL, METADATA):
                    continue  # nothing the server needs to act on
                else:
                    raise ProtocolError(f"unknown message kind 0x{kind:02x}")
        finally:
            sender.cancel()
            idle.cancel()


def refusal_for_capacity(max_sessions: int) -> ProtocolError:
    return ProtocolError(f"the server is full ({max_sessions} sessions); try again later", CLOSE_TRY_LATER)
