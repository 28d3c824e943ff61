"""`ppx-serve` under faults: a server that stalls, a slow host, a client that stops reading,
hostile requests before and after the upgrade. Each case gets a clear answer for that client
only, and healthy sessions carry on. (The installed ppx-serve on the tiny model, CPU, loopback.)"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from serving import ServerProcess, TINY, encode, input_pcm, session

PROMPT = "You are a pirate who repairs washing machines."


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("faults"), "--api-key", "sesame", max_sessions=4) as s:
        yield s


KEY = {"X-API-Key": "sesame"}


def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    return t, out


def _http(server, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, str]:
    """(status, body) of a plain request, written by hand so that headers may repeat."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        for k, v in (headers or {}).items():
            for value in (v if isinstance(v, list) else [v]):
                lines.append(f"{k}: {value}")
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(
                    b"content-length:")), 0)
                if len(body) >= length:
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------
# the server falls behind: everyone carries on


def test_a_paused_server_keeps_every_session(tmp_path):
    """SIGSTOP the server for 3 s with two live sessions streaming in real time: both carry on to
    the end, nobody gets an error, and the backlog drains."""
    with ServerProcess(tmp_path, max_sessions=2) as s:
        msgs = encode(np.tile(input_pcm(), 2)[: 1920 * 150])
        results = []

        async def both():
            return await asyncio.gather(*(session(s.url, {"voice_prompt": "NATF2", "text_prompt": PROMPT}, msgs,
                                                  pace=0.08, linger=2.0) for _ in range(2)))

        t, out = _in_thread(lambda: run(both()))
        time.sleep(4.0)
        s.proc.send_signal(signal.SIGSTOP)
        time.sleep(3.0)
        s.proc.send_signal(signal.SIGCONT)
        t.join(60)
        results = out["r"]
        for r in results:
            assert r.handshake and not r.errors, r.errors
            assert r.close_code in (None, 1000), r.close_code
            # every frame sent was answered (the pause lost nothing; the drain outran real time)
            assert len(r.audio) >= len(msgs) - 2, (len(r.audio), len(msgs))
        assert s.metric("ppx_errors_total") == 0
        assert "faster than real time" not in s.log_text()


def test_a_host_slower_than_real_time_drops_input_within_the_bound_and_says_so(tmp_path):
    """A server whose ticks cannot keep up (the real server over a stand-in engine whose ticks
    take 200 ms: 5 a second for a 12.5 frames/s stream) keeps the session, answers within
    --max-backlog-seconds of the input, counts the frames it dropped, and logs that the server
    is behind; the client is not blamed."""
    stand_in = [sys.executable, "-m", "benchmarks.serve_host", "--serve", "200", "echo"]
    with ServerProcess(tmp_path, "--max-backlog-seconds", "1", max_sessions=1, model=[], voices=True,
                       program=stand_in) as s:
        msgs = encode(np.tile(input_pcm(), 2)[: 1920 * 100])
        r = run(session(s.url, {}, msgs, pace=0.08))
        assert r.handshake and not r.errors
        assert 20 < s.metric("ppx_dropped_input_frames_total") < len(msgs)
        assert len(r.audio) > 30
        log = s.log_text()
        assert "the server is behind real time" in log and "faster than real time" not in log


# ---------------------------------------------------------------------------------------
# voices load off the tick thread


def test_a_long_voice_recording_loads_beside_live_sessions(tmp_path):
    """Opening a session with a 120 s WAV voice: it is encoded off the tick thread, so a session
    already streaming keeps its answers coming (no gap grows by a frame); the encoding is kept on
    disk, and a restarted server uses it instead of encoding again."""
    cache = tmp_path / "cache"
    pcm, rate = sf.read(TINY / "voice.wav", dtype="float32")
    long_voice = np.tile(pcm, int(np.ceil(120 * rate / len(pcm))))[: 120 * rate]
    env = {"PPX_CACHE": str(cache)}
    with ServerProcess(tmp_path / "a", max_sessions=2, env=env) as s:
        sf.write(s.voices / "LONG.wav", long_voice, rate)
        msgs = encode(np.tile(input_pcm(), 3)[: 1920 * 200])
        t, out = _in_thread(lambda: run(session(s.url, {"voice_prompt": "NATF2", "text_prompt": PROMPT}, msgs,
                                                pace=0.08)))
        time.sleep(3.0)
        t0 = time.monotonic()
        other = run(session(s.url, {"voice_prompt": "LONG", "text_prompt": PROMPT}, encode(input_pcm()[: 1920 * 5])))
        opened = time.monotonic() - t0
        t.join(60)
        steady = out["r"]
        assert other.handshake and not other.errors and steady.handshake and not steady.errors
        gaps = steady.gaps()[5:]
        # a frame period is 80 ms; the answers of the steady session never stalled for the voice
        assert gaps.max() < 0.08 + 0.08, (gaps.max(), opened)
        assert "encoded voice LONG.wav" in s.log_text()
    assert list((cache / "voices").glob("*.npy"))
    with ServerProcess(tmp_path / "b", max_sessions=1, env=env) as s:
        sf.write(s.voices / "LONG.wav", long_voice, rate)
        t0 = time.monotonic()
        again = run(session(s.url, {"voice_prompt": "LONG", "text_prompt": PROMPT}, encode(input_pcm()[: 1920 * 5])))
        assert again.handshake and not again.errors
        assert "encoded voice" not in s.log_text()


