"""Voices for sessions, loaded off the tick thread and kept.

A voice file is found by name in the voice directory, read and checked on a worker thread; a
recording is Mimi-encoded there too (with its own streaming state, beside the ticks). The result
is kept in memory (by the file's path, size and modification time) and, for recordings, on disk
keyed by the file's content and the Mimi checkpoint, so a restart does not encode it again.
Several sessions asking for the same voice at once share one load.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.prompts import VoicePrompt
from voices import UnknownVoice, VoiceLibrary, read_voice

from ..protocol import ProtocolError

log = logging.getLogger("ppx.serve")

MAX_KEPT = 256   # voices kept in memory


class VoiceStore:
    def __init__(self, library: VoiceLibrary | None, engine, cache_dir: Path | None):
        """library None: a model without voices (Moshi)."""
        self.library = library
        self.engine = engine
        self.cache_dir = cache_dir
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppx-voice", initializer=_background)
        self._kept: collections.OrderedDict[tuple, VoicePrompt] = collections.OrderedDict()
        self._loading: dict[tuple, asyncio.Future] = {}

    def names(self) -> list[str]:
        return self.library.names() if self.library is not None else []

    def warm_up(self) -> None:
        """Before serving: the audio libraries imported and the voice encoder's state made, so
        that the first voice a session names pays no one-time cost on the worker thread (an
        extension module's import holds the GIL, which the tick thread then waits for)."""
        import pyloudnorm  # noqa: F401
        import soundfile  # noqa: F401
        import soxr  # noqa: F401

        self.engine.encode_voice(np.zeros(self.engine.frame_size, dtype=np.float32), name="warm-up")

    async def get(self, name: str | None) -> VoicePrompt | None:
        """The voice a session named (None: none), loaded once; a `ProtocolError` the client may
        read when the name is unknown or the file unusable (the server's paths stay private)."""
        if name is None or self.library is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(self._pool, self.library.find, name)
        except UnknownVoice:
            shown = repr(name) if len(name) <= 64 else "that name"
            raise ProtocolError(f"voice {shown} is not available (voices: {', '.join(self.names())})") from None
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        voice = self._kept.get(key)
        if voice is not None:
            self._kept.move_to_end(key)
            return voice
        fut = self._loading.get(key)
        if fut is None:
            fut = self._loading[key] = asyncio.ensure_future(loop.run_in_executor(self._pool, self._load, path))
            fut.add_done_callback(lambda f, key=key: self._loaded(key, f))
        try:
            return await asyncio.shield(fut)
        except UserError as e:
            log.warning("voice %s cannot be used: %s", name, e)
            raise ProtocolError(f"voice {name!r} cannot be used by this model") from None

    def _loaded(self, key: tuple, fut: asyncio.Future) -> None:
        self._loading.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            self._kept[key] = fut.result()
            while len(self._kept) > MAX_KEPT:
                self._kept.popitem(last=False)

    def _load(self, path: Path) -> VoicePrompt:
        """On the worker thread: read, check and (for a recording) encode."""
        read = read_voice(path, self.engine.cfg)
        if isinstance(read, VoicePrompt):
            return read
        disk = self._disk_path(path)
        if disk is not None and disk.is_file():
            try:
                codes = np.load(disk, allow_pickle=False)
                if codes.ndim == 2 and codes.shape[1] == self.engine.cfg.lm.agent_codebooks:
                    return VoicePrompt(path.stem, codes=torch.from_numpy(codes.astype(np.int64)))
            except (OSError, ValueError) as e:
                log.warning("ignoring the cached encoding %s: %s", disk, e)
        voice = self.engine.encode_voice(read, name=path.stem)
        log.info("encoded voice %s (%d frames)", path.name, voice.frames)
        if disk is not None:
            try:
                disk.parent.mkdir(parents=True, exist_ok=True)
                tmp = disk.with_name(f".{disk.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, voice.codes.numpy().astype(np.int16))
                os.replace(tmp, disk)
            except OSError as e:
                log.warning("cannot keep the encoded voice in %s: %s", disk, e)
        return voice

    def _disk_path(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(self.engine.mimi_id.encode())
        return self.cache_dir / "voices" / f"{h.hexdigest()[:32]}.npy"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _background() -> None:
    """The voice worker yields the CPU to the tick and codec threads (Linux: a thread's own nice
    value); it is a background job whose result a session waits for once."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
