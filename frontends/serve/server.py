"""The server: one engine, its tick scheduler, the voice store, the codec threads, and the
websocket endpoints, wired together; start-up, readiness, metrics, draining and shutdown.

SIGTERM drains: new sessions are refused (/health answers 503, the agent check 0%), live ones
go on until they end or --drain-timeout passes, then the server exits. SIGINT, or a second
SIGTERM, stops at once, telling live sessions that the server is shutting down."""
from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

from engine import switches
from engine.errors import UserError

from ..ogg_opus import OggError
from ..protocol import (CLOSE_BAD_DATA, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_LATER, ERROR, ProtocolError,
                        close_reason, parse_chat_query)
from .http import ClientWarnings, HttpRoutes, agent_reply, limit_http_lines, prometheus, room_text, serve_agent
from .scheduler import Scheduler
from .realtime import RealtimeSession, close_frame_error
from .session import ChatSession, CodecThreads, SessionLimits, refusal_for_capacity
from .voices import VoiceStore

log = logging.getLogger("ppx.serve")

MAX_MESSAGE = 1 << 20          # bytes in one websocket message
SEND_BUFFER = 32 << 10         # socket send buffer (the kernel doubles it)
CHAT = "/api/chat"
# the Realtime API; an SDK pointed at ws://host:port (no /v1) asks for /realtime
REALTIME = ("/v1/realtime", "/realtime")


