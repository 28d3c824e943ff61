"""The tick scheduler: the only thread that touches the engine.

Between ticks it closes the slots of ended sessions and opens the slots of new ones (their voices
already loaded elsewhere: nothing slow runs here), then runs a tick over every live session that
has an input frame. Frontends talk to it through thread-safe calls (`open`, `close`, `push`) and
hear back through the `Sink` each session gives: `answer` once per tick on this thread (hand the
work off quickly), `behind` when the session's input was cut.

When to tick. A tick starts as soon as every live session has a frame, or when the oldest
waiting frame has waited `deadline` seconds: sessions at any phase share ticks, no frame waits
for a fixed cadence, and under load (frames arriving while a tick runs have waited its length
already) ticks run back to back, each taking the frames that arrived during the one before.

Input backlog. A session's frames wait in its queue until a tick takes them; a queue longer than
one frame has an old first frame, so its ticks come back to back, faster than real time, and a
burst (a client back from a network stall, a server back from a pause) drains in a fraction of
its length. When the server stays behind real time (an overloaded host), a frame that has waited
more than `max_wait` seconds is dropped and counted, never the newest: a session's answers stay
within `max_wait` of its input, and every session carries on. The client is not blamed.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger("ppx.serve")


class Sink(Protocol):
    """What a session gives the scheduler to hear back on."""

    def answer(self, out, born: float, late: bool) -> None:
        """One output frame (`engine.FrameOut`), on the tick thread. born: when its input frame
        was complete (time.monotonic); late: answered more than a frame period after that."""

    def behind(self, dropped: int) -> None:
        """`dropped` of the session's oldest input frames were cut because the server is behind."""


@dataclass
class OpenRequest:
    voice: object            # an `engine.prompts.VoicePrompt`, or None
    text_prompt: str
    sampling: object         # `engine.engine.SamplingParams`
    sink: Sink
    future: Future = field(default_factory=Future)   # the slot, or the error that refused it
    cancelled: bool = False  # the client left before its slot opened


@dataclass
class SchedulerMetrics:
    ticks: int = 0
    frames: int = 0
    late_frames: int = 0
    dropped_frames: int = 0       # input frames cut from a backlog (the server was behind)
    tick_seconds: float = 0.0
    tick_window: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))
    # per frame, seconds from the input frame being complete to its tick starting
    wait_window: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4000))


class _Live:
    __slots__ = ("sink", "frames")

    def __init__(self, sink: Sink):
        self.sink = sink
        self.frames: collections.deque = collections.deque()   # (pcm, time the frame was complete)


