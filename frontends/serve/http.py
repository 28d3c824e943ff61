"""The HTTP side of `ppx-serve`: the API key check before a websocket upgrade, `/health`
(readiness: 503 when full or draining), `/health/live` (liveness), `/metrics` (Prometheus
text), `/api/voices`, the page's static files, the limits on what a request may hold before it
is authorised, and one rate-limited warning per client mistake."""
from __future__ import annotations

import asyncio
import collections
import http
import json
import logging
import secrets
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from engine.errors import UserError

log = logging.getLogger("ppx.serve")

STATIC = Path(__file__).resolve().parent.parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon", ".wasm": "application/wasm", ".map": "application/json",
                 ".txt": "text/plain"}
# What a request may hold before it is authorised. The request line carries the session's
# settings, the role prompt among them (up to 1 000 tokens, percent-encoded), so it may be long;
# a header line has no reason to be (a larger one gets 431).
REQUEST_LINE_BYTES = 64 << 10
HEADER_LINE_BYTES = 8 << 10
MAX_HEADERS = 64
MAX_QUERY_FIELDS = 64


def limit_http_lines() -> None:
    """Sets websockets' HTTP parser to the limits above: its one line limit serves both the
    request line and the header lines, so header lines get their own, smaller one."""
    from websockets import http11
    from websockets.exceptions import InvalidHeader

    HeaderLineTooLong = getattr(http11, "HeaderLineTooLong", None) or InvalidHeader
    http11.MAX_LINE_LENGTH = REQUEST_LINE_BYTES
    http11.MAX_NUM_HEADERS = MAX_HEADERS
    if getattr(http11.parse_line, "_ppx", False):
        return
    plain = http11.parse_line

    def parse_line(read_line, too_long_exc_type=http11.SecurityError):
        if too_long_exc_type is HeaderLineTooLong:
            def limited(_limit, exc):
                return read_line(HEADER_LINE_BYTES, exc)
            return plain(limited, too_long_exc_type)
        return plain(read_line, too_long_exc_type)

    parse_line._ppx = True
    http11.parse_line = parse_line


class ClientWarnings:
    """One WARNING line, no traceback, per client mistake; past `burst` in `per` seconds the rest
    are counted and summed up in the next line that gets through."""

    def __init__(self, burst: int = 20, per: float = 10.0):
        self.burst, self.per = burst, per
        self._times: collections.deque = collections.deque()
        self._suppressed = 0

    def __call__(self, who: str, message: str) -> None:
        now = time.monotonic()
        while self._times and now - self._times[0] > self.per:
            self._times.popleft()
        if len(self._times) >= self.burst:
            self._suppressed += 1
            return
        self._times.append(now)
        extra = f" ({self._suppressed} more not shown)" if self._suppressed else ""
        self._suppressed = 0
        log.warning("client %s: %s%s", who, message, extra)


class HttpError(Exception):
    def __init__(self, status: http.HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def one_header(headers, name: str) -> str | None:
    values = headers.get_all(name)
    if len(values) > 1:
        raise HttpError(http.HTTPStatus.BAD_REQUEST, f"send the {name} header once")
    return values[0] if values else None


def query_fields(query: str) -> dict[str, list[str]]:
    try:
        return parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise HttpError(http.HTTPStatus.BAD_REQUEST, f"at most {MAX_QUERY_FIELDS} query parameters") from None


def presented_key(request, query: str) -> str:
    """The API key a request presents (X-API-Key, Authorization: Bearer, or ?api_key=)."""
    got = one_header(request.headers, "X-API-Key") or ""
    auth = one_header(request.headers, "Authorization") or ""
    if auth.lower().startswith("bearer "):
        got = got or auth[7:].strip()
    return got or (query_fields(query).get("api_key") or [""])[-1]


def respond(connection, status: http.HTTPStatus, body: str | bytes, ctype: str = "text/plain; charset=utf-8"):
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    data = body.encode("utf-8") if isinstance(body, str) else body
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(data))), ("Cache-Control", "no-store")])
    return Response(status.value, status.phrase, headers, data)


