"""Audio files in and out: any WAV people have (PCM 16/24/32, float; mono or stereo; any rate),
resampled to the model's 24 kHz. Reading and writing use libsndfile (soundfile), resampling
uses libsoxr (soxr), loudness uses pyloudnorm (ITU-R BS.1770)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


from .errors import UserError


class AudioError(UserError, ValueError):
    """An audio file the engine cannot use; the message says why."""


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Returns float32 samples [channels, T] at `sample_rate`."""
    import soundfile as sf
    import soxr

    path = Path(path)
    if not path.exists():
        raise AudioError(f"'{path}' does not exist")
    if not path.is_file():
        raise AudioError(f"'{path}' is not a file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"'{path}' is not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"'{path}' holds no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"'{path}' holds samples that are not finite numbers")
    if sr != sample_rate:
        data = soxr.resample(data, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(data.T)


def first_channel(audio: np.ndarray) -> np.ndarray:
    """The channel the reference feeds the model (its first), as float32 [T]."""
    return np.ascontiguousarray(audio[0], dtype=np.float32)


def mono_mix(audio: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(audio.mean(axis=0), dtype=np.float32)


def normalize_loudness(pcm: np.ndarray, sample_rate: int, target_lufs: float = -24.0) -> np.ndarray:
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate)
    try:
        loudness = meter.integrated_loudness(pcm.astype(np.float64))
    except ValueError as e:  # shorter than one 400 ms gating block
        raise AudioError(f"the voice recording is too short to measure its loudness ({e})") from None
    if not np.isfinite(loudness):
        raise AudioError("the voice recording is silent")
    return pyloudnorm.normalize.loudness(pcm.astype(np.float64), loudness, target_lufs)


def frames(pcm: np.ndarray, frame_size: int) -> np.ndarray:
    """[T] -> [ceil(T / frame_size), frame_size], the last frame zero-padded."""
    n = -(-pcm.shape[0] // frame_size)
    out = np.zeros((n, frame_size), dtype=np.float32)
    out.reshape(-1)[: pcm.shape[0]] = pcm
    return out


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """PCM16, as the reference writes its output (sphn: each sample times 32767, truncated):
    pcm [T] (mono) or [T, channels]."""
    import soundfile as sf

    data = np.trunc(np.clip(np.asarray(pcm, dtype=np.float64), -1.0, 1.0) * 32767).astype(np.int16)
    try:
        sf.write(str(path), data, sample_rate, subtype="PCM_16")
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"cannot write '{path}' ({e})") from None
