"""`ppx-serve --gpus`: one engine process per GPU behind one port.

A conversation lives on one GPU for its whole length (its KV cache and codec state are there),
so serving over several GPUs is placement. This front process listens on the port, starts one
`ppx-serve` per GPU on a loopback port, and puts each new websocket session on the GPU with the
most free slots (a slot holds its own KV cache, so free slots are free KV memory and batch
headroom); from then on it relays bytes. When every GPU is full the session still goes to one,
which refuses it as a lone server does (1013, after its typed message).

/health (per GPU and overall), /health/live and /metrics (every engine's, labelled `gpu`)
answer here; other HTTP requests (the page, /api/voices) go to a running engine. An engine
that dies is taken out of placement, its sessions are told (0x05, or a Realtime `error` event)
and closed with 1011, and the other GPUs serve on. SIGTERM drains every engine (each stops
when its sessions end or --drain-timeout passes); SIGINT stops them at once."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.errors import UserError

from ..protocol import ERROR, close_reason
from .http import agent_reply, room_text, serve_agent
from .realtime import close_frame_error

log = logging.getLogger("ppx.serve")

CHAT = "/api/chat"
REALTIME = ("/v1/realtime", "/realtime")
SESSION_PATHS = (CHAT, *REALTIME)
HEAD_BYTES = 80 << 10        # a request line (up to 64 KiB: the role prompt rides in it) and headers
HEAD_SECONDS = 10.0          # to send them
CLOSE_INTERNAL = 1011
# flags of the front alone: the engines listen on loopback, plain, and take no agent port
FRONT_ONLY = {"gpus", "host", "port", "ssl", "agent_port", "log_tag", "demo", "help"}


@dataclass
class EngineProcess:
    gpu: str                       # the GPU's index as --gpus names it
    proc: subprocess.Popen | None = None
    port: int = 0
    capacity: int = 0              # its --max-sessions
    sessions: int = 0              # websocket sessions relayed to it now
    placed: int = 0
    lost: int = 0                  # sessions cut because the engine stopped
    exit_code: int | None = None

    @property
    def up(self) -> bool:
        return self.exit_code is None and self.port > 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.sessions)

    def state(self) -> str:
        if self.exit_code is not None:
            return f"stopped (exit code {self.exit_code})"
        return room_text(self.free, self.capacity)


# ------------------------------------------------------------------------------
# the command line of each engine


def parse_gpus(spec: str, device: str) -> list[str]:
    """`--gpus all` or `0,1,...`: the GPUs' indices (with --device cpu: that many CPU engines)."""
    spec = spec.strip()
    if device == "cpu":
        if spec == "all":
            raise UserError("--gpus all needs CUDA GPUs; with --device cpu give a list such as --gpus 0,1 "
                            "(one engine process on the CPU each)")
    else:
        import torch
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError("--gpus needs CUDA GPUs and none is visible (--device cpu runs the engine processes on "
                            "the CPU)")
        if spec == "all":
            return [str(i) for i in range(count)]
    try:
        gpus = [str(int(g)) for g in spec.split(",") if g.strip()]
    except ValueError:
        raise UserError(f"--gpus takes 'all' or a list of GPU indices such as 0,1 (got {spec!r})") from None
    if not gpus or len(set(gpus)) != len(gpus) or any(int(g) < 0 for g in gpus):
        raise UserError(f"--gpus takes 'all' or a list of distinct GPU indices such as 0,1 (got {spec!r})")
    if device != "cpu":
        import torch
        count = torch.cuda.device_count()
        bad = [g for g in gpus if int(g) >= count]
        if bad:
            raise UserError(f"--gpus names GPU {bad[0]}, but {count} GPU(s) are visible (0-{count - 1})")
    return gpus