class HttpRoutes:
    """`process_request` of the websocket server: answers plain HTTP, and lets a websocket
    upgrade through (returns None) only to a websocket path, with the API key when one is set."""

    def __init__(self, *, api_key: str | None, static: Path | None, websocket_paths: tuple[str, ...], ready,
                 health, live, metrics_text, voice_names, warn: ClientWarnings):
        self.api_key = api_key
        self.static = (static or STATIC).resolve()
        self.websocket_paths = websocket_paths
        self.ready = ready                  # () -> (bool, reason): may a session start
        self.health = health                # () -> (bool, text): ready and room for one more
        self.live = live                    # () -> (bool, text): the process serves (full or not)
        self.metrics_text = metrics_text    # () -> str
        self.voice_names = voice_names      # () -> list[str]
        self.warn = warn
        self.refusals = 0

    def authorized(self, request, query: str) -> bool:
        if not self.api_key:
            return True
        return secrets.compare_digest(presented_key(request, query).encode(), self.api_key.encode())

    def __call__(self, connection, request):
        url = urlsplit(request.path)
        path = url.path
        peer = _peer(connection)
        try:
            if path in self.websocket_paths:
                if not self.authorized(request, url.query):
                    self.refusals += 1
                    self.warn(peer, f"{path}: no valid API key")
                    return respond(connection, http.HTTPStatus.UNAUTHORIZED, "a valid API key is required\n")
                ok, why = self.ready()
                if not ok:
                    return respond(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, f"{why}\n")
                return None
            if path in ("/health", "/health/live"):
                ok, text = (self.health if path == "/health" else self.live)()
                return respond(connection, http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE,
                               f"{text}\n")
            if path == "/metrics":
                return respond(connection, http.HTTPStatus.OK, self.metrics_text(), "text/plain; version=0.0.4")
            if path == "/api/voices":
                if not self.authorized(request, url.query):
                    self.warn(peer, f"{path}: no valid API key")
                    return respond(connection, http.HTTPStatus.UNAUTHORIZED, "a valid API key is required\n")
                return respond(connection, http.HTTPStatus.OK, json.dumps({"voices": self.voice_names()}),
                               "application/json")
            return self.static_file(connection, path)
        except HttpError as e:
            self.warn(peer, f"{path}: {e}")
            return respond(connection, e.status, f"{e}\n")

    def static_file(self, connection, path: str):
        rel = "index.html" if path in ("", "/") else path.lstrip("/")
        target = (self.static / rel).resolve()
        if "\x00" in rel or (self.static not in target.parents) or not target.is_file():
            return respond(connection, http.HTTPStatus.NOT_FOUND, "not found\n")
        return respond(connection, http.HTTPStatus.OK, target.read_bytes(),
                       CONTENT_TYPES.get(target.suffix, "application/octet-stream"))


def _peer(connection) -> str:
    addr = getattr(connection, "remote_address", None)
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "-"


def prometheus(gauges: list[tuple[str, str, float]], counters: list[tuple[str, str, float]],
               summaries: list[tuple[str, str, collections.deque, list[str]]]) -> str:
    """Prometheus text: (name, help, value) gauges and counters, and (name, help, window of
    recent values, extra lines) summaries with their median and 99th percentile."""
    lines = []
    for name, help_, value in gauges:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value:.12g}"]
    for name, help_, value in counters:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value:.12g}"]
    for name, help_, window, extra in summaries:
        w = sorted(window.copy())  # a deque's copy is atomic; other threads append meanwhile
        q = [w[min(len(w) - 1, int(p * len(w)))] if w else 0.0 for p in (0.5, 0.99)]
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} summary", f'{name}{{quantile="0.5"}} {q[0]:.6f}',
                  f'{name}{{quantile="0.99"}} {q[1]:.6f}', *extra]
    return "\n".join(lines) + "\n"


def room_text(free: int, capacity: int) -> str:
    return f"{free} of {capacity} session slot{'s' if capacity != 1 else ''} free"


def agent_reply(free: int, capacity: int, *, alive: bool, accepting: bool) -> bytes:
    """HAProxy's agent-check answer: the share of free slots as the server's weight ("up 50%"),
    0% when full or draining (no new sessions; live ones go on), "down" when the engine stopped."""
    if not alive:
        return b"down\n"
    pct = 0 if not accepting or free <= 0 or capacity <= 0 else max(1, round(100 * free / capacity))
    return f"up {pct}%\n".encode()


async def serve_agent(host: str, port: int, reply) -> asyncio.Server:
    """A TCP port answering HAProxy's agent check: one line from `reply()` per connection."""

    async def answer(reader, writer):
        try:
            writer.write(reply())
            await asyncio.wait_for(writer.drain(), 2.0)
        except Exception:  # noqa: BLE001 - the checker went away
            pass
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(answer, host, port)
    except OSError as e:
        raise UserError(f"--agent-port {port}: {e.strerror or e}") from None
    log.info("agent check on %s:%d (HAProxy agent-check: the free share of slots as the weight)", host,
             server.sockets[0].getsockname()[1])
    return server
