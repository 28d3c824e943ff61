"""Sampling settings of a session, with the reference's defaults (the one place they are
written: the command-line flags, the server's query parameters and the state's scratch row
take them from here). The kernel that samples is `engine.kernels.sampling`."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass
class SamplingParams:
    """A session's sampling settings; the defaults are the reference's."""
    temp_text: float = 0.7
    temp_audio: float = 0.8
    topk_text: int = 25
    topk_audio: int = 250
    greedy: bool = False
    seed: int | None = None   # None or -1: a random seed
    audio_seed: int | None = None  # the audio streams' own seed (default: `seed`)

    def validate(self) -> None:
        for name in ("temp_text", "temp_audio"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and 0 <= v <= 100):
                raise UserError(f"{name} must be a number from 0 to 100, got {v!r}")
        for name in ("topk_text", "topk_audio"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 1 <= v <= 1_000_000):
                raise UserError(f"{name} must be a whole number from 1 up, got {v!r}")

    def resolved_seed(self) -> int:
        if self.seed is None or self.seed == -1:
            return int.from_bytes(os.urandom(4), "little")
        return int(self.seed) & 0xFFFFFFFF

    def resolved_audio_seed(self, text_seed: int) -> int:
        if self.audio_seed is None or self.audio_seed == -1:
            return text_seed
        return int(self.audio_seed) & 0xFFFFFFFF


SAMPLING_DEFAULTS = SamplingParams()
