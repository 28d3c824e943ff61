"""The OpenAI Realtime API (GA event names) as a full-duplex model speaks it: the session's
settings, the audio formats on the wire, and how the agent's continuous audio becomes responses.

The model listens while it speaks and decides itself when to talk: there is no turn detection,
no commit and no response to ask for. Its audio streams as `response.output_audio.delta`; each
stretch of agent speech (from a frame with sound or a word until `SILENT_FRAMES` quiet frames)
is one response, `response.created` ... `response.done`, with its transcript as
`response.output_audio_transcript.delta`. Between responses the agent is quiet and nothing is
sent: a client plays silence there.
"""
from __future__ import annotations

import base64
import binascii
import copy
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from . import g711

RATE = 24000                 # the model's rate, and audio/pcm's
TELEPHONE_RATE = 8000        # audio/pcmu and audio/pcma
FORMATS = {"audio/pcm": None, "audio/pcmu": "ulaw", "audio/pcma": "alaw"}
SPEECH_RMS = 10 ** (-45 / 20)  # a frame whose RMS is above -45 dBFS has sound in it
SILENT_FRAMES = 8              # 640 ms without sound or words end a response


class RealtimeError(Exception):
    """A client event the server refuses: sent as a typed `error` event; the session lives on
    unless `fatal`."""

    def __init__(self, code: str, message: str, param: str | None = None, etype: str = "invalid_request_error",
                 fatal: bool = False):
        super().__init__(message)
        self.code, self.param, self.etype, self.fatal = code, param, etype, fatal


def error_event(err: RealtimeError, event_id: str, client_event_id: str | None = None) -> dict:
    return {"type": "error", "event_id": event_id,
            "error": {"type": err.etype, "code": err.code, "message": str(err), "param": err.param,
                      "event_id": client_event_id}}


@dataclass
class AudioFormat:
    """A wire format: 24 kHz PCM16, or G.711 at 8 kHz (resampled with libsoxr, streaming)."""
    name: str = "audio/pcm"

    def __post_init__(self):
        self.law = FORMATS[self.name]
        self._in = self._out = None

    def to_json(self) -> dict:
        return {"type": self.name, "rate": RATE} if self.law is None else {"type": self.name}

    def decode(self, data: bytes) -> np.ndarray:
        """Audio bytes in this format -> float32 samples at 24 kHz."""
        if self.law is None:
            if len(data) % 2:
                raise RealtimeError("invalid_audio", "audio/pcm data must hold whole 16-bit samples", "audio")
            return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        import soxr

        if self._in is None:
            self._in = soxr.ResampleStream(TELEPHONE_RATE, RATE, 1, dtype="float32", quality="HQ")
        return self._in.resample_chunk(g711.decode(data, self.law).astype(np.float32) / 32768.0)

    def encode(self, pcm: np.ndarray) -> bytes:
        """float32 samples at 24 kHz -> audio bytes in this format."""
        if self.law is not None:
            import soxr

            if self._out is None:
                self._out = soxr.ResampleStream(RATE, TELEPHONE_RATE, 1, dtype="float32", quality="HQ")
            pcm = self._out.resample_chunk(pcm.astype(np.float32))
        pcm16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2")
        return pcm16.tobytes() if self.law is None else g711.encode(pcm16, self.law)


def decode_base64(text) -> bytes:
    if not isinstance(text, str):
        raise RealtimeError("invalid_audio", "audio must be a base64 string", "audio")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError("invalid_base64", "audio is not valid base64", "audio") from None


