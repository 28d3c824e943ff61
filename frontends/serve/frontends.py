"""`ppx-serve --frontends N`: the websocket, Ogg and Opus work of the sessions spread over N
frontend processes beside one engine process, so the host side is not one Python process.

The engine process loads the model and runs the tick scheduler and the voice store (the "core").
Each frontend process is the ordinary server (`server.Server`: endpoints, limits, faults,
metrics, draining) listening on the same port (SO_REUSEPORT: the kernel spreads connections),
with the engine and the scheduler replaced by views of the core over a local socket
(`multiprocessing.connection`, authenticated with a key only the processes know). A frontend
sends a session's opening (voice name, role prompt, sampling), its input frames as PCM and its
end; the core answers each tick's frames as `engine.FrameOut` and, twice a second, its figures
(free room, KV pages, tick and wait times) for /health, /metrics and the agent check.

SIGTERM to the engine process drains every frontend and then stops; SIGINT stops at once. A
frontend that dies loses its own sessions only; if the engine process dies, every frontend
stops. /metrics of a frontend counts its own connections and sessions, and the engine's figures
(ticks, waits, KV pages, free room, and the CPU time of every process) for the whole server.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Client, Listener
from pathlib import Path
from types import SimpleNamespace

from engine.engine import EngineFull
from engine.errors import UserError

from ..protocol import ProtocolError
from .scheduler import OpenRequest, Scheduler, _settle

log = logging.getLogger("ppx.serve")

STATS_EVERY = 0.5    # seconds between the core's figures sent to each frontend
KEY_ENV = "PPX_CORE_KEY"


# ------------------------------------------------------------------------------
# the engine process


class _Front:
    """One frontend's connection, seen from the core: a reader thread taking its requests, a
    sender thread writing answers (the tick thread only queues them)."""

    def __init__(self, core: "CoreService", conn, n: int):
        self.core, self.conn, self.n = core, conn, n
        self.outbox: collections.deque = collections.deque()
        self.ready = threading.Condition()
        self.reqs: dict[int, OpenRequest] = {}    # the frontend's request id -> the core's request
        self.slots: dict[int, int] = {}           # slot -> request id
        self.closed = False

    def send(self, msg) -> None:
        with self.ready:
            self.outbox.append(msg)
            self.ready.notify()

    def sender(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.outbox and not self.closed:
                        self.ready.wait()
                    if self.closed and not self.outbox:
                        return
                    batch = list(self.outbox)
                    self.outbox.clear()
                # (a tick's answers go as one message: one pickle and one write)
                self.conn.send(batch[0] if len(batch) == 1 else ("batch", batch))
        except (OSError, EOFError):
            self.close()

    def reader(self) -> None:
        core = self.core
        try:
            while True:
                op, *rest = self.conn.recv()
                if op == "push":
                    for slot, pcm, born in rest[0]:
                        if slot in self.slots:
                            core.scheduler.push(slot, pcm, born)
                elif op == "open":
                    rid, voice, text, sampling = rest
                    asyncio.run_coroutine_threadsafe(self._open(rid, voice, text, sampling), core.loop)
                elif op == "close":
                    req = self.reqs.pop(rest[0], None)
                    if req is not None:
                        self._forget(req)
                        core.scheduler.close(req)
        except (OSError, EOFError):
            pass
        finally:
            self.close()

    async def _open(self, rid: int, voice_name, text, sampling) -> None:
        core = self.core
        try:
            voice = await core.voices.get(voice_name)
            req = OpenRequest(voice, text, sampling, _Sink(self, rid))
            self.reqs[rid] = req
            slot = await asyncio.wrap_future(core.scheduler.open(req))
        except ProtocolError as e:
            self.send(("refused", rid, "protocol", str(e), e.close_code))
            return
        except EngineFull as e:
            self.send(("refused", rid, "full", str(e), 0))
            return
        except UserError as e:
            self.send(("refused", rid, "user", str(e), 0))
            return
        except ConnectionAbortedError:   # (the frontend gave it up during its prompt phase)
            return
        except Exception as e:  # noqa: BLE001 - told to that session only
            log.exception("opening a session for frontend %d failed", self.n)
            self.send(("refused", rid, "error", f"{type(e).__name__}: {e}", 0))
            return
        if self.closed or rid not in self.reqs:   # (the frontend gave it up meanwhile)
            core.scheduler.close(req)
            return
        self.slots[slot] = rid
        tokens = core.engine.slots[slot].prompt_tokens if slot in core.engine.slots else 0
        self.send(("opened", rid, slot, tokens))

    def _forget(self, req: OpenRequest) -> None:
        fut = req.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.slots.pop(fut.result(), None)

    def close(self) -> None:
        with self.ready:
            if self.closed:
                return
            self.closed = True
            self.ready.notify()
        for req in list(self.reqs.values()):   # (a frontend gone: its sessions end)
            self.core.scheduler.close(req)
        self.reqs.clear()
        self.slots.clear()
        try:
            self.conn.close()
        except OSError:
            pass
        self.core.fronts.discard(self)


class _Sink:
    """A session's sink on the core: its answers go to its frontend."""

    def __init__(self, front: _Front, rid: int):
        self.front, self.rid = front, rid

    def answer(self, out, born: float, late: bool) -> None:
        self.front.send(("answer", self.rid, out, born, late))

    def behind(self, dropped: int) -> None:
        self.front.send(("behind", self.rid, dropped))


