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
from engine.config import ModelConfig
from engine.engine import Engine
from engine.prompts import VoicePrompt, check_voice, load_voice_pt
from engine.hub import hub_file
from engine.weights import VOICES_FILE

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


VOICE_ADVICE = ("pass --voice-prompt-dir DIR, a folder of voice prompts (.pt files, or recordings; `ppx-voice make` "
                "makes a .pt from one)")


def hub_voice_dir(hf_repo: str, advice: str = VOICE_ADVICE) -> Path:
    """The hub repo's voices, fetched once as `voices.tgz` and unpacked beside it."""
    tgz = hub_file(hf_repo, VOICES_FILE, advice=advice)
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
        directory = hub_voice_dir(hf_repo, VOICE_ADVICE + ", or give --voice-prompt a voice file's path")
    return VoiceLibrary(directory).find(arg)


def read_voice(path: str | os.PathLike, cfg: ModelConfig) -> VoicePrompt | np.ndarray:
    """Everything about a voice file that needs no model: a `.pt` voice prompt, checked against
    the model's config; or a recording, resampled to 24 kHz mono and normalised to -24 LUFS (a
    float32 array, which `encode_voice` turns into a voice). Bad files fail here, before a
    model is loaded."""
    path = Path(path)
    if path.suffix.lower() == ".pt":
        voice = load_voice_pt(path)
        check_voice(cfg.lm, voice)
        return voice
    rate = cfg.mimi.sample_rate
    audio = mono_mix(read_audio(path, rate))
    return normalize_loudness(audio, rate, -24.0).astype(np.float32)


def encode_voice(read: VoicePrompt | np.ndarray, engine: Engine, name: str) -> VoicePrompt:
    """A voice from `read_voice`: a recording is Mimi-encoded, which gives the same state as
    the reference's `.pt` of it."""
    if isinstance(read, VoicePrompt):
        return read
    voice = engine.encode_voice(read, name=name)
    check_voice(engine.cfg.lm, voice)
    return voice


def load_voice(path: str | os.PathLike, engine: Engine) -> VoicePrompt:
    """A `.pt` voice prompt as it is, or a recording Mimi-encoded (`read_voice`, `encode_voice`)."""
    return encode_voice(read_voice(path, engine.cfg), engine, Path(path).stem)
