"""`ppx-serve` with a real server on loopback and real websocket clients (tiny model, CPU)."""
import asyncio
import json
import os
import re
import signal
import time

import numpy as np
import pytest
import soundfile as sf

from frontends.offline import main as offline
from frontends.serve import build_parser
from serving import Background, ServerProcess, encode, heard, http_status, input_pcm, session

PROMPT = "You are a pirate who repairs washing machines."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("srv"), "--client-buffer-seconds", "1", max_sessions=3)
    yield s
    s.stop()


def run(coro):
    return asyncio.run(coro)


def _offline(server, tmp_path, user_pcm, voice, prompt, seed):
    wav = tmp_path / "heard.wav"
    sf.write(wav, user_pcm, 24000, subtype="FLOAT")  # exactly the samples the server decoded
    from serving import TINY
    rc = offline(["--input-wav", str(wav), "--output-wav", str(tmp_path / "o.wav"), "--output-text",
                  str(tmp_path / "o.json"), "--voice-prompt", voice, "--voice-prompt-dir", str(server.voices),
                  "--text-prompt", prompt, "--seed", str(seed), "--greedy", "--no-progress", "--device", "cpu",
                  "--moshi-weight", str(TINY / "lm.safetensors"), "--mimi-weight", str(TINY / "mimi.safetensors"),
                  "--tokenizer", str(TINY / "tokenizer.model"), "--config", str(TINY / "config.json")])
    assert rc == 0
    text = "".join(t for t in json.loads((tmp_path / "o.json").read_text()) if t not in ("PAD", "EPAD"))
    audio, _ = sf.read(tmp_path / "o.wav", dtype="float32")
    return text, audio


def _snr(x, ref):
    n = min(len(x), len(ref))
    return 10 * np.log10(np.sum(ref[:n] ** 2) / max(np.sum((x[:n] - ref[:n]) ** 2), 1e-20))