class CoreService:
    """The engine process's side: frontends connect to `address` with `authkey`."""

    def __init__(self, engine, scheduler: Scheduler, voices, tokenizer_path: str, max_sessions: int):
        self.engine, self.scheduler, self.voices = engine, scheduler, voices
        self.tokenizer_path = tokenizer_path
        self.max_sessions = max_sessions
        self.authkey = secrets.token_bytes(32)
        self._dir = tempfile.mkdtemp(prefix="ppx-core-")
        os.chmod(self._dir, 0o700)
        self.address = os.path.join(self._dir, "core.sock")
        self.listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self.fronts: set[_Front] = set()
        self.front_pids: list[int] = []
        self.loop = asyncio.new_event_loop()
        self.stopping = False

    def start(self) -> None:
        threading.Thread(target=self.loop.run_forever, name="ppx-core-loop", daemon=True).start()
        threading.Thread(target=self._accept, name="ppx-core-accept", daemon=True).start()
        threading.Thread(target=self._stats, name="ppx-core-stats", daemon=True).start()

    def _accept(self) -> None:
        n = 0
        while not self.stopping:
            try:
                conn = self.listener.accept()
            except (OSError, EOFError):   # (a wrong key, or the listener closed)
                if self.stopping:
                    return
                continue
            front = _Front(self, conn, n)
            n += 1
            e = self.engine
            conn.send({"frame_size": e.frame_size, "sample_rate": e.sample_rate, "cfg": e.cfg,
                       "max_slots": e.max_slots, "mimi_id": e.mimi_id, "tokenizer": self.tokenizer_path,
                       "vocab_size": e.cfg.lm.text_card, "stats": self.stats()})
            self.fronts.add(front)
            threading.Thread(target=front.reader, name=f"ppx-core-read-{front.n}", daemon=True).start()
            threading.Thread(target=front.sender, name=f"ppx-core-send-{front.n}", daemon=True).start()

    def stats(self) -> dict:
        e, m = self.engine, self.scheduler.metrics
        used = e.used_slots()
        room = min(e.max_slots - used, e.kv_room())
        return {"alive": self.scheduler.is_alive(), "live": self.scheduler.live_count, "used": used,
                "room": room, "kv": e.kv_stats(), "cpu": time.process_time() + sum(map(_cpu_of, self.front_pids)),
                "gpu_memory": e.gpu_memory(),
                "metrics": {"ticks": m.ticks, "frames": m.frames, "late_frames": m.late_frames,
                            "dropped_frames": m.dropped_frames, "tick_seconds": m.tick_seconds,
                            "tick_window": list(m.tick_window), "wait_window": list(m.wait_window)}}

    def _stats(self) -> None:
        while not self.stopping:
            st = self.stats()
            for front in list(self.fronts):
                front.send(("stats", st))
            time.sleep(STATS_EVERY)

    def stop(self) -> None:
        self.stopping = True
        for front in list(self.fronts):
            front.close()
        try:
            self.listener.close()
        except OSError:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        try:
            os.unlink(self.address)
            os.rmdir(self._dir)
        except OSError:
            pass