# ---------------------------------------------------------------------------------------
# a client that stops reading, a client that goes silent


def test_a_client_that_stops_reading_is_dropped_after_the_buffer_it_was_given(tmp_path):
    """Default --client-buffer-seconds 5: counted over everything waiting on the server's side
    (outbox, websocket buffer, socket send queue), the client is dropped about 5 s after it stops
    reading, not half a minute later."""
    from websockets.asyncio.client import connect

    with ServerProcess(tmp_path, max_sessions=1) as s:
        async def stalled():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", s.port))
            async with connect(f"{s.url}?voice_prompt=NATF2", sock=sock, max_queue=1, close_timeout=1,
                               ping_interval=None) as ws:
                assert (await asyncio.wait_for(ws.recv(), 30))[:1] == b"\x00"
                msgs = encode(np.tile(input_pcm(), 2)[: 1920 * 400])
                stopped = time.monotonic()   # from here on nothing is read
                for m in msgs:
                    await ws.send(b"\x01" + m)
                    await asyncio.sleep(0.08)
                    if s.metric("ppx_errors_total") > 0:
                        return time.monotonic() - stopped
            return None

        after = run(stalled())
        assert after is not None and 4.0 < after < 9.0, after
        assert "not reading its audio" in s.log_text()


def test_a_silent_client_is_closed_after_the_idle_timeout(tmp_path):
    with ServerProcess(tmp_path, "--idle-timeout", "1.5", max_sessions=1) as s:
        t0 = time.monotonic()
        r = run(session(s.url, {"voice_prompt": "NATF2"}, linger=4.0))
        assert r.handshake and r.errors and "no audio for 1.5 s" in r.errors[0]
        assert r.close_code == 1008 and time.monotonic() - t0 < 8
        assert s.metric("ppx_free_slots") == 1


# ---------------------------------------------------------------------------------------
# hostile requests


def test_header_lines_are_short_before_authorisation(server):
    status, _ = _http(server, "/api/chat", {"X-Junk": "x" * 20000})
    assert status == 431
    status, _ = _http(server, "/api/chat?text_prompt=" + "a" * 70000)
    assert status == 414
    # a long role prompt still fits the request line
    assert _http(server, "/health?x=" + "a" * 30000)[0] == 200


def test_duplicate_auth_headers_are_a_bad_request_not_a_crash(server):
    for name in ("X-API-Key", "Authorization"):
        status, body = _http(server, "/api/chat", {name: ["sesame", "sesame"]})
        assert status == 400 and name in body
    assert "Traceback" not in server.log_text()


def test_too_many_query_parameters(server):
    q = "&".join(f"p{i}=1" for i in range(70))
    status, body = _http(server, f"/api/chat?{q}")  # (the key is looked for among them)
    assert status == 400 and "64" in body
    with ServerProcess(server.tmp / "open", max_sessions=1) as s:  # no API key: the websocket says why
        r = run(session(s.url, {f"p{i}": 1 for i in range(70)}))
        assert not r.handshake and r.errors and "64 query parameters" in r.errors[0] and r.close_code == 1008
        assert "Traceback" not in s.log_text()


def test_close_reasons_are_cut_by_bytes(server):
    """A voice name of emoji makes a long error: the close frame still carries 1008 (a reason
    cut by characters overflowed the frame's 125 bytes, and the client saw 1006)."""
    r = run(session(server.url, {"voice_prompt": "\U0001F3B5" * 60}, headers=KEY))
    assert r.errors and r.close_code == 1008


def test_a_message_over_the_limit_is_told_before_the_close(server):
    r = run(session(server.url, {"voice_prompt": "NATF2"}, headers=KEY, raw=[b"\x01" + bytes(2 << 20)]))
    assert r.handshake and r.errors and "1 MiB" in r.errors[0] and r.close_code == 1009


def test_the_voice_list_needs_the_key(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        server.get("/api/voices")
    assert e.value.code == 401
    req = urllib.request.Request(f"{server.base}/api/voices", headers=KEY)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert b"NATF2" in r.read()


def test_client_mistakes_are_one_warning_line_each_without_tracebacks(server):
    for _ in range(3):
        _http(server, "/api/chat", {"X-API-Key": "wrong"})
    log = server.log_text()
    assert "Traceback" not in log
    assert log.count("WARNING ppx.serve: client") >= 3


def test_the_generated_tls_key_is_private_from_the_start(tmp_path):
    from frontends.serve.tls import self_signed

    old = os.umask(0)
    try:
        self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
