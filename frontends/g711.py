"""G.711 (ITU-T): mu-law and A-law companding of 16-bit audio, 8 bits a sample, as telephone
networks carry it at 8 kHz. The code is the reference algorithm (the one the C library of the
standard's appendix and Python's former `audioop` implement), computed once into lookup tables:
a 65 536-entry table encodes, a 256-entry table decodes."""
from __future__ import annotations

import numpy as np

_SEG_U = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_SEG_A = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _encode_ulaw(x: np.ndarray) -> np.ndarray:
    v = x.astype(np.int64) >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), 8159) + (0x84 >> 2)
    seg = np.searchsorted(_SEG_U, v)  # the first segment whose end holds v
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | ((v >> (np.minimum(seg, 7) + 1)) & 0xF))
    return (code ^ mask).astype(np.uint8)


def _decode_ulaw(u: np.ndarray) -> np.ndarray:
    u = (~u.astype(np.int64)) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _encode_alaw(x: np.ndarray) -> np.ndarray:
    v = x.astype(np.int64) >> 3
    mask = np.where(v >= 0, 0xD5, 0x55)
    v = np.where(v >= 0, v, -v - 1)
    seg = np.searchsorted(_SEG_A, v)
    s = np.minimum(seg, 7)
    quant = np.where(s < 2, (v >> 1) & 0x0F, (v >> s) & 0x0F)
    code = np.where(seg >= 8, 0x7F, (s << 4) | quant)
    return (code ^ mask).astype(np.uint8)


def _decode_alaw(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ALL = np.arange(-32768, 32768, dtype=np.int64)
_ENCODE = {"ulaw": _encode_ulaw(_ALL), "alaw": _encode_alaw(_ALL)}
_DECODE = {"ulaw": _decode_ulaw(np.arange(256)), "alaw": _decode_alaw(np.arange(256))}


def encode(pcm16: np.ndarray, law: str) -> bytes:
    """int16 samples -> G.711 bytes ("ulaw" or "alaw")."""
    return _ENCODE[law][pcm16.astype(np.int64) + 32768].tobytes()


def decode(data: bytes, law: str) -> np.ndarray:
    """G.711 bytes -> int16 samples."""
    return _DECODE[law][np.frombuffer(data, dtype=np.uint8)]
