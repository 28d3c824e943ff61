"""A session of `/v1/realtime`: the OpenAI Realtime API (`frontends.realtime`) over the same
engine, scheduler, limits and faults as `/api/chat`.

The session opens at `session.created`; its settings (instructions: the role prompt; the output
voice: a voice of the voice directory; the sampling settings and seeds of `/api/chat`, as the
connection's query parameters) may change until the first audio arrives, when the prompt phase
runs and they are set for the conversation. Every client mistake gets a typed `error` event and
the session lives on; only what makes the stream unusable closes it.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
from urllib.parse import urlsplit

import numpy as np

from engine.errors import UserError

from ..protocol import CLOSE_POLICY, CLOSE_TRY_LATER, ProtocolError, close_reason, parse_chat_query
from ..realtime import RealtimeError, Responses, SessionConfig, decode_base64, error_event
from .session import Session

log = logging.getLogger("ppx.serve")

# client events the model has no use for, accepted without effect (the README says why)
ACCEPTED = {"input_audio_buffer.commit": "input_audio_buffer.committed",
            "input_audio_buffer.clear": "input_audio_buffer.cleared",
            "response.create": None, "response.cancel": None, "output_audio_buffer.clear": None}
UNSUPPORTED = {"conversation.item.create": "this model takes audio only: no text or function items",
               "conversation.item.truncate": "the agent's audio cannot be truncated",
               "conversation.item.delete": "the conversation's items cannot be deleted",
               "conversation.item.retrieve": "the conversation's items are not kept",
               "transcription_session.update": "transcription sessions are not served"}


def close_frame_error(message: str, code: str = "server_error") -> str:
    """A typed `error` event for a connection about to close (before a session exists)."""
    return json.dumps(error_event(RealtimeError(code, message, etype="server_error"), "event_0"))


class RealtimeSession(Session):
    endpoint = "/v1/realtime"

    def __init__(self, server, ws):
        super().__init__(server, ws)
        # the /api/chat query parameters set the sampling, seeds, voice and role prompt to start from
        self.request = parse_chat_query(urlsplit(ws.request.path).query, server.defaults, server.args.voice_prompt,
                                        server.args.text_prompt)
        moshi = server.engine.cfg.moshi  # (no instructions or voice: `_moshi_settings`)
        self.config = SessionConfig("" if moshi else self.request.text_prompt, None if moshi else self.request.voice)
        self.ids = itertools.count(1)      # event ids
        self.responses_ids = itertools.count(1)
        self.responses: Responses | None = None
        self.started = False

    def _event(self, event: dict) -> str:
        return json.dumps({**event, "event_id": f"event_{next(self.ids)}"}, ensure_ascii=False)

    # ------------------------------------------------------------------------------

    def encode_frame(self, out) -> list[str]:
        piece = self.server.engine.tokenizer.piece(out.text_id)
        return [self._event(e) for e in self.responses.frame(out.pcm, piece)]

    def error_message(self, message: str, code: int) -> str:
        kind = {CLOSE_TRY_LATER: "server_full"}.get(code, "session_closed")
        return self._event(error_event(RealtimeError(kind, message, etype="server_error"), ""))

    async def _send_error(self, err: RealtimeError, client_event_id=None) -> None:
        self.server.warn(self.id, f"{err.code}: {err}")
        await self.ws.send(self._event(error_event(err, "", client_event_id)))

    async def serve(self) -> None:
        session_id = f"sess_{self.id}"
        await self.ws.send(self._event({"type": "session.created", "session": self.config.to_json(session_id)}))
        sender = asyncio.create_task(self.outbox.run())
        idle = asyncio.create_task(self._idle_watch())
        try:
            async for msg in self.ws:
                client_id = None
                try:
                    if isinstance(msg, bytes):
                        raise RealtimeError("invalid_message", "events are JSON text messages")
                    try:
                        event = json.loads(msg)
                    except ValueError:
                        raise RealtimeError("invalid_json", "the message is not valid JSON") from None
                    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                        raise RealtimeError("invalid_event", "an event is a JSON object with a \"type\"", "type")
                    client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                    await self._handle(event, session_id)
                except RealtimeError as e:
                    await self._send_error(e, client_id)
                    if e.fatal:
                        self.reported = True
                        await self.ws.close(CLOSE_POLICY, close_reason(str(e)))
                        return
        finally:
            sender.cancel()
            idle.cancel()

    async def _handle(self, event: dict, session_id: str) -> None:
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            pcm = self.config.input_format.decode(decode_base64(event.get("audio")))
            if not self.started:
                await self._start()
            if pcm.size:
                self.push_audio(pcm)
        elif kind == "session.update":
            voice = self.config.voice
            errors = self.config.update(event.get("session"), self.started)
            errors += self._moshi_settings()
            if self.config.voice != voice and self.config.voice not in self.server.voices.names():
                errors.append(RealtimeError("invalid_voice", f"voice {self.config.voice[:64]!r} is not available "
                                            f"(voices: {', '.join(self.server.voices.names())})",
                                            "session.audio.output.voice"))
                self.config.voice = voice
            await self.ws.send(self._event({"type": "session.updated", "session": self.config.to_json(session_id)}))
            for e in errors:
                await self._send_error(e, event.get("event_id"))
        elif kind in ACCEPTED:
            if kind == "input_audio_buffer.clear":
                self.pending = np.zeros(0, dtype=np.float32)
            reply = ACCEPTED[kind]
            if reply:
                await self.ws.send(self._event({"type": reply, "previous_item_id": None, "item_id": None}
                                               if reply.endswith("committed") else {"type": reply}))
        elif kind in UNSUPPORTED:
            raise RealtimeError("unsupported_event", UNSUPPORTED[kind], "type")
        else:
            raise RealtimeError("unknown_event", f"unknown event type {kind[:64]!r}", "type")

    def _moshi_settings(self) -> list[RealtimeError]:
        """A Moshi checkpoint takes no role prompt or voice: either, set, is refused (and unset)."""
        if not self.server.engine.cfg.moshi:
            return []
        errors = []
        if self.config.instructions:
            errors.append(RealtimeError("unsupported_setting", "this model (Moshi) takes no instructions: it starts "
                                        "every conversation cold", "session.instructions"))
            self.config.instructions = ""
        if self.config.voice:
            errors.append(RealtimeError("unsupported_setting", "this model (Moshi) speaks in its own voice: it takes "
                                        "no voice", "session.audio.output.voice"))
            self.config.voice = None
        return errors

    async def _start(self) -> None:
        """The first audio: the session's settings are set, the prompt phase runs."""
        self.started = True
        self.responses = Responses(self.config.output_format, self.responses_ids)
        try:
            await self.open_slot(self.config.voice, self.config.instructions, self.request.sampling)
        except ProtocolError as e:
            if e.close_code == CLOSE_POLICY:  # (a voice or role prompt the model cannot take: say which)
                raise RealtimeError("invalid_session", str(e), fatal=True) from e
            raise
        except UserError as e:
            raise ProtocolError(str(e)) from None
