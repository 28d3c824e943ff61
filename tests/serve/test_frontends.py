"""`ppx-serve --frontends 2`: the sessions' websocket and codec work in two processes beside the
engine process, on one port. A session through them gets exactly what it gets from a server of
one process; voices (a .pt and a recording, loaded by the engine process), refusals, /health,
/metrics and a SIGTERM drain behave as a lone server's."""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from serving import ServerProcess, encode, input_pcm, session

PROMPT = "You are a pirate who repairs washing machines."


def run(coro):
    return asyncio.run(coro)


def together(url: str, params: list, inputs: list) -> list:
    """Sessions all at once (batched together, which gives what each alone would)."""
    out: list = [None] * len(params)

    def go(i):
        out[i] = run(session(url, params[i], inputs[i]))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(params))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_sessions_through_frontend_processes_equal_a_lone_servers(tmp_path):
    pcm = input_pcm()
    inputs = [encode(pcm[1920 * i: 1920 * (i + 30)]) for i in (0, 60, 120, 180)]
    params = [{"voice_prompt": v, "text_prompt": PROMPT, "seed": s} for v, s in
              (("NATF2", 1), ("VARM0", 2), ("NATF2", 3), ("VARM0", 4))]
    with ServerProcess(tmp_path / "one", max_sessions=4) as lone:
        want = together(lone.url, params, inputs)
    with ServerProcess(tmp_path / "two", "--frontends", "2", max_sessions=4) as s:
        out = together(s.url, params, inputs)
        for got, ref in zip(out, want):
            assert got.handshake and not got.errors
            assert got.text == ref.text and len(ref.text) > 5
            assert len(got.audio) == len(ref.audio)
        for _ in range(50):   # every session ended: its pages back (the figures come twice a second)
            if s.metric("ppx_kv_pages_used") == 0:
                break
            time.sleep(0.1)
        assert s.metric("ppx_kv_pages_used") == 0 and s.metric("ppx_kv_pages_free") > 0
        assert "ready" in s.get("/health")
        unknown = run(session(s.url, {"voice_prompt": "NOPE"}, inputs[0][:2]))
        assert not unknown.handshake and "NOPE" in " ".join(unknown.errors) and "NATF2" in " ".join(unknown.errors)
        log = s.log_text()
        assert "[front-0]" in log and "[front-1]" in log
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0


def test_frontends_need_a_count_of_one_or_more(tmp_path):
    with pytest.raises(RuntimeError, match="--frontends must be at least 1"):
        ServerProcess(tmp_path, "--frontends", "0", timeout=30)


def test_frontend_processes_get_the_servers_flags_and_share_the_codec_threads():
    from types import SimpleNamespace
    from pathlib import Path

    from frontends.serve.frontends import frontend_argv

    args = SimpleNamespace(max_sessions=96, codec_threads=8, frontends=4)
    argv = ["--frontends", "4", "--port=8998", "--agent-port", "9000", "--temp-text", "0.5", "--demo"]
    out = frontend_argv(argv, args, 8998, Path("/voices"))
    assert out == ["--temp-text", "0.5", "--port", "8998", "--max-sessions", "96", "--voice-prompt-dir", "/voices",
                   "--codec-threads", "2"]
    # codec threads the user gave are each frontend's
    assert frontend_argv(["--codec-threads=3"], args, 1, None)[-4:] == ["--port", "1", "--max-sessions", "96"]
    assert frontend_argv(["--codec-threads", "3"], args, 1, None)[:2] == ["--codec-threads", "3"]
    assert frontend_argv([], SimpleNamespace(max_sessions=4, codec_threads=1, frontends=2), 1, None)[-1] == "1"


def test_frontends_behind_each_gpus_engine(tmp_path):
    """`--gpus 0,1 --frontends 2` (here two CPU engines): each engine process runs its sessions'
    host work in two frontends; sessions through the front equal a lone server's, land on both
    engines, and SIGTERM drains the whole tree."""
    pcm = input_pcm()
    inputs = [encode(pcm[1920 * i: 1920 * (i + 16)]) for i in (0, 60, 120)]
    params = [{"voice_prompt": "NATF2", "text_prompt": PROMPT, "seed": s} for s in (1, 2, 3)]
    with ServerProcess(tmp_path / "one", max_sessions=3) as lone:
        want = together(lone.url, params, inputs)
    with ServerProcess(tmp_path / "gpus", "--gpus", "0,1", "--frontends", "2", max_sessions=2, timeout=150) as s:
        out = together(s.url, params, inputs)
        for got, ref in zip(out, want):
            assert got.handshake and not got.errors
            assert got.text == ref.text and len(ref.text) > 5
            assert len(got.audio) == len(ref.audio)
        log = s.log_text()
        for tag in ("[gpu 0 front-0]", "[gpu 0 front-1]", "[gpu 1 front-0]", "[gpu 1 front-1]"):
            assert tag in log
        placed = {line.split('"')[1]: float(line.split()[-1]) for line in s.get("/metrics").splitlines()
                  if line.startswith("ppx_engine_placements_total{")}
        assert sorted(placed) == ["0", "1"] and all(n >= 1 for n in placed.values())   # (3 sessions, 2 a GPU)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0