@dataclass
class SessionConfig:
    """The settings a Realtime session shows in `session.created` / `session.updated`."""
    instructions: str
    voice: str | None
    input_format: AudioFormat = field(default_factory=AudioFormat)
    output_format: AudioFormat = field(default_factory=AudioFormat)
    model: str = "personaplex"

    def to_json(self, session_id: str) -> dict:
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": self.model,
            "output_modalities": ["audio"], "instructions": self.instructions,
            "audio": {"input": {"format": self.input_format.to_json(), "transcription": None,
                                "noise_reduction": None, "turn_detection": None},
                      "output": {"format": self.output_format.to_json(), "voice": self.voice or "", "speed": 1.0}},
            "tools": [], "tool_choice": "none", "max_output_tokens": "inf", "tracing": None, "truncation": "disabled",
        }

    def update(self, session: dict, started: bool) -> list[RealtimeError]:
        """Applies a `session.update`'s session object; returns the refusals (each field that is
        refused leaves its setting as it was). After the first audio the conversation's context
        is set: instructions and voice are refused then."""
        if not isinstance(session, dict):
            raise RealtimeError("invalid_session", "session must be an object", "session")
        errors = []
        stype = session.get("type", "realtime")
        if stype != "realtime":
            errors.append(RealtimeError("unsupported_session_type", f"only realtime sessions are served, not {stype!r}",
                                        "session.type"))
        mods = session.get("output_modalities")
        if mods is not None and (not isinstance(mods, list) or "audio" not in mods):
            errors.append(RealtimeError("unsupported_modalities", "this model always speaks: output_modalities must "
                                        "include \"audio\"", "session.output_modalities"))
        if session.get("tools"):
            errors.append(RealtimeError("unsupported_tools", "this model cannot call tools", "session.tools"))
        audio = session.get("audio") or {}
        if not isinstance(audio, dict):
            audio = {}
            errors.append(RealtimeError("invalid_session", "session.audio must be an object", "session.audio"))
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        if isinstance(inp, dict) and inp.get("turn_detection") is not None:
            errors.append(RealtimeError("unsupported_turn_detection", "this model is full duplex: it always listens "
                                        "and decides itself when to speak, so turn_detection must be null",
                                        "session.audio.input.turn_detection"))
        if isinstance(inp, dict) and inp.get("transcription") is not None:
            errors.append(RealtimeError("unsupported_transcription", "input audio transcription is not available",
                                        "session.audio.input.transcription"))
        for side, part, attr in (("input", inp, "input_format"), ("output", out, "output_format")):
            fmt = part.get("format") if isinstance(part, dict) else None
            if fmt is None:
                continue
            name = fmt.get("type") if isinstance(fmt, dict) else None
            rate = fmt.get("rate", RATE) if isinstance(fmt, dict) else None
            if name not in FORMATS or (name == "audio/pcm" and rate != RATE):
                errors.append(RealtimeError("unsupported_audio_format", f"audio formats: audio/pcm at {RATE} Hz, "
                                            f"audio/pcmu, audio/pcma (got {fmt!r})", f"session.audio.{side}.format"))
            elif started and name != getattr(self, attr).name:
                errors.append(RealtimeError("session_already_started", "the audio format cannot change once audio "
                                            "flows", f"session.audio.{side}.format"))
            else:
                setattr(self, attr, AudioFormat(name))
        voice = out.get("voice") if isinstance(out, dict) else None
        if isinstance(voice, dict):
            voice = voice.get("id")
        for name, value, param in (("instructions", session.get("instructions"), "session.instructions"),
                                   ("voice", voice, "session.audio.output.voice")):
            if value is None or value == getattr(self, name):
                continue
            if started:
                errors.append(RealtimeError("session_already_started", f"{name} set the conversation's context and "
                                            f"cannot change after the first audio", param))
            elif not isinstance(value, str):
                errors.append(RealtimeError("invalid_value", f"{name} must be a string", param))
            else:
                setattr(self, name, value)
        return errors


class Responses:
    """Cuts the agent's continuous output into responses: a response opens at the first frame
    with sound or a word and closes after `SILENT_FRAMES` frames with neither. `frame` returns
    the events of one output frame (without event ids)."""

    def __init__(self, fmt: AudioFormat, ids: itertools.count):
        self.fmt = fmt
        self.ids = ids
        self.open: dict | None = None
        self.quiet = 0
        self.transcript: list[str] = []

    def frame(self, pcm: np.ndarray, piece: str | None) -> list[dict]:
        rms = math.sqrt(float(np.mean(np.square(pcm, dtype=np.float64))))
        speaking = rms > SPEECH_RMS or bool(piece and piece.strip())
        events: list[dict] = []
        if self.open is None:
            if not speaking:
                return events
            events += self._start()
        r = self.open
        events.append({"type": "response.output_audio.delta", **r["ids"],
                       "delta": base64.b64encode(self.fmt.encode(pcm)).decode("ascii")})
        if piece:
            self.transcript.append(piece)
            events.append({"type": "response.output_audio_transcript.delta", **r["ids"], "delta": piece})
        self.quiet = 0 if speaking else self.quiet + 1
        if self.quiet >= SILENT_FRAMES:
            events += self.finish()
        return events

    def _start(self) -> list[dict]:
        n = next(self.ids)
        rid, iid = f"resp_{n}", f"item_{n}"
        self.open = {"ids": {"response_id": rid, "item_id": iid, "output_index": 0, "content_index": 0}}
        self.quiet = 0
        self.transcript = []
        item = {"id": iid, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        return [{"type": "response.created",
                 "response": {"id": rid, "object": "realtime.response", "status": "in_progress", "output": [],
                              "output_modalities": ["audio"]}},
                {"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": item},
                {"type": "conversation.item.added", "previous_item_id": None, "item": item},
                {"type": "response.content_part.added", **self.open["ids"],
                 "part": {"type": "audio", "transcript": ""}}]

    def finish(self) -> list[dict]:
        """The events that close the open response (none is open: none)."""
        if self.open is None:
            return []
        ids = self.open["ids"]
        text = "".join(self.transcript).strip()
        item = {"id": ids["item_id"], "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "completed", "content": [{"type": "output_audio", "transcript": text}]}
        self.open = None
        return [{"type": "response.output_audio.done", **ids},
                {"type": "response.output_audio_transcript.done", **ids, "transcript": text},
                {"type": "response.content_part.done", **ids, "part": {"type": "audio", "transcript": text}},
                {"type": "response.output_item.done", "response_id": ids["response_id"], "output_index": 0,
                 "item": item},
                {"type": "conversation.item.done", "previous_item_id": None, "item": copy.deepcopy(item)},
                {"type": "response.done",
                 "response": {"id": ids["response_id"], "object": "realtime.response", "status": "completed",
                              "status_details": None, "output": [item], "output_modalities": ["audio"],
                              "usage": {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0}}}]
