"""`/v1/realtime` driven by the `openai` package's own Realtime client, against the installed
`ppx-serve` (tiny model, CPU, loopback): the session's events, audio and transcript deltas in
real time, settings before and after the first audio, typed errors for bad events (the session
lives on), the capacity refusal, and G.711 mu-law at 8 kHz both ways."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest
import soxr

from frontends import g711
from frontends.realtime import SILENT_FRAMES, AudioFormat, Responses

from serving import ServerProcess, input_pcm

openai = pytest.importorskip("openai")

PROMPT = "You are a pirate who repairs washing machines."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("realtime"), max_sessions=2) as s:
        yield s


def run(coro):
    return asyncio.run(coro)


def _client(server):
    return openai.AsyncOpenAI(api_key="unused", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")


def _pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1, 1) * 32767).round().astype("<i2").tobytes()


async def _talk(server, session: dict, chunks: list[bytes], pace: float, extra: list[dict] = (),
                linger: float = 1.5, query: dict | None = None):
    """Connects with the SDK, updates the session, sends `extra` raw events, then the audio
    chunks (one per `pace` seconds); returns every event received, with its arrival time."""
    events = []
    async with _client(server).realtime.connect(model="personaplex", extra_query=query or {}) as conn:
        async def read():
            async for e in conn:
                events.append((time.monotonic(), e))

        reader = asyncio.create_task(read())
        await conn.session.update(session=session)
        for raw in extra:
            await conn.send(raw)
        for c in chunks:
            await conn.input_audio_buffer.append(audio=base64.b64encode(c).decode())
            await asyncio.sleep(pace)
        await asyncio.sleep(linger)
        reader.cancel()
    return events


def _types(events) -> list[str]:
    return [e.type for _, e in events]


SESSION = {"type": "realtime", "instructions": PROMPT, "output_modalities": ["audio"],
           "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
                     "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "NATF2"}}}


def test_the_openai_client_talks_and_hears_the_agent_in_real_time(server):
    """Audio in uneven chunks (the server frames it into 80 ms frames), answered while it is
    sent: audio and transcript deltas inside responses, in the GA event names."""
    pcm = input_pcm()[: 24000 * 8]
    sizes = [1000, 2500, 4800, 700, 3840]
    chunks, at = [], 0
    while at < pcm.shape[0]:
        n = sizes[len(chunks) % len(sizes)]
        chunks.append(_pcm16(pcm[at:at + n]))
        at += n
    t0 = time.monotonic()
    events = run(_talk(server, SESSION, chunks, pace=8 / len(chunks)))
    types = _types(events)
    assert types[0] == "session.created" and "session.updated" in types and "error" not in types, types[:5]
    updated = next(e for _, e in events if e.type == "session.updated").session
    assert updated.instructions == PROMPT and updated.audio.output.voice == "NATF2"
    assert updated.audio.input.turn_detection is None
    assert "response.created" in types and "response.output_audio.delta" in types
    assert "response.output_audio_transcript.delta" in types
    deltas = [(t, e) for t, e in events if e.type == "response.output_audio.delta"]
    audio = b"".join(base64.b64decode(e.delta) for _, e in deltas)
    frames = len(audio) // 2 // 1920
    assert frames >= 0.8 * pcm.shape[0] / 1920  # (quiet stretches between responses are not sent)
    # answers stream while the client still talks: the first came within a second or two
    assert deltas[0][0] - t0 < 3.0 and deltas[-1][0] - deltas[0][0] > 4.0
    rid = next(e for _, e in events if e.type == "response.created").response.id
    assert all(e.response_id == rid for _, e in deltas[:3])


def test_bad_events_get_typed_errors_and_the_session_lives_on(server):
    bad = [{"type": "no.such.event"}, {"type": "input_audio_buffer.append", "audio": "%%% not base64"},
           {"type": "conversation.item.create", "item": {"type": "message"}},
           {"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}],
                                                  "output_modalities": ["text"]}},
           {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000},
                                                                      "turn_detection": {"type": "server_vad"}}}}},
           {"type": "session.update", "session": {"audio": {"output": {"voice": "alloy"}}}}]
    chunks = [_pcm16(input_pcm()[i:i + 1920]) for i in range(0, 1920 * 40, 1920)]
    events = run(_talk(server, SESSION, chunks, pace=0.08, extra=bad))
    codes = [e.error.code for _, e in events if e.type == "error"]
    for code in ("unknown_event", "invalid_base64", "unsupported_event", "unsupported_tools",
                 "unsupported_modalities", "unsupported_audio_format", "unsupported_turn_detection", "invalid_voice"):
        assert code in codes, (code, codes)
    # and the session went on: the audio sent after the mistakes was answered
    assert sum(e.type == "response.output_audio.delta" for _, e in events) > 20


def test_raw_malformed_json_gets_an_error_event(server):
    from websockets.asyncio.client import connect

    async def go():
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime?model=x") as ws:
            first = json.loads(await ws.recv())
            await ws.send("{not json")
            err = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
            after = json.loads(await ws.recv())
            return first, err, after

    first, err, after = run(go())
    assert first["type"] == "session.created" and first["session"]["type"] == "realtime"
    assert err["type"] == "error" and err["error"]["code"] == "invalid_json" and err["event_id"]
    assert after["type"] == "session.updated" and after["session"]["instructions"] == "Be brief."


def test_the_context_is_set_at_the_first_audio(server):
    """Instructions and voice may change until the first audio; after it they are refused with
    a typed error, and the session keeps the ones its prompt phase used."""
    later = {"type": "session.update", "session": {"instructions": "Now be a poet."}}

    async def go():
        events = []
        async with _client(server).realtime.connect(model="personaplex") as conn:
            async def read():
                async for e in conn:
                    events.append(e)
            reader = asyncio.create_task(read())
            await conn.session.update(session={"instructions": "Be brief."})
            for i in range(0, 1920 * 10, 1920):
                await conn.input_audio_buffer.append(audio=base64.b64encode(_pcm16(input_pcm()[i:i + 1920])).decode())
                await asyncio.sleep(0.08)
            await conn.send(later)
            await asyncio.sleep(1.0)
            reader.cancel()
        return events

    events = run(go())
    errors = [e for e in events if e.type == "error"]
    assert [e.error.code for e in errors] == ["session_already_started"]
    assert errors[0].error.param == "session.instructions"
    assert [e for e in events if e.type == "session.updated"][-1].session.instructions == "Be brief."


def test_a_session_over_the_limit_gets_a_typed_refusal(tmp_path):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    with ServerProcess(tmp_path, max_sessions=1) as s:
        async def go():
            async with connect(f"ws://127.0.0.1:{s.port}/v1/realtime") as first:
                assert json.loads(await first.recv())["type"] == "session.created"
                async with connect(f"ws://127.0.0.1:{s.port}/v1/realtime") as second:
                    msg = json.loads(await second.recv())
                    try:
                        await second.recv()
                    except ConnectionClosed:
                        pass
                    return msg, second.close_code

        msg, code = run(go())
    assert msg["type"] == "error" and msg["error"]["code"] == "server_full" and code == 1013


def test_mulaw_at_8khz_round_trips(server):
    """Speech sent as G.711 mu-law at 8 kHz, the answer asked for as mu-law too: it decodes to
    the agent's audio, the same as asking the same session (same input, voice, seed, greedy)
    for 24 kHz PCM and converting that."""
    pcm8 = soxr.resample(input_pcm()[: 24000 * 6], 24000, 8000)
    ulaw = g711.encode((np.clip(pcm8, -1, 1) * 32767).round().astype(np.int16), "ulaw")
    chunks = [ulaw[i:i + 800] for i in range(0, len(ulaw), 800)]  # 100 ms chunks

    def session(out_fmt):
        return {"type": "realtime", "instructions": PROMPT,
                "audio": {"input": {"format": {"type": "audio/pcmu"}},
                          "output": {"format": out_fmt, "voice": "NATF2"}}}

    async def both():
        return await asyncio.gather(_talk(server, session({"type": "audio/pcmu"}), chunks, pace=0.1),
                                    _talk(server, session({"type": "audio/pcm", "rate": 24000}), chunks, pace=0.1))

    mu, lin = run(both())
    assert "error" not in _types(mu) and "error" not in _types(lin)
    mu_audio = g711.decode(b"".join(base64.b64decode(e.delta) for _, e in mu
                                    if e.type == "response.output_audio.delta"), "ulaw").astype(np.float32) / 32768
    lin_audio = np.frombuffer(b"".join(base64.b64decode(e.delta) for _, e in lin
                                       if e.type == "response.output_audio.delta"), "<i2").astype(np.float32) / 32768
    want = AudioFormat("audio/pcmu")  # the server's own conversion, applied to the 24 kHz answer
    want = g711.decode(want.encode(lin_audio), "ulaw").astype(np.float32) / 32768
    n = min(len(mu_audio), len(want))
    assert n > 8000 * 4  # seconds of answer came back at 8 kHz
    snr = 10 * np.log10(np.sum(want[:n] ** 2) / max(np.sum((mu_audio[:n] - want[:n]) ** 2), 1e-12))
    assert snr > 30, snr


def test_responses_follow_the_agents_stretches_of_speech():
    """The mapping of continuous audio to responses: one opens at sound or a word and closes
    after SILENT_FRAMES quiet frames; quiet frames between responses are not sent."""
    import itertools

    r = Responses(AudioFormat(), itertools.count(1))
    loud, quiet = 0.1 * np.ones(1920, np.float32), np.zeros(1920, np.float32)
    seq = [quiet] * 3 + [loud] * 5 + [quiet] * (SILENT_FRAMES + 4) + [loud] * 2
    events = [r.frame(f, None) for f in seq]
    assert events[0] == [] and events[2] == []
    flat = [e["type"] for evs in events for e in evs]
    assert flat.count("response.created") == 2 and flat.count("response.done") == 1
    assert flat.count("response.output_audio.delta") == 5 + SILENT_FRAMES + 2
    words = Responses(AudioFormat(), itertools.count(1)).frame(quiet, " hello")
    assert [e["type"] for e in words][0] == "response.created"
    assert words[-1] == {"type": "response.output_audio_transcript.delta", **words[-1]} and words[-1]["delta"] == " hello"
