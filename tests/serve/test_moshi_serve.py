"""`ppx-serve` on a Moshi checkpoint (the tiny `moshi-811` trace's model on the CPU): `/api/chat`
sessions answer as Kyutai's server does (each frame stepped once, nothing for the first), the
prompt query parameters are ignored, the Realtime endpoint refuses instructions and a voice with
typed errors, and the server refuses PersonaPlex's prompt flags at start-up."""
from __future__ import annotations

import asyncio
import json
import subprocess

import numpy as np
import pytest

from engine.engine import Engine
from engine.sampling import SamplingParams

from conftest import GOLDEN, TINY
from serving import ServerProcess, encode, heard, input_pcm, installed, session

MOSHI = GOLDEN / "moshi-811"
MODEL = ["--moshi-weight", str(MOSHI / "lm.safetensors"), "--mimi-weight", str(TINY / "mimi.safetensors"),
         "--tokenizer", str(TINY / "tokenizer.model"), "--config", str(MOSHI / "config.json"), "--greedy"]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("moshi"), model=MODEL, voices=False, max_sessions=2) as s:
        yield s


def expected_text(pcm: np.ndarray) -> str:
    """What Kyutai's server semantics give for this audio: the engine stepping each frame once."""
    eng = Engine.load(config=MOSHI / "config.json", moshi_weight=MOSHI / "lm.safetensors",
                      mimi_weight=TINY / "mimi.safetensors", tokenizer=TINY / "tokenizer.model", device="cpu")
    slot = eng.open(None, None, SamplingParams(greedy=True))
    pieces = []
    for i in range(len(pcm) // 1920):
        out = eng.step({slot: pcm[i * 1920:(i + 1) * 1920]})[slot]
        if out.valid:
            pieces.append(eng.tokenizer.piece(out.text_id) or "")
    return "".join(pieces)


def test_a_chat_session_answers_as_kyutais_server(server):
    assert json.loads(server.get("/api/voices")) == {"voices": []}
    msgs = encode(input_pcm()[: 1920 * 60])
    # PersonaPlex's client sends a voice and a role prompt: a Moshi server ignores them
    r = run(session(server.url, {"voice_prompt": "NATF2", "text_prompt": "You are a pirate."}, msgs, pace=0.02))
    assert r.handshake and not r.errors, r.errors
    assert r.text and r.text == expected_text(heard(msgs))
    assert "started (/api/chat): voice none, 0 prompt tokens" in server.log_text()


def test_realtime_refuses_instructions_and_a_voice_and_serves_on(server):
    from websockets.asyncio.client import connect

    async def talk():
        events = []
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            created = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "instructions": "You are a pirate.",
                "audio": {"output": {"voice": "NATF2"}}}}))
            pcm = (input_pcm()[: 1920 * 30] * 32767).astype("<i2").tobytes()
            import base64
            for i in range(30):
                chunk = pcm[i * 3840:(i + 1) * 3840]
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}))
                await asyncio.sleep(0.02)
            try:
                while True:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 2.0)))
            except asyncio.TimeoutError:
                pass
        return created, events

    created, events = run(talk())
    assert created["type"] == "session.created" and created["session"]["instructions"] == ""
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert {e["param"] for e in errors} == {"session.instructions", "session.audio.output.voice"}
    assert all(e["code"] == "unsupported_setting" and "Moshi" in e["message"] for e in errors)
    updated = next(e for e in events if e["type"] == "session.updated")
    assert updated["session"]["instructions"] == ""
    assert any(e["type"] == "response.output_audio.delta" for e in events)


def test_prompt_flags_are_refused_at_start_up(tmp_path):
    r = subprocess.run([str(installed("ppx-serve")), *MODEL, "--device", "cpu", "--port", "0", "--voice-prompt",
                        "NATF2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == ("error: --voice-prompt: this Moshi checkpoint takes no voice or role "
                                                 "prompt (it starts every conversation from its initial tokens)")