def engine_argv(parser: argparse.ArgumentParser, args, gpu: str, device: str) -> list[str]:
    """The flags of one engine process: the user's own (as parsed, defaults left out), less the
    front's, on a free loopback port."""
    argv = []
    for a in parser._actions:
        if not a.option_strings or a.dest in FRONT_ONLY or a.dest == "device":
            continue
        value = getattr(args, a.dest, a.default)
        if value == a.default or value is None:
            continue
        flag = next(o for o in a.option_strings if o.startswith("--"))
        if isinstance(a, argparse._StoreTrueAction):
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return [*argv, "--host", "127.0.0.1", "--port", "0", "--device", "cpu" if device == "cpu" else "cuda",
            "--log-tag", f"gpu {gpu}"]


def engine_env(gpu: str, device: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device != "cpu":
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[int(gpu)] if visible else gpu
    return env


def _die_with_parent() -> None:
    """The engine gets SIGTERM when the front dies (Linux: PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - not Linux: the engine outlives a killed front
        pass


# ------------------------------------------------------------------------------
# websocket frames on the way from an engine to its client


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked (server to client) websocket frame."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


class EngineStream:
    """What an engine sends a client: its HTTP response, then (after a 101) websocket frames,
    passed on whole, so that when the engine stops without closing, a goodbye can follow at a
    frame boundary."""

    def __init__(self, path: str):
        self.path = path
        self.buf = bytearray()
        self.state = "head"        # head -> frames (a 101) or raw (any other answer)
        self.in_message = False    # inside a fragmented message
        self.closed = False        # the engine sent its close frame

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        if self.state == "head":
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) <= HEAD_BYTES:
                    return b""
                self.state = "raw"
            else:
                head = bytes(self.buf[:end + 4])
                parts = head.split(b" ", 2)
                self.state = "frames" if len(parts) > 1 and parts[1] == b"101" else "raw"
                out += head
                del self.buf[:end + 4]
        if self.state == "raw":
            out += self.buf
            self.buf.clear()
            return bytes(out)
        buf = self.buf
        while len(buf) >= 2:
            n, size, at = len(buf), buf[1] & 0x7F, 2
            if size == 126:
                if n < 4:
                    break
                size, at = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if n < 10:
                    break
                size, at = int.from_bytes(buf[2:10], "big"), 10
            if buf[1] & 0x80:
                at += 4
            if n < at + size:
                break
            opcode, fin = buf[0] & 0x0F, buf[0] & 0x80
            if opcode == 0x8:
                self.closed = True
            elif opcode in (0x0, 0x1, 0x2):
                self.in_message = not fin
            out += buf[:at + size]
            del buf[:at + size]
        return bytes(out)

    def goodbye(self, message: str) -> bytes:
        """The endpoint's error message (unless a message is half sent) and a 1011 close."""
        out = b""
        if not self.in_message:
            if self.path in REALTIME:
                out += ws_frame(0x1, close_frame_error(message, "server_error").encode("utf-8"))
            else:
                out += ws_frame(0x2, bytes([ERROR]) + message.encode("utf-8"))
        return out + ws_frame(0x8, CLOSE_INTERNAL.to_bytes(2, "big") + close_reason(message).encode("utf-8"))


def http_response(status: int, phrase: str, body: str, ctype: str = "text/plain; charset=utf-8") -> bytes:
    data = body.encode("utf-8")
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
            f"Cache-Control: no-store\r\nConnection: close\r\nServer: ppx\r\n\r\n").encode() + data


def connection_close(head: bytes) -> bytes:
    """A plain HTTP request's head with `Connection: close`: one request per relayed connection,
    so that each is routed on its own."""
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0], *(h for h in lines[1:] if not h.lower().startswith(b"connection:"))]
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"


def label_metrics(text: str, gpu: str, families: dict) -> None:
    """Adds an engine's Prometheus text to `families` (name -> [help, type, samples]), each
    sample labelled gpu="N"."""
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, kind, name, *rest = line.split(" ", 3)
            fam = families.setdefault(name, ["", "", []])
            fam[0 if kind == "HELP" else 1] = fam[0 if kind == "HELP" else 1] or (rest[0] if rest else "")
            current = name
        elif line and not line.startswith("#") and current is not None:
            name, _, value = line.partition(" ")
            if "{" in name:
                base, labels = name.split("{", 1)
                sample = f'{base}{{gpu="{gpu}",{labels} {value}'
            else:
                sample = f'{name}{{gpu="{gpu}"}} {value}'
            families[current][2].append(sample)