def _cpu_of(pid: int) -> float:
    """CPU seconds (user and system) of another process (Linux; 0 elsewhere or when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def strip_flags(argv: list[str], flags: dict[str, bool]) -> list[str]:
    """argv without the given flags (flag -> whether it takes a value), in either form
    (`--flag value`, `--flag=value`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in a
            continue
        out.append(a)
    return out


def frontend_argv(argv: list[str], args, port: int, voices_dir: Path | None) -> list[str]:
    """A frontend process's flags: the engine process's, less those that are the engine
    process's alone, with its port, the server's session count and voices; the codec threads
    of the default (half the cores, at most 8) shared among the frontends unless given."""
    out = strip_flags(argv, {"--frontends": True, "--agent-port": True, "--port": True, "--voice-prompt-dir": True,
                             "--max-sessions": True, "--log-tag": True, "--demo": False})
    out += ["--port", str(port), "--max-sessions", str(args.max_sessions)]
    if voices_dir is not None:
        out += ["--voice-prompt-dir", str(voices_dir)]
    if not any(a.split("=", 1)[0] == "--codec-threads" for a in argv):
        out += ["--codec-threads", str(max(1, args.codec_threads // args.frontends))]
    return out


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_core(args, argv: list[str], engine, voices_dir: Path | None, cache_dir: Path | None,
             tokenizer_path: str) -> int:
    """The engine process of `--frontends N`: the core, N frontend processes on one port, and
    (with --agent-port) the agent check; SIGTERM drains the frontends, SIGINT stops them."""
    from voices import VoiceLibrary

    from .http import agent_reply, serve_agent
    from .voices import VoiceStore

    state = SimpleNamespace(fatal=False)

    def fatal():
        state.fatal = True

    scheduler = Scheduler(engine, deadline=args.tick_deadline_ms / 1000, max_wait=args.max_backlog_seconds,
                          on_fatal=fatal)
    if args.ssl:   # (made here once: the frontends would race to make a missing pair)
        from .tls import make_ssl_context

        make_ssl_context(args.ssl)
    voices = VoiceStore(VoiceLibrary(voices_dir) if voices_dir is not None else None, engine, cache_dir)
    voices.warm_up()
    core = CoreService(engine, scheduler, voices, tokenizer_path, args.max_sessions)
    port = args.port or free_port(args.host)
    child_argv = frontend_argv(argv, args, port, voices_dir)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        scheduler.start()
        core.start()
        env = dict(os.environ, **{KEY_ENV: core.authkey.hex()}, PYTHONUNBUFFERED="1")
        procs = []
        for i in range(args.frontends):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "frontends.serve", "--core-address", core.address, *child_argv,
                "--log-tag", f"{args.log_tag} front-{i}" if args.log_tag else f"front-{i}",
                stdout=asyncio.subprocess.PIPE, env=env))
        core.front_pids = [p.pid for p in procs]
        # each frontend says PPX_READY once it listens; then this process does
        for p in procs:
            while True:
                line = await p.stdout.readline()
                if not line:
                    raise UserError("a frontend process stopped during start-up (its log says why)")
                if line.startswith(b"PPX_READY"):
                    break
        agent = None
        if args.agent_port is not None:
            def reply() -> bytes:
                st = core.stats()
                return agent_reply(max(0, st["room"]), args.max_sessions, alive=st["alive"],
                                   accepting=not draining.is_set())
            draining = asyncio.Event()
            agent = await serve_agent(args.host, args.agent_port, reply)
        else:
            draining = asyncio.Event()
        stop = loop.create_future()

        def on_signal(sig):
            if sig == signal.SIGTERM and not draining.is_set():
                draining.set()
                log.info("draining %d frontend process(es)", len(procs))
            for p in procs:
                if p.returncode is None:
                    p.send_signal(sig)
            if not stop.done() and sig == signal.SIGINT:
                stop.set_result(None)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        host = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
        log.info("serving on port %d through %d frontend processes (up to %d sessions)", port, len(procs),
                 args.max_sessions)
        log.info("open http://%s:%d/ in a browser to talk to the model", host, port)
        print(f"PPX_READY port={port} sessions={args.max_sessions}", flush=True)

        async def drain_stdout(p):
            while await p.stdout.readline():
                pass

        readers = [asyncio.ensure_future(drain_stdout(p)) for p in procs]
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        reported: set[int] = set()
        while not all(w.done() for w in waits):
            await asyncio.wait(waits, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if state.fatal:
                log.error("the engine failed: stopping the frontends")
                for p in procs:
                    if p.returncode is None:
                        p.send_signal(signal.SIGINT)
                state.fatal = False
            for i, (p, w) in enumerate(zip(procs, waits)):
                if w.done() and p.returncode != 0 and i not in reported and not draining.is_set() \
                        and not stop.done():
                    log.error("frontend process %d exited with status %s; the others serve on", i, p.returncode)
                    reported.add(i)
        for r in readers:
            r.cancel()
        if agent is not None:
            agent.close()
        return 0

    try:
        return asyncio.run(main())
    finally:
        scheduler.stop()
        core.stop()
        voices.close()
        log.info("stopped")


# ------------------------------------------------------------------------------
# a frontend process


class EngineView:
    """What a frontend's server reads of the engine: its shapes and config, the tokenizer (read
    here), the sessions this frontend opened, and the core's latest figures."""

    def __init__(self, hello: dict):
        from engine.tokenizer import Tokenizer

        self.frame_size, self.sample_rate = hello["frame_size"], hello["sample_rate"]
        self.cfg, self.max_slots, self.mimi_id = hello["cfg"], hello["max_slots"], hello["mimi_id"]
        self.tokenizer = Tokenizer(hello["tokenizer"], vocab_size=hello["vocab_size"])
        self.slots: dict[int, SimpleNamespace] = {}
        self.latest = hello["stats"]   # (the core's figures at the start; then twice a second)

    def kv_room(self) -> int:
        return max(0, self.latest["room"])

    def process_cpu(self) -> float:
        """CPU seconds of the engine process and every frontend process."""
        return self.latest.get("cpu", 0.0)

    def used_slots(self) -> int:
        """Slots open in the engine, every frontend's sessions counted (`slots` are this one's)."""
        return self.latest["used"]

    def gpu_memory(self) -> int:
        return self.latest.get("gpu_memory", 0)

    def kv_stats(self) -> dict:
        return self.latest["kv"]


class RemoteScheduler:
    """The scheduler's calls (`open`, `push`, `close`) sent to the core; its answers delivered
    to the sessions' sinks on this process's reader thread."""

    def __init__(self, conn, view: EngineView):
        self.conn, self.view = conn, view
        self.lock = threading.Lock()
        self.reqs: dict[int, OpenRequest] = {}
        self._pushes: list = []
        self.ids = iter(range(1, 1 << 62))
        self.metrics = SimpleNamespace(**view.latest["metrics"])   # (the core's, refreshed with its figures)
        self.on_fatal = None
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="ppx-front-read", daemon=True)

    def _send(self, msg) -> None:
        try:
            with self.lock:
                self.conn.send(msg)
        except OSError:
            self._lost()

    def open(self, req: OpenRequest) -> Future:
        rid = next(self.ids)
        req.rid = rid
        self.reqs[rid] = req
        self._send(("open", rid, req.voice, req.text_prompt, req.sampling))
        return req.future

    def push(self, slot: int, pcm, born: float) -> None:
        """On the event loop: the frames pushed while it handles what one wait for events
        brought go to the core as one message, at the end of that pass."""
        if not self._pushes:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pushes.append((slot, pcm, born))

    def _flush(self) -> None:
        pushes, self._pushes = self._pushes, []
        if pushes:
            self._send(("push", pushes))

    def close(self, req: OpenRequest) -> None:
        if self._pushes:   # (its last frames before its end)
            self._flush()
        req.cancelled = True
        rid = getattr(req, "rid", None)
        if rid is not None and self.reqs.pop(rid, None) is not None:
            fut = req.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.view.slots.pop(fut.result(), None)
            self._send(("close", rid))

    @property
    def live_count(self) -> int:
        return self.view.latest["live"]

    def is_alive(self) -> bool:
        return self._alive and self.view.latest["alive"]

    def start(self) -> None:
        self._reader.start()

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.conn.close()
        except OSError:
            pass

    def _read(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                for m in (msg[1] if msg[0] == "batch" else (msg,)):
                    self._handle(*m)
        except (OSError, EOFError):
            pass
        self._lost()

    def _handle(self, op, *rest) -> None:
        if op == "answer":
            rid, out, born, late = rest
            req = self.reqs.get(rid)
            if req is not None:
                req.sink.answer(out, born, late)
        elif op == "behind":
            req = self.reqs.get(rest[0])
            if req is not None:
                req.sink.behind(rest[1])
        elif op == "opened":
            rid, slot, tokens = rest
            req = self.reqs.get(rid)
            if req is None:   # (closed meanwhile: the core ends it too)
                self._send(("close", rid))
                return
            self.view.slots[slot] = SimpleNamespace(prompt_tokens=tokens)
            _settle(req.future, result=slot)
        elif op == "refused":
            rid, kind, message, code = rest
            req = self.reqs.pop(rid, None)
            if req is not None:
                exc = (ProtocolError(message, code) if kind == "protocol" else EngineFull(message)
                       if kind == "full" else UserError(message) if kind == "user" else RuntimeError(message))
                _settle(req.future, exc=exc)
        elif op == "stats":
            st = rest[0]
            self.view.latest = st
            for k, v in st["metrics"].items():
                setattr(self.metrics, k, v)

    def _lost(self) -> None:
        if self._alive:
            self._alive = False
            for req in list(self.reqs.values()):
                _settle(req.future, exc=ConnectionAbortedError("the engine process is gone"))
            if self.on_fatal is not None:
                self.on_fatal()


class RemoteVoices:
    """The voice names, checked here (an unknown name is refused as a lone server refuses it);
    the core loads the voice itself."""

    def __init__(self, voices_dir: Path | None):
        from voices import VoiceLibrary

        self.library = VoiceLibrary(voices_dir) if voices_dir is not None else None

    def names(self) -> list[str]:
        return self.library.names() if self.library is not None else []

    def warm_up(self) -> None:
        pass

    async def get(self, name: str | None):
        from voices import UnknownVoice

        if name is None or self.library is None:
            return None
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.library.find, name)
        except UnknownVoice:
            shown = repr(name) if len(name) <= 64 else "that name"
            raise ProtocolError(f"voice {shown} is not available (voices: {', '.join(self.names())})") from None
        return name

    def close(self) -> None:
        pass


def run_frontend(args) -> int:
    """A frontend process (`ppx-serve --core-address ADDRESS <the engine process's flags>`,
    started by `run_core`)."""
    from .server import Server

    key = bytes.fromhex(os.environ.pop(KEY_ENV, ""))
    conn = Client(args.core_address, family="AF_UNIX", authkey=key)
    view = EngineView(conn.recv())
    scheduler = RemoteScheduler(conn, view)
    voices_dir = Path(args.voice_prompt_dir) if args.voice_prompt_dir else None
    server = Server(view, args, voices_dir, None, scheduler=scheduler, voices=RemoteVoices(voices_dir),
                    reuse_port=True)
    scheduler.on_fatal = server._fatal
    asyncio.run(server.serve())
    return 0