class Server:
    def __init__(self, engine, args, voices_dir: Path | None, cache_dir: Path | None, *, scheduler=None,
                 voices=None, reuse_port: bool = False):
        """engine: an `Engine` (or, in a frontend process of `--frontends`, a view of the engine
        process's, with its `scheduler` and `voices` stand-ins)."""
        from voices import VoiceLibrary

        self.engine = engine
        self.args = args
        self.frame_size = engine.frame_size
        self.sample_rate = engine.sample_rate
        frame_seconds = engine.frame_size / engine.sample_rate
        self.limits = SessionLimits(frame_seconds, burst_seconds=args.burst_seconds,
                                    client_buffer_seconds=args.client_buffer_seconds, idle_timeout=args.idle_timeout)
        self.max_sessions = args.max_sessions
        self.api_key = args.api_key or switches.API_KEY
        self.warn = ClientWarnings()
        self.scheduler = scheduler or Scheduler(engine, deadline=args.tick_deadline_ms / 1000,
                                                max_wait=args.max_backlog_seconds, on_fatal=self._fatal)
        self.codec = CodecThreads(args.codec_threads)
        self.voices = voices or VoiceStore(VoiceLibrary(voices_dir) if voices_dir is not None else None, engine,
                                           cache_dir)
        self.reuse_port = reuse_port
        self.routes = HttpRoutes(api_key=self.api_key, static=Path(args.static) if args.static else None,
                                 websocket_paths=(CHAT, *REALTIME), ready=self.ready, health=self.health,
                                 live=self.live, metrics_text=self.metrics_text,
                                 voice_names=self.voices.names, warn=self.warn)
        self.sessions: set = set()
        self.sessions_total = 0
        self.refusals = 0
        self.errors = 0
        self.answer_window: collections.deque = collections.deque(maxlen=4000)
        self.stopping = False
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None

    # ------------------------------------------------------------------------------
    # state

    def ready(self) -> tuple[bool, str]:
        """May a new session start (a full server lets it in to refuse it with 1013)."""
        if self.stopping:
            return False, "the server is shutting down"
        if not self.scheduler.is_alive():
            return False, "the engine stopped"
        if self.draining:
            return False, "the server is draining: it takes no new sessions and stops when its live ones end"
        return True, ""

    def free_slots(self) -> int:
        """New sessions this server would take now: free slots, as far as the KV cache has room."""
        return max(0, min(self.max_sessions - len(self.sessions), self.engine.kv_room()))

    def health(self) -> tuple[bool, str]:
        """Readiness, for load balancers and Kubernetes: ready while a new session would start."""
        ok, why = self.ready()
        if not ok:
            return False, f"not ready: {why}"
        free = self.free_slots()
        return free > 0, f"{'ready' if free else 'not ready: full'}: {room_text(free, self.max_sessions)}"

    def live(self) -> tuple[bool, str]:
        """Liveness: the engine runs (full or draining are still alive)."""
        if not self.scheduler.is_alive():
            return False, "not live: the engine stopped"
        return True, "live"

    def agent(self) -> bytes:
        return agent_reply(self.free_slots(), self.max_sessions, alive=self.scheduler.is_alive(),
                           accepting=self.ready()[0])

    def metrics_text(self) -> str:
        m = self.scheduler.metrics
        kv = self.engine.kv_stats()
        live = sum(1 for s in self.sessions if s.slot is not None and not s.closed)
        return prometheus(
            gauges=[("ppx_live_sessions", "Sessions past their prompt phase.", live),
                    ("ppx_connections", "Open websocket connections.", len(self.sessions)),
                    ("ppx_free_slots", "Free session slots of the engine.",
                     self.engine.max_slots - self.engine.used_slots()),
                    ("ppx_max_sessions", "Sessions this server takes at once.", self.max_sessions),
                    ("ppx_slot_utilization", "Open sessions over --max-sessions (1: full; what an autoscaler "
                     "targets).", len(self.sessions) / self.max_sessions),
                    ("ppx_draining", "1 while the server drains (after SIGTERM).", int(self.draining)),
                    ("ppx_gpu_memory_bytes", "GPU memory the engine's tensors hold (0 on the CPU).",
                     self.engine.gpu_memory()),
                    ("ppx_tasks", "Tasks of the event loop.", len(asyncio.all_tasks(self.loop)) if self.loop else 0),
                    ("ppx_kv_pages_used", "KV cache pages that sessions hold.", kv["used"]),
                    ("ppx_kv_pages_free", "KV cache pages free.", kv["free"]),
                    ("ppx_kv_page_bytes", "Bytes of one KV page (every layer's keys and values of "
                     f"{kv['page_positions']} frames).", kv["page_bytes"])],
            counters=[("process_cpu_seconds_total", "CPU time of the server's processes (with --frontends, the "
                       "engine process's and every frontend's), every thread.",
                       self.engine.process_cpu()),
                      ("ppx_sessions_total", "Sessions started.", self.sessions_total),
                      ("ppx_refusals_total", "Connections refused (capacity, API key).",
                       self.refusals + self.routes.refusals),
                      ("ppx_errors_total", "Sessions ended by an error.", self.errors),
                      ("ppx_late_frames_total", "Frames answered more than one frame period after their input.",
                       m.late_frames),
                      ("ppx_frames_total", "Frames stepped.", m.frames),
                      ("ppx_kv_shrunk_total", "Sessions whose KV window was cut to the pages they held because "
                       "the KV cache was full (they carried on with less history).", kv["shrunk"]),
                      ("ppx_dropped_input_frames_total", "Input frames dropped because the server was behind "
                       "real time (they waited over --max-backlog-seconds for a tick).", m.dropped_frames)],
            summaries=[("ppx_tick_seconds", "Engine step time per tick (recent ticks).", m.tick_window,
                        [f"ppx_tick_seconds_sum {m.tick_seconds:.6f}", f"ppx_tick_seconds_count {m.ticks}"]),
                       ("ppx_frame_wait_seconds", "From an input frame being complete to its tick starting "
                        "(recent frames).", m.wait_window, []),
                       ("ppx_answer_seconds", "From an input frame being complete to its answer being queued for "
                        "sending: the wait, the tick and the Opus encoding (recent frames).", self.answer_window,
                        [])])

    @property
    def defaults(self):
        from engine.sampling import SamplingParams
        a = self.args
        return SamplingParams(temp_text=a.temp_text, temp_audio=a.temp_audio, topk_text=a.topk_text,
                              topk_audio=a.topk_audio, greedy=a.greedy, seed=a.seed)

    # ------------------------------------------------------------------------------
    # websocket side

    async def handler(self, ws) -> None:
        path = urlsplit(ws.request.path).path
        if path not in (CHAT, *REALTIME):
            await ws.close(CLOSE_POLICY, "unknown path")
            return
        s = None
        try:
            if len(self.sessions) >= self.max_sessions:
                self.refusals += 1
                raise refusal_for_capacity(self.max_sessions)
            if path == CHAT:
                req = parse_chat_query(urlsplit(ws.request.path).query, self.defaults, self.args.voice_prompt,
                                       self.args.text_prompt)
                if req.voice is not None and ("\x00" in req.voice or "/" in req.voice or "\\" in req.voice):
                    raise ProtocolError("voice_prompt must be a voice name from /api/voices")
                s = ChatSession(self, ws, req)
            else:
                s = RealtimeSession(self, ws)
            self.sessions.add(s)
            _small_send_buffer(ws)
            await s.serve()
            if s.error is not None:
                await self.fail(ws, s, *s.error)
        except ProtocolError as e:
            await self.fail(ws, s, str(e), e.close_code, path)
        except OggError as e:
            await self.fail(ws, s, f"bad audio stream: {e}", CLOSE_BAD_DATA, path)
        except asyncio.CancelledError:
            raise
        except ConnectionAbortedError:  # the client left during its prompt phase
            pass
        except Exception as e:  # noqa: BLE001 - a connection error ends this session only
            if s is not None and s.error is not None:
                await self.fail(ws, s, *s.error)
            elif not _is_disconnect(e):
                log.exception("session %s failed", s.id if s else "-")
                await self.fail(ws, s, "internal error", 1011, path)
        finally:
            if s is not None:
                s.end()
                self.sessions.discard(s)

    async def fail(self, ws, s, message: str, code: int, path: str = CHAT) -> None:
        """The endpoint's error message (0x05, or a Realtime `error` event) and a close with
        `code`, within seconds, or the connection dropped (once per session)."""
        if s is not None:
            if s.reported:
                return
            s.reported = True
        if code != CLOSE_GOING_AWAY:
            self.errors += 1
            self.warn(s.id if s else _peer(ws), message)
        try:
            msg = s.error_message(message, code) if s is not None else error_frame(path, message, code)
            await asyncio.wait_for(ws.send(msg), 1.0)
            await asyncio.wait_for(ws.close(code, close_reason(message)), 2.0)
        except Exception:  # noqa: BLE001 - the client is gone or not reading
            transport = getattr(ws, "transport", None)
            if transport is not None:
                transport.abort()

    # ------------------------------------------------------------------------------

    def _fatal(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.shutdown)

    def shutdown(self) -> None:
        self.stopping = True
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    def drain(self) -> None:
        """SIGTERM: no new sessions; stop once the live ones end or --drain-timeout passes. A
        second SIGTERM stops at once."""
        if self.draining or not self.sessions or self.args.drain_timeout <= 0:
            self.shutdown()
            return
        self.draining = True
        log.info("draining: %d live session(s) go on for up to %g s; new sessions are refused",
                 len(self.sessions), self.args.drain_timeout)
        self.loop.create_task(self._drained())

    async def _drained(self) -> None:
        deadline = self.loop.time() + self.args.drain_timeout
        while self.sessions and self.loop.time() < deadline and not self.stopping:
            await asyncio.sleep(0.1)
        if self.sessions:
            log.info("drain timeout: closing %d session(s)", len(self.sessions))
        else:
            log.info("drained: every session ended")
        self.shutdown()

    async def serve(self) -> None:
        from websockets.asyncio.server import serve

        from .tls import make_ssl_context

        limit_http_lines()
        self.loop = asyncio.get_running_loop()
        self._stop = self.loop.create_future()
        for sig, what in ((signal.SIGTERM, self.drain), (signal.SIGINT, self.shutdown)):
            try:
                self.loop.add_signal_handler(sig, what)
            except (NotImplementedError, RuntimeError):
                pass
        # (first: a port in use stops start-up before any thread runs)
        agent = (await serve_agent(self.args.host, self.args.agent_port, self.agent)
                 if self.args.agent_port is not None else None)
        self.voices.warm_up()
        ssl_ctx = make_ssl_context(self.args.ssl) if self.args.ssl else None
        try:
            server = await serve(self.handler, self.args.host, self.args.port, process_request=self.routes,
                                 max_size=MAX_MESSAGE, ssl=ssl_ctx, ping_interval=20, close_timeout=2,
                                 server_header="ppx", compression=switches.WS_COMPRESSION,
                                 create_connection=connection_class(self), reuse_port=self.reuse_port or None)
        except OSError as e:
            if agent is not None:
                agent.close()
            why = os.strerror(e.errno) if e.errno else str(e)
            raise UserError(f"cannot listen on {self.args.host}:{self.args.port}: {why}") from None
        # (no await since the listening began: no connection is handled before these run)
        # What start-up made (modules, the model's objects) lives as long as the server: kept out
        # of the collector's full passes, which would otherwise walk it all and hold every
        # thread, the tick thread included, for a sizeable part of a frame.
        gc.collect()
        gc.freeze()
        self.codec.start()
        self.scheduler.start()
        port = next(iter(server.sockets)).getsockname()[1]
        scheme = "https" if ssl_ctx else "http"
        log.info("serving on %s://%s:%d (up to %d sessions)", scheme, self.args.host, port, self.max_sessions)
        if not self.args.log_tag:  # (an engine behind `--gpus` is reached through the front)
            host = "localhost" if self.args.host in ("0.0.0.0", "::", "") else self.args.host
            log.info("open %s://%s:%d/ in a browser to talk to the model", scheme, host, port)
        print(f"PPX_READY port={port} sessions={self.max_sessions}", flush=True)
        await self._stop
        if agent is not None:
            agent.close()
        log.info("shutting down: %d sessions", len(self.sessions))
        self.stopping = True
        await asyncio.gather(*(self.fail(s.ws, s, "the server is shutting down", CLOSE_GOING_AWAY)
                               for s in list(self.sessions)), return_exceptions=True)
        server.close()
        await server.wait_closed()
        self.scheduler.stop()
        self.codec.stop()
        self.voices.close()
        gc.unfreeze()  # (what start-up made is freed as the process exits, as bindings expect)
        log.info("stopped")