# ------------------------------------------------------------------------------


class Front:
    def __init__(self, args, engines: list[EngineProcess]):
        self.args = args
        self.engines = engines
        self.draining = False
        self.stopping = False
        self.failed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future | None = None
        self.refusals = 0

    # -- state --------------------------------------------------------------------

    def up(self) -> list[EngineProcess]:
        return [e for e in self.engines if e.up]

    def place(self) -> EngineProcess | None:
        """The running engine with the most free slots (then the fewest sessions, then the first)."""
        up = self.up()
        return max(up, key=lambda e: (e.free, -e.sessions, -self.engines.index(e))) if up else None

    def accepting(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "the server is shutting down"
        if self.draining:
            return False, "the server is draining: it takes no new sessions and stops when its live ones end"
        if not self.up():
            return False, "no engine is running"
        return True, ""

    def health(self) -> tuple[bool, str]:
        up = self.up()
        free, capacity = sum(e.free for e in up), sum(e.capacity for e in up)
        ok, why = self.accepting()
        if not ok:
            head = f"not ready: {why}"
        else:
            ok = free > 0
            head = (f"{'ready' if ok else 'not ready: full'}: {room_text(free, capacity)} on {len(up)} "
                    f"GPU{'s' if len(up) != 1 else ''}")
        return ok, "\n".join([head, *(f"gpu {e.gpu}: {e.state()}" for e in self.engines)])

    def live(self) -> tuple[bool, str]:
        up = len(self.up())
        ok = up > 0 and not self.stopping
        return ok, f"{'live' if ok else 'not live'}: {up} of {len(self.engines)} engines running"

    def agent(self) -> bytes:
        up = self.up()
        return agent_reply(sum(e.free for e in up), sum(e.capacity for e in up), alive=bool(up),
                           accepting=self.accepting()[0])

    async def metrics(self) -> str:
        families: dict = {}

        async def fetch(e):
            try:
                return e, await fetch_body(e.port, "/metrics")
            except Exception:  # noqa: BLE001 - an engine stopping meanwhile: its figures are left out
                return e, ""

        for e, text in await asyncio.gather(*(fetch(e) for e in self.up())):
            label_metrics(text, e.gpu, families)
        own = [("ppx_engine_up", "gauge", "1 while the engine process of this GPU runs.", lambda e: int(e.up)),
               ("ppx_engine_sessions", "gauge", "Sessions relayed to this GPU's engine now.", lambda e: e.sessions),
               ("ppx_engine_capacity", "gauge", "Sessions this GPU's engine takes at once.", lambda e: e.capacity),
               ("ppx_engine_placements_total", "counter", "Sessions placed on this GPU.", lambda e: e.placed),
               ("ppx_engine_lost_sessions_total", "counter", "Sessions ended because this GPU's engine stopped.",
                lambda e: e.lost)]
        for name, kind, help_, get in own:
            families[name] = [help_, kind, [f'{name}{{gpu="{e.gpu}"}} {get(e)}' for e in self.engines]]
        lines = []
        for name, (help_, kind, samples) in families.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind or 'untyped'}", *samples]
        return "\n".join(lines) + "\n"

    # -- connections ---------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(http_response(431, "Request Header Fields Too Large", "the request's head is too long\n"))
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3:
                writer.write(http_response(400, "Bad Request", "not an HTTP request\n"))
                return
            path = urlsplit(parts[1].decode("latin-1")).path
            if path in ("/health", "/health/live"):
                ok, text = (self.health if path == "/health" else self.live)()
                writer.write(http_response(200 if ok else 503, "OK" if ok else "Service Unavailable", text + "\n"))
            elif path == "/metrics":
                writer.write(http_response(200, "OK", await self.metrics(), "text/plain; version=0.0.4"))
            elif path in SESSION_PATHS:
                ok, why = self.accepting()
                engine = self.place() if ok else None
                if engine is None:
                    self.refusals += 1
                    writer.write(http_response(503, "Service Unavailable", f"{why}\n"))
                    return
                await self.relay(engine, head, reader, writer, path)
            else:
                engine = self.place()
                if engine is None:
                    writer.write(http_response(503, "Service Unavailable", "no engine is running\n"))
                    return
                await self.relay(engine, connection_close(head), reader, writer, None)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                await asyncio.wait_for(writer.drain(), 2.0)
            except Exception:  # noqa: BLE001 - the client is gone
                pass
            writer.close()

    async def relay(self, engine: EngineProcess, head: bytes, reader, writer, session_path: str | None) -> None:
        stream = EngineStream(session_path) if session_path else None
        if stream is not None:  # counted at once, so the next placement sees it
            engine.sessions += 1
            engine.placed += 1
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", engine.port), 5.0)
        except (OSError, asyncio.TimeoutError):
            if stream is not None:
                engine.sessions -= 1
            writer.write(http_response(502, "Bad Gateway", f"the engine on GPU {engine.gpu} cannot be reached\n"))
            return
        up_w.write(head)
        upstream = asyncio.ensure_future(self._client_to_engine(reader, up_w))
        try:
            while True:
                try:
                    data = await up_r.read(1 << 16)
                except ConnectionError:
                    data = b""
                if not data:
                    break
                out = stream.feed(data) if stream is not None else data
                if out:
                    writer.write(out)
                    await writer.drain()
            if stream is not None and stream.state != "raw" and not stream.closed and not upstream.done():
                await self._engine_gone(engine, stream, writer)
        finally:
            if stream is not None:
                engine.sessions -= 1
            upstream.cancel()
            up_w.close()

    async def _client_to_engine(self, reader, up_w) -> None:
        try:
            while data := await reader.read(1 << 16):
                up_w.write(data)
                await up_w.drain()
            if up_w.can_write_eof():
                up_w.write_eof()
        except (ConnectionError, OSError):
            up_w.close()

    async def _engine_gone(self, engine: EngineProcess, stream: EngineStream, writer) -> None:
        """The engine's end of a session closed without a close frame: if its process stopped,
        the client is told so; otherwise the engine dropped it on purpose (a client that does
        not read), and so does the front."""
        for _ in range(20):
            if engine.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            return
        engine.lost += 1
        message = "the server's engine for this session stopped; reconnect to start a new session"
        if stream.state == "head":
            writer.write(http_response(502, "Bad Gateway", message + "\n"))
        else:
            writer.write(stream.goodbye(message))

    # -- engines -----------------------------------------------------------------

    def engine_stopped(self, engine: EngineProcess, code: int) -> None:
        engine.exit_code = code
        running = self.up()
        if not (self.draining or self.stopping):
            log.error("the engine on GPU %s stopped (exit code %s): it takes no new sessions, its %d session(s) "
                      "end; %d engine(s) serve on", engine.gpu, code, engine.sessions, len(running))
        if not running:
            if not (self.draining or self.stopping):
                log.error("no engine is left running")
                self.failed = True
            if self._done is not None and not self._done.done():
                self._done.set_result(None)

    def signal_engines(self, sig: int) -> None:
        for e in self.up():
            try:
                e.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def drain(self) -> None:
        if self.draining or self.stopping:
            self.stop()
            return
        self.draining = True
        log.info("draining: %d session(s) on %d engine(s) go on for up to %g s; new sessions are refused",
                 sum(e.sessions for e in self.up()), len(self.up()), self.args.drain_timeout)
        self.signal_engines(signal.SIGTERM)

    def stop(self) -> None:
        self.stopping = True
        self.signal_engines(signal.SIGINT)

    async def serve(self) -> int:
        from .tls import make_ssl_context

        self.loop = asyncio.get_running_loop()
        self._done = self.loop.create_future()
        for e in self.engines:
            threading.Thread(target=self._watch, args=(e,), daemon=True).start()
        for sig, what in ((signal.SIGTERM, self.drain), (signal.SIGINT, self.stop)):
            try:
                self.loop.add_signal_handler(sig, what)
            except (NotImplementedError, RuntimeError):
                pass
        ssl_ctx = make_ssl_context(self.args.ssl) if self.args.ssl else None
        try:
            server = await asyncio.start_server(self.handle, self.args.host, self.args.port, ssl=ssl_ctx,
                                                limit=HEAD_BYTES)
            agent = (await serve_agent(self.args.host, self.args.agent_port, self.agent)
                     if self.args.agent_port is not None else None)
        except (OSError, UserError) as e:
            self.stop()
            await asyncio.get_running_loop().run_in_executor(None, self.wait_engines)
            if isinstance(e, UserError):
                raise
            why = os.strerror(e.errno) if e.errno else str(e)
            raise UserError(f"cannot listen on {self.args.host}:{self.args.port}: {why}") from None
        port = server.sockets[0].getsockname()[1]
        capacity = sum(e.capacity for e in self.engines)
        scheme = "https" if ssl_ctx else "http"
        log.info("serving on %s://%s:%d: %d engine(s) (GPU %s), up to %d sessions", scheme, self.args.host, port,
                 len(self.engines), ", ".join(e.gpu for e in self.engines), capacity)
        host = "localhost" if self.args.host in ("0.0.0.0", "::", "") else self.args.host
        log.info("open %s://%s:%d/ in a browser to talk to the model", scheme, host, port)
        print(f"PPX_READY port={port} sessions={capacity} engines={len(self.engines)}", flush=True)
        if not self.up():
            self._done.set_result(None)
        await self._done
        server.close()
        if agent is not None:
            agent.close()
        self.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.wait_engines)
        log.info("stopped")
        return 1 if self.failed else 0

    def wait_engines(self, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        for e in self.engines:
            try:
                e.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                e.proc.kill()
                e.proc.wait()

    def _watch(self, engine: EngineProcess) -> None:
        code = engine.proc.wait()
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.engine_stopped, engine, code)