def test_a_session_equals_the_offline_tool(server, tmp_path):
    msgs = encode(input_pcm()[: 1920 * 60])
    res = run(session(server.url, {"voice_prompt": "NATF2", "text_prompt": PROMPT, "seed": 7}, msgs))
    assert res.handshake and not res.errors
    user = heard(msgs)
    user = user[: user.shape[0] // 1920 * 1920]
    text, audio = _offline(server, tmp_path, user, "NATF2", PROMPT, 7)
    assert res.text == text and len(text) > 20
    # The agent's audio came back through Opus, which on this random model's noise-like audio
    # keeps only ~2 dB of SNR; so compare with the offline WAV sent through the same encoder
    # (it differs from the server's input to the encoder only by the WAV's PCM16 rounding).
    want = heard(encode(audio, complexity=build_parser().parse_args([]).opus_complexity))
    # (the tiny model's 20-frame context forgets voice and prompt: another input makes it differ)
    other_input = encode(input_pcm()[1920 * 100: 1920 * 160])
    other = run(session(server.url, {"voice_prompt": "NATF2", "text_prompt": PROMPT, "seed": 7}, other_input))
    assert _snr(res.pcm(), want) > 25
    assert _snr(res.pcm(), want) > _snr(other.pcm(), want) + 10


def test_two_concurrent_sessions_equal_their_solo_runs(server):
    pcm = input_pcm()
    a = encode(pcm[: 1920 * 40])
    b = encode(pcm[1920 * 100: 1920 * 140])
    pa = {"voice_prompt": "NATF2", "text_prompt": PROMPT, "seed": 1}
    pb = {"voice_prompt": "VARM0", "text_prompt": "You are terse.", "seed": 2, "text_temperature": 0.9}

    # (real-time pacing or slower: while the tick thread opens the sessions, a voice WAV's
    # encoding included, their frames queue, and a queue of 2 s is refused as too fast)
    async def both():
        return await asyncio.gather(session(server.url, pa, a, pace=0.08), session(server.url, pb, b, pace=0.1))

    ra, rb = run(both())
    sa, sb = run(session(server.url, pa, a)), run(session(server.url, pb, b))
    for together, solo in ((ra, sa), (rb, sb)):
        assert together.handshake and not together.errors
        assert together.text == solo.text
        assert _snr(together.pcm(), solo.pcm()) > 30
    assert ra.text != rb.text  # different audio in (the tiny model forgets prompts after 20 frames)


def test_audio_from_sphn_is_accepted_and_ours_decodes_with_sphn(server):
    sphn = pytest.importorskip("sphn")
    w = sphn.OpusStreamWriter(24000)
    pcm = input_pcm()[: 1920 * 30]
    msgs = [w.append_pcm(pcm[i:i + 960]) for i in range(0, pcm.shape[0], 960)]
    res = run(session(server.url, {"voice_prompt": "NATF2", "text_prompt": PROMPT}, [m for m in msgs if m], pace=0.01))
    assert res.handshake and not res.errors and len(res.audio) > 10
    r = sphn.OpusStreamReader(24000)
    out = np.concatenate([r.append_bytes(m) for m in res.audio])
    assert out.shape[0] > 1920 * 20 and np.isfinite(out).all()


def test_http_endpoints(server):
    assert re.fullmatch(r"ready: [0-3] of 3 session slots free", server.get("/health").strip())
    assert server.get("/health/live").strip() == "live"
    assert json.loads(server.get("/api/voices")) == {"voices": ["NATF2", "VARM0"]}
    m = server.get("/metrics")
    for name in ("ppx_live_sessions", "ppx_tick_seconds_count", "ppx_late_frames_total", "ppx_refusals_total",
                 "ppx_slot_utilization", "ppx_max_sessions", "ppx_draining",
                 "ppx_errors_total"):
        assert name in m
    # where a frame's time goes on the host: an answer is queued after its frame waited for its
    # tick, and within seconds
    res = run(session(server.url, {"voice_prompt": "NATF2", "text_prompt": PROMPT}, encode(input_pcm()[: 1920 * 10])))
    assert res.handshake and not res.errors
    wait = server.metric('ppx_frame_wait_seconds{quantile="0.5"}')
    answer = server.metric('ppx_answer_seconds{quantile="0.5"}')
    assert 0 <= wait < answer < 5
    assert server.metric('ppx_answer_seconds{quantile="0.99"}') >= answer


def test_cpu_step_threads_leave_the_codec_threads_their_cores(server, monkeypatch):
    """On the CPU the step's torch threads take the cores the codec threads leave: more made the
    tiny model's tick about 3x slower beside two live sessions on 2 cores (94 against 29 ms)."""
    import frontends.serve.cli as serve
    from engine.errors import UserError

    monkeypatch.setattr(serve, "cpu_cores", lambda: 16)
    assert serve.step_threads(build_parser().parse_args(["--codec-threads", "4"])) == 12
    assert serve.step_threads(build_parser().parse_args(["--codec-threads", "16"])) == 1
    assert serve.step_threads(build_parser().parse_args(["--cpu-threads", "3"])) == 3
    with pytest.raises(UserError, match="--cpu-threads"):
        serve.step_threads(build_parser().parse_args(["--cpu-threads", "0"]))
    monkeypatch.undo()
    args = build_parser().parse_args([])
    want = (f"with {serve.step_threads(args)} torch thread(s) beside {args.codec_threads} codec thread(s) "
            f"on {serve.cpu_cores()} core(s)")
    assert want in server.log_text()


# ---------------------------------------------------------------------------------------
# Bad input: a clear 0x05 error or close code for that client only, while a canary session
# streaming in real time keeps its timing, and nothing leaks.


@pytest.fixture(scope="module")
def canary(server):
    """A session streaming 24 s of audio in real time beside the error cases."""
    import threading

    out = {}
    msgs = encode(np.tile(input_pcm(), 2)[: 1920 * 300])
    t = threading.Thread(target=lambda: out.setdefault("r", run(session(
        server.url, {"voice_prompt": "NATF2", "text_prompt": PROMPT}, msgs, pace=0.08))), daemon=True)
    t.start()
    time.sleep(1.0)
    yield
    t.join(60)
    r = out["r"]
    assert r.handshake and not r.errors and len(r.audio) > 250
    gaps = r.gaps()
    assert np.percentile(gaps, 99) < 0.25, np.percentile(gaps, 99)


def _refused(res, words, codes=(1007, 1008, 1003, 1013, 1009)):
    assert res.errors and any(w in res.errors[0] for w in words), res.errors
    assert res.close_code in codes, res.close_code


@pytest.mark.parametrize("voice", ["../NATF2.pt", "/etc/passwd", "OUTSIDE", "NA\x00TF2", "NOPE", ".."])
def test_bad_voice_names(server, canary, voice):
    outside = server.voices.parent / "outside.pt"
    outside.write_bytes(b"not a voice")
    link = server.voices / "OUTSIDE.pt"
    if not link.exists():
        link.symlink_to(outside)
    res = run(session(server.url, {"voice_prompt": voice, "text_prompt": PROMPT}))
    assert not res.handshake
    _refused(res, ["voice"])


@pytest.mark.parametrize("prompt, words", [("", ["empty"]), ("word " * 3000, ["tokens long"])])
def test_bad_role_prompts(server, canary, prompt, words):
    res = run(session(server.url, {"voice_prompt": "NATF2", "text_prompt": prompt}))
    assert not res.handshake
    _refused(res, words)


def test_malformed_ogg(server, canary):
    res = run(session(server.url, {"voice_prompt": "NATF2"}, raw=[b"\x01OggS" + bytes(200)]))
    assert res.handshake
    _refused(res, ["bad audio stream"], codes=(1007,))


def test_unknown_message_kind(server, canary):
    res = run(session(server.url, {"voice_prompt": "NATF2"}, raw=[b"\x09hello"]))
    _refused(res, ["unknown message kind 0x09"])


def test_message_over_the_size_limit(server, canary):
    res = run(session(server.url, {"voice_prompt": "NATF2"}, raw=[b"\x01" + bytes(2 << 20)]))
    assert res.handshake and res.close_code == 1009


def test_sending_ten_times_faster_than_real_time_is_refused(server, canary):
    """Pacing is judged by the client's own sending: 10x real time for seconds uses up the burst
    allowance (8 s of audio) within about a second, and the client is told why."""
    msgs = encode(np.tile(input_pcm(), 2)[: 1920 * 300])
    t0 = time.monotonic()
    res = run(session(server.url, {"voice_prompt": "NATF2"}, msgs, pace=0.008))
    _refused(res, ["faster than real time"], codes=(1008,))
    assert time.monotonic() - t0 < 10


def test_a_client_back_from_a_network_stall_is_served(server, canary):
    """A client whose network stalls for 4 s sends the audio it held at once, then goes on in
    real time: it is served to the end, not refused."""
    msgs = encode(np.tile(input_pcm(), 2)[: 1920 * 120])
    pace = [0.08] * 20 + [4.0] + [0.0] * 50 + [0.08] * 49
    res = run(session(server.url, {"voice_prompt": "NATF2", "text_prompt": PROMPT}, msgs, pace=pace))
    assert res.handshake and not res.errors, res.errors
    assert len(res.audio) >= 100


def test_a_client_that_never_reads_is_dropped(server, canary):
    """A client that sends but never reads: once its socket and the server's outbox (1 s of
    audio here) are full, the server drops it; nothing else is affected (the canary)."""
    import socket

    from websockets.asyncio.client import connect

    before = server.metric("ppx_errors_total")

    async def stalled():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(("127.0.0.1", server.port))
        async with connect(f"{server.url}?voice_prompt=NATF2", sock=sock, max_queue=1, close_timeout=1) as ws:
            assert (await asyncio.wait_for(ws.recv(), 30))[:1] == b"\x00"
            for m in encode(input_pcm()[: 1920 * 230]) * 2:
                await ws.send(b"\x01" + m)
                await asyncio.sleep(0.02)
                if server.metric("ppx_errors_total") > before:
                    return True
        return False

    assert run(stalled())


def test_one_session_over_the_limit_is_refused(server, canary):
    async def crowd():
        msgs = encode(input_pcm()[: 1920 * 25])
        free = 3 - int(server.metric("ppx_connections"))  # --max-sessions 3, less the canary
        held = [asyncio.create_task(session(server.url, {"voice_prompt": "NATF2"}, msgs, pace=0.08))
                for _ in range(free)]
        await asyncio.sleep(1.0)
        extra = await session(server.url, {"voice_prompt": "NATF2"})
        return extra, await asyncio.gather(*held)

    extra, held = run(crowd())
    _refused(extra, ["full"], codes=(1013,))
    assert all(h.handshake and not h.errors for h in held)


def test_disconnects_during_the_prompt_and_many_cycles_leak_nothing(server, canary):
    from websockets.asyncio.client import connect

    async def cycles(n):
        for i in range(n):
            async with connect(f"{server.url}?voice_prompt=NATF2&text_prompt=hi{i % 7}") as ws:
                if i % 2:
                    await asyncio.wait_for(ws.recv(), 10)   # after the handshake
            # else: gone during the prompt phase

    tasks0 = server.metric("ppx_tasks")
    run(cycles(200))
    time.sleep(1.0)
    assert server.metric("ppx_connections") <= 1          # the canary at most
    assert server.metric("ppx_free_slots") >= 2
    assert server.metric("ppx_tasks") <= tasks0 + 2


def test_wrong_api_key_is_refused_before_the_upgrade(tmp_path):
    from websockets.exceptions import InvalidStatus

    s = ServerProcess(tmp_path, "--api-key", "sesame", max_sessions=1)
    try:
        with pytest.raises(InvalidStatus) as e:
            run(session(s.url, {"voice_prompt": "NATF2", "api_key": "wrong"}))
        assert e.value.response.status_code == 401
        ok = run(session(s.url, {"voice_prompt": "NATF2"}, headers={"Authorization": "Bearer sesame"}))
        assert ok.handshake
    finally:
        s.stop()


def test_sigterm_drains_then_stops(tmp_path):
    """SIGTERM: /health turns 503 and new sessions are refused while the live one goes on; at
    --drain-timeout it is told the server is shutting down (1001) and the server exits 0."""
    s = ServerProcess(tmp_path, "--drain-timeout", "2.5", max_sessions=2)
    live = Background(s.url, frames=100)
    time.sleep(2.5)
    assert http_status(s.base + "/health") == (200, "ready: 1 of 2 session slots free\n")
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    code, text = http_status(s.base + "/health")
    assert code == 503 and "draining" in text
    assert http_status(s.base + "/health/live")[0] == 200
    with pytest.raises(Exception, match="503"):
        run(session(s.url, {"voice_prompt": "NATF2"}, []))
    assert not live.done()
    assert s.proc.wait(10) == 0
    stopped = time.monotonic() - t0
    assert 2.3 < stopped < 6, stopped
    r = live.join(10)
    assert r.handshake and any("shutting down" in e for e in r.errors) and r.close_code == 1001
    # it kept getting answers through the drain
    assert sum(1 for a in r.arrivals if a > t0 + 1.0) > 10
    assert "draining: 1 live session(s)" in s.log_text()
    s.stop()


def test_sigint_stops_at_once(tmp_path):
    s = ServerProcess(tmp_path, max_sessions=1)
    live = Background(s.url, frames=100)
    time.sleep(2.5)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    r = live.join(10)
    assert r.handshake and any("shutting down" in e for e in r.errors) and r.close_code == 1001
    s.stop()


def test_the_demo_serves_a_tiny_model_with_its_voice_and_page(tmp_path):
    """`ppx-serve --demo` (make serve): no model files, no token, no GPU; it says its output is
    noise and where to point a browser, lists its voice, serves the page and holds a session."""
    with ServerProcess(tmp_path, "--demo", model=[], voices=False, max_sessions=None,
                       env={"PPX_CACHE": str(tmp_path / "cache")}) as s:
        assert json.loads(s.get("/api/voices")) == {"voices": ["DEMO0"]}
        assert "<html" in s.get("/").lower()
        res = run(session(s.url, {"text_prompt": PROMPT}, encode(input_pcm()[: 1920 * 10])))
        assert res.handshake and not res.errors and res.audio
        log = s.log_text()
    assert "noise" in log and f"open http://127.0.0.1:{s.port}/ in a browser" in log
    assert (tmp_path / "cache" / "demo-tiny-seed0" / "model.safetensors").is_file()


def test_a_7b_without_a_gpu_needs_device_cpu_by_name(tmp_path):
    """Without a GPU, the 7B would answer each 80 ms frame in seconds: ppx-serve says so, before
    it reads or fetches anything, unless --device cpu asks for it."""
    import subprocess

    from serving import installed

    r = subprocess.run([str(installed("ppx-serve")), "--device", "auto"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--device cpu" in r.stderr and "real time" in r.stderr and "ppx-serve --demo" in r.stderr
