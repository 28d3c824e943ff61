"""The `/api/chat` websocket protocol of the reference server and its web client (docs/SPEC.md).

Every binary message starts with a kind byte. Audio (0x01) is a byte stream of Ogg pages
holding Opus at 24 kHz mono, in both directions; pages may be split across messages or
joined in one. The server sends the handshake (0x00) once the prompt phase is done, text
pieces (0x02) as the model produces them, and errors (0x05, UTF-8) before closing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import parse_qs

from engine.sampling import SamplingParams
from engine.errors import UserError

HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = range(7)

# close codes (RFC 6455)
CLOSE_GOING_AWAY, CLOSE_BAD_DATA, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_TRY_LATER = 1001, 1007, 1008, 1009, 1013
MAX_QUERY_FIELDS = 64
CLOSE_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes: 2 for the code


def close_reason(message: str) -> str:
    """`message` cut to what a close frame holds, by UTF-8 bytes, never inside a character."""
    data = message.encode("utf-8")
    if len(data) <= CLOSE_REASON_BYTES:
        return message
    return data[:CLOSE_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."


class ProtocolError(UserError):
    """A client request or message the server refuses; sent as 0x05 before closing."""

    def __init__(self, message: str, close_code: int = CLOSE_POLICY):
        super().__init__(message)
        self.close_code = close_code


@dataclass
class SessionRequest:
    voice: str | None
    text_prompt: str
    sampling: SamplingParams


def _one(q: dict[str, list[str]], name: str) -> str | None:
    v = q.get(name)
    return None if not v else v[-1]


def _num(q, name, cast, lo, hi, default):
    raw = _one(q, name)
    if raw is None or raw == "":
        return default
    try:
        v = cast(raw)
    except ValueError:
        raise ProtocolError(f"query parameter '{name}' must be a number, got {raw[:40]!r}") from None
    if isinstance(v, float) and not math.isfinite(v) or not lo <= v <= hi:
        raise ProtocolError(f"query parameter '{name}' must be between {lo} and {hi}, got {raw[:40]!r}")
    return v


def parse_chat_query(query: str, defaults: SamplingParams, default_voice: str | None,
                     default_prompt: str) -> SessionRequest:
    """The session's settings from the `/api/chat` query string; unknown parameters are
    ignored (the official client sends more than the server uses)."""
    try:
        q = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise ProtocolError(f"the request has more than {MAX_QUERY_FIELDS} query parameters") from None
    voice = _one(q, "voice_prompt") or default_voice
    text = _one(q, "text_prompt")
    seed = _num(q, "seed", int, -1, 2**63 - 1, None)
    text_seed = _num(q, "text_seed", int, -1, 2**63 - 1, None)
    audio_seed = _num(q, "audio_seed", int, -1, 2**63 - 1, None)
    base = seed if seed is not None else defaults.seed
    sampling = SamplingParams(
        temp_text=_num(q, "text_temperature", float, 0.0, 100.0, defaults.temp_text),
        temp_audio=_num(q, "audio_temperature", float, 0.0, 100.0, defaults.temp_audio),
        topk_text=_num(q, "text_topk", int, 1, 1_000_000, defaults.topk_text),
        topk_audio=_num(q, "audio_topk", int, 1, 1_000_000, defaults.topk_audio),
        greedy=defaults.greedy,
        seed=text_seed if text_seed is not None else base,
        audio_seed=audio_seed if audio_seed is not None else (base if text_seed is not None else None),
    )
    return SessionRequest(voice=voice, text_prompt=default_prompt if text is None else text, sampling=sampling)
