"""The voice library: a directory of voice prompts (`.pt` in the reference's format, or
recordings), looked up by name without ever opening a file outside the directory."""
from __future__ import annotations

import logging
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.audio import mono_mix, normalize_loudness, read_audio
from engine.engine import Engine, load_voice_pt
from engine.prompts import VoicePrompt
from engine.weights import VOICES_FILE, resolve_file

log = logging.getLogger("ppx.voices")

VOICE_EXTS = (".pt", ".wav", ".flac", ".ogg", ".mp3")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class UnknownVoice(UserError, LookupError):
    """A voice name that is not in the library; the message lists the ones that are."""


class VoiceLibrary:
    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UnknownVoice(f"voice directory '{self.directory}' does not exist")
        self._root = self.directory.resolve()

    def _entries(self) -> dict[str, Path]:
        """File name -> path, for the regular files of the directory itself whose real
        location is inside it (a link that leads out is not a voice)."""
        out = {}
        with os.scandir(self._root) as it:
            for e in it:
                if not e.name.lower().endswith(VOICE_EXTS) or not _NAME.match(e.name):
                    continue
                real = Path(os.path.realpath(e.path))
                if real.parent != self._root or not real.is_file():
                    continue
                out[e.name] = real
        return out

    def names(self) -> list[str]:
        return sorted({Path(n).stem for n in self._entries()})

    def find(self, name: str) -> Path:
        """`NATF2` or `NATF2.pt` -> its file. Names are matched against the directory's
        listing, never joined onto a path."""
        entries = self._entries()
        if isinstance(name, str) and _NAME.match(name):
            if name in entries:
                return entries[name]
            for ext in VOICE_EXTS:
                if name + ext in entries:
                    return entries[name + ext]
        shown = repr(name) if isinstance(name, str) and len(name) <= 64 else "that name"
        known = ", ".join(self.names()) or "none"
        raise UnknownVoice(f"voice {shown} is not in '{self.directory}' (voices there: {known})")


def hub_voice_dir(hf_repo: str) -> Path:
    """The hub repo's voices, fetched once as `voices.tgz` and unpacked beside it."""
    tgz = resolve_file(None, VOICES_FILE, hf_repo)
    out = tgz.parent / "voices"
    if not out.is_dir():
        log.info("unpacking %s", tgz)
        with tarfile.open(tgz, "r:gz") as tar:
            tar.extractall(path=tgz.parent, filter="data")
    if not out.is_dir():
        raise UnknownVoice(f"'{tgz}' holds no 'voices/' directory")
    return out


def resolve_voice_arg(arg: str, directory: str | os.PathLike | None, hf_repo: str | None = None) -> Path:
    """A command-line `--voice-prompt`: an existing file path, else a name in the directory
    (the hub's voices when no directory is given)."""
    p = Path(arg).expanduser()
    if p.is_file():
        return p
    if os.sep in arg or (os.altsep and os.altsep in arg):
        raise UnknownVoice(f"voice prompt file '{arg}' does not exist")
    if directory is None:
        if hf_repo is None:
            raise UnknownVoice(f"voice '{arg}' is not a file and no voice directory was given")
        directory = hub_voice_dir(hf_repo)
    return VoiceLibrary(directory).find(arg)


def load_voice(path: str | os.PathLike, engine: Engine) -> VoicePrompt:
    """A `.pt` voice prompt as it is, or a recording: resampled to 24 kHz mono, normalised to
    -24 LUFS and Mimi-encoded, which gives the same state as its `.pt`."""
    path = Path(path)
    if path.suffix.lower() == ".pt":
        voice = load_voice_pt(path)
    else:
        audio = mono_mix(read_audio(path, engine.sample_rate))
        pcm = normalize_loudness(audio, engine.sample_rate, -24.0).astype(np.float32)
        voice = engine.encode_voice(pcm, name=path.stem)
    engine.check_voice(voice)
    return voice