async def fetch_body(port: int, path: str) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 3.0)
    finally:
        writer.close()
    return data.partition(b"\r\n\r\n")[2].decode("utf-8", errors="replace")


def start_engines(parser, args, gpus: list[str], device: str) -> list[EngineProcess]:
    """Starts one engine process per GPU and waits until each says it is ready; if one fails,
    the others are stopped and the error names its GPU."""
    engines = [EngineProcess(g) for g in gpus]
    for e in engines:
        cmd = [sys.executable, "-m", "frontends.serve", *engine_argv(parser, args, e.gpu, device)]
        e.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=engine_env(e.gpu, device),
                                  preexec_fn=_die_with_parent)
        log.info("starting the engine on GPU %s", e.gpu)
    ready = {e.gpu: threading.Event() for e in engines}

    def read(e: EngineProcess):
        for line in e.proc.stdout:
            if line.startswith("PPX_READY ") and not ready[e.gpu].is_set():
                fields = dict(f.split("=", 1) for f in line.split()[1:])
                e.port, e.capacity = int(fields["port"]), int(fields["sessions"])
                ready[e.gpu].set()
        ready[e.gpu].set()

    for e in engines:
        threading.Thread(target=read, args=(e,), daemon=True).start()
    try:
        while not all(r.is_set() for r in ready.values()):
            for e in engines:
                if e.proc.poll() is not None and e.port == 0:
                    raise UserError(f"the engine on GPU {e.gpu} did not start (exit code {e.proc.returncode}); "
                                    f"its log is above")
            time.sleep(0.1)
        for e in engines:
            if e.port == 0:
                raise UserError(f"the engine on GPU {e.gpu} did not start (exit code {e.proc.poll()}); "
                                f"its log is above")
    except BaseException:
        for e in engines:
            if e.proc.poll() is None:
                e.proc.send_signal(signal.SIGINT)
        for e in engines:
            try:
                e.proc.wait(10)
            except subprocess.TimeoutExpired:
                e.proc.kill()
        raise
    return engines


def run_front(parser, args) -> int:
    device = "cpu" if args.device == "cpu" else "cuda"
    gpus = parse_gpus(args.gpus, device)
    engines = start_engines(parser, args, gpus, device)
    return asyncio.run(Front(args, engines).serve())