def error_frame(path: str, message: str, code: int):
    """How an endpoint tells a client about an error before a session exists."""
    if path in REALTIME:
        return close_frame_error(message, "server_full" if code == CLOSE_TRY_LATER else "session_refused")
    return bytes([ERROR]) + message.encode("utf-8")


def connection_class(server: Server):
    """websockets' server connection, telling a client why its message was refused: the library
    closes a connection whose message is over `max_size` with 1009 by itself; this queues the
    0x05 sentence just before that close frame."""
    from websockets.asyncio.server import ServerConnection
    from websockets.frames import CloseCode

    class Connection(ServerConnection):
        def __init__(self, protocol, *args, **kwargs):
            plain_fail = protocol.fail

            def fail(code, reason=""):
                if code == CloseCode.MESSAGE_TOO_BIG and protocol.state.name == "OPEN":
                    message = f"a message is over the {MAX_MESSAGE >> 20} MiB limit"
                    request = getattr(self, "request", None)
                    frame = error_frame(urlsplit(request.path).path if request else CHAT, message, code)
                    try:
                        if isinstance(frame, str):
                            protocol.send_text(frame.encode("utf-8"))
                        else:
                            protocol.send_binary(frame)
                    except Exception:  # noqa: BLE001 - the close below still tells the code
                        pass
                    server.errors += 1
                    server.warn(_peer(self), message)
                    reason = close_reason(message)
                return plain_fail(code, reason)

            protocol.fail = fail
            super().__init__(protocol, *args, **kwargs)

    return Connection


def _small_send_buffer(ws) -> None:
    sock = ws.transport.get_extra_info("socket") if getattr(ws, "transport", None) else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _peer(ws) -> str:
    addr = getattr(ws, "remote_address", None)
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "-"


def _is_disconnect(e: Exception) -> bool:
    from websockets.exceptions import ConnectionClosed
    return isinstance(e, (ConnectionClosed, ConnectionError, OSError))

