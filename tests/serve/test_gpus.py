"""`ppx-serve --gpus`: one engine process per GPU behind one port, here two engine processes of
the tiny model on the CPU (`--gpus 0,1 --device cpu`): placement by free slots, the typed
refusal when every engine is full, an engine that dies, and draining on SIGTERM."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import pytest

from serving import Background, ServerProcess, encode, http_status, input_pcm, session

CAP = 2  # sessions per engine


def run(coro):
    return asyncio.run(coro)


def engine_sessions(front: ServerProcess) -> dict[str, int]:
    """Sessions on each engine, as the engines themselves count them (their /metrics through the front)."""
    out = {}
    for line in front.get("/metrics").splitlines():
        m = re.fullmatch(r'ppx_connections\{gpu="(\d+)"\} (\S+)', line)
        if m:
            out[m[1]] = int(float(m[2]))
    return out


def engine_pids(front: ServerProcess) -> list[int]:
    """The front's child processes, the engines (from /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == front.proc.pid:
                        pids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def wait_until(pred, timeout: float = 20, what: str = ""):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def front(tmp_path):
    with ServerProcess(tmp_path, "--gpus", "0,1", "--drain-timeout", "30", max_sessions=CAP, timeout=120) as s:
        yield s


def test_sessions_go_to_the_engine_with_most_free_slots_and_the_full_server_refuses(front):
    assert front.ready_fields == {"port": str(front.port), "sessions": "4", "engines": "2"}
    code, text = http_status(front.base + "/health")
    assert code == 200 and text.splitlines() == ["ready: 4 of 4 session slots free on 2 GPUs",
                                                 "gpu 0: 2 of 2 session slots free",
                                                 "gpu 1: 2 of 2 session slots free"]
    live = []
    expected = [{"0": 1, "1": 0}, {"0": 1, "1": 1}, {"0": 2, "1": 1}, {"0": 2, "1": 2}]
    for want in expected:
        live.append(Background(front.url))
        wait_until(lambda: engine_sessions(front) == want, what=f"sessions {want}")
    code, text = http_status(front.base + "/health")
    assert code == 503 and text.startswith("not ready: full: 0 of 4 session slots free on 2 GPUs")
    # every engine full: the session still reaches one, which refuses it as a lone server does
    r = run(session(front.url, {"voice_prompt": "NATF2"}, []))
    assert not r.handshake and r.close_code == 1013 and any("full" in e for e in r.errors), r
    metrics = front.get("/metrics")
    assert 'ppx_engine_placements_total{gpu="0"} 3' in metrics  # two live and the refused one (a tie)
    assert 'ppx_engine_up{gpu="1"} 1' in metrics
    assert re.search(r'^ppx_tick_seconds\{gpu="1",quantile="0.5"\} ', metrics, re.M)
    for b in live:
        r = b.join()
        assert r.handshake and not r.errors and len(r.audio) > 50
    # the page and the voices come from an engine; the Realtime endpoint passes through too
    assert json.loads(front.get("/api/voices")) == {"voices": ["NATF2", "VARM0"]}
    assert "<html" in front.get("/").lower()

    async def realtime():
        from websockets.asyncio.client import connect
        async with connect(f"ws://127.0.0.1:{front.port}/v1/realtime") as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 30))["type"]

    assert run(realtime()) == "session.created"


def test_an_engine_that_dies_is_taken_out_and_its_sessions_are_told(front):
    a, b = Background(front.url, frames=80), Background(front.url, frames=80)
    wait_until(lambda: engine_sessions(front) == {"0": 1, "1": 1}, what="one session per engine")
    pids = engine_pids(front)
    assert len(pids) == 2
    # the engine of GPU 1: the one listening on its own port (the later child)
    victim = max(pids)
    os.kill(victim, signal.SIGKILL)
    rb = None
    for r in (b.join(), a.join()):
        if r.close_code == 1011:
            rb = r
        else:
            survivor = r
    assert rb is not None and any("engine for this session stopped" in e for e in rb.errors), (a.result, b.result)
    assert survivor.handshake and not survivor.errors and len(survivor.audio) > 70
    code, text = http_status(front.base + "/health")
    lines = text.splitlines()
    assert code == 200 and lines[0] == "ready: 2 of 2 session slots free on 1 GPU"
    assert any(re.fullmatch(r"gpu \d: stopped \(exit code -9\)", x) for x in lines), lines
    assert http_status(front.base + "/health/live") == (200, "live: 1 of 2 engines running\n")
    # new sessions go to the engine left
    r = run(session(front.url, {"voice_prompt": "NATF2"}, encode(input_pcm()[: 1920 * 10]), pace=0.08))
    assert r.handshake and not r.errors
    m = front.get("/metrics")
    assert re.search(r'ppx_engine_up\{gpu="\d"\} 0', m) and re.search(r'ppx_engine_lost_sessions_total\{gpu="\d"\} 1', m)
    assert "stopped (exit code -9)" in front.log_text()


def test_sigterm_drains_every_engine(front):
    a = Background(front.url, frames=40)
    wait_until(lambda: sum(engine_sessions(front).values()) == 1, what="a session")
    t0 = time.monotonic()
    front.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    code, text = http_status(front.base + "/health")
    assert code == 503 and "draining" in text
    with pytest.raises(Exception, match="503"):
        run(session(front.url, {"voice_prompt": "NATF2"}, []))
    r = a.join()
    # the live session ran to its end, then everything stopped
    assert r.handshake and not r.errors and len(r.audio) >= 35, r
    assert front.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15
    assert "draining" in front.log_text()