class Scheduler(threading.Thread):
    """Ticks start as soon as every live session has a frame, else once the oldest waiting frame
    has waited `deadline` seconds."""

    def __init__(self, engine, *, deadline: float, max_wait: float, on_fatal=None):
        super().__init__(name="ppx-tick", daemon=True)
        self.engine = engine
        self.deadline = deadline
        self.max_wait = max_wait
        self.frame_seconds = engine.frame_size / engine.sample_rate
        self.on_fatal = on_fatal
        self.metrics = SchedulerMetrics()
        self.wake = threading.Event()
        self.stopping = False
        self._opens: queue.SimpleQueue = queue.SimpleQueue()
        self._closes: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, _Live] = {}
        self._lock = threading.Lock()    # guards every _Live.frames
        self._last_behind_log = 0.0
        self._dropped_since_log = 0

    # ------------------------------------------------------------------------------
    # thread-safe calls

    def open(self, req: OpenRequest) -> Future:
        """Queues a session's opening; its future gets the slot (or the error that refused it)."""
        self._opens.put(req)
        self.wake.set()
        return req.future

    def close(self, req: OpenRequest) -> None:
        """Ends a session, opened or not yet."""
        req.cancelled = True
        self._closes.put(req)
        self.wake.set()

    def push(self, slot: int, pcm: np.ndarray, born: float) -> None:
        """One complete input frame of a live slot (born: when it was complete)."""
        with self._lock:
            live = self._live.get(slot)
            if live is None:
                return
            live.frames.append((pcm, born))
        self.wake.set()

    @property
    def live_count(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------------------
    # the thread

    def run(self) -> None:
        try:
            while not self.stopping:
                self._service()
                ready = self._ready()
                if not ready:
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                while ready and len(ready) < len(self._live) and not self.stopping:
                    due = self._oldest(ready) + self.deadline
                    if time.monotonic() >= due:
                        break
                    self.wake.wait(due - time.monotonic())
                    self.wake.clear()
                    self._service()
                    ready = self._ready()
                if ready:
                    self._tick(ready)
        except Exception:  # the engine failed: nothing can be served any more
            log.exception("the tick loop failed")
            if self.on_fatal is not None:
                self.on_fatal()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        self.wake.set()
        if self.is_alive():
            self.join(timeout)

    def _ready(self) -> list[int]:
        return [slot for slot, live in self._live.items() if live.frames]

    def _oldest(self, ready: list[int]) -> float:
        """When the oldest waiting frame of these slots was complete."""
        with self._lock:
            return min(self._live[s].frames[0][1] for s in ready if self._live[s].frames)

    def _tick(self, ready: list[int]) -> None:
        m = self.metrics
        frames, born, dropped = {}, {}, {}
        stale = time.monotonic() - self.max_wait
        with self._lock:
            for slot in ready:
                q = self._live[slot].frames
                while len(q) > 1 and q[0][1] < stale:
                    q.popleft()
                    dropped[slot] = dropped.get(slot, 0) + 1
                frames[slot], born[slot] = q.popleft()
        for slot, n in dropped.items():
            m.dropped_frames += n
            self._live[slot].sink.behind(n)
            self._log_behind(n)
        t0 = time.monotonic()
        outs = self.engine.step(frames)
        t1 = time.monotonic()
        m.ticks += 1
        m.frames += len(frames)
        m.tick_seconds += t1 - t0
        m.tick_window.append(t1 - t0)
        for slot in ready:
            m.wait_window.append(t0 - born[slot])
            late = t1 - born[slot] > self.frame_seconds
            m.late_frames += late
            self._live[slot].sink.answer(outs[slot], born[slot], late)

    def _service(self) -> None:
        while True:
            try:
                req = self._closes.get_nowait()
            except queue.Empty:
                break
            slot = _slot_of(req.future)
            if slot is not None and slot in self._live and self._live[slot].sink is req.sink:
                with self._lock:
                    del self._live[slot]
                self.engine.close(slot)
        batch = []
        while True:
            try:
                req = self._opens.get_nowait()
            except queue.Empty:
                break
            if req.cancelled or req.future.cancelled():
                _settle(req.future, exc=ConnectionAbortedError("the client left"))
            else:
                batch.append(req)
        if batch:
            self._open(batch)

    def _open(self, batch: list[OpenRequest]) -> None:
        reqs = [(r.voice, r.text_prompt, r.sampling) for r in batch]
        try:
            slots = self.engine.open_many(reqs)
        except Exception:  # noqa: BLE001 - one bad request fails the batch: open the rest one by one
            slots = []
            for r, args in zip(batch, reqs):
                try:
                    slots.append(self.engine.open_many([args])[0])
                except Exception as e:  # noqa: BLE001 - reported to that client only
                    slots.append(None)
                    _settle(r.future, exc=e)
        for r, slot in zip(batch, slots):
            if slot is None:
                continue
            if r.cancelled or r.future.cancelled():  # the client left during its prompt phase
                self.engine.close(slot)
                _settle(r.future, exc=ConnectionAbortedError("the client left"))
                continue
            with self._lock:
                self._live[slot] = _Live(r.sink)
            _settle(r.future, result=slot)

    def _log_behind(self, dropped: int) -> None:
        self._dropped_since_log += dropped
        now = time.monotonic()
        if now - self._last_behind_log >= 5.0:
            log.warning("the server is behind real time: dropped %d input frame(s) that waited over %.1f s for "
                        "their tick; every session carries on", self._dropped_since_log, self.max_wait)
            self._last_behind_log = now
            self._dropped_since_log = 0


def _settle(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Resolves a future unless it is already resolved or cancelled (its waiter gave up)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:  # resolved or cancelled meanwhile
        pass


def _slot_of(fut: Future) -> int | None:
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return None
    return fut.result()
