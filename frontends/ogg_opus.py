"""Streaming Ogg-Opus for 24 kHz mono audio: what the websocket server and the load client speak.

The byte stream is a sequence of Ogg pages (RFC 3533) carrying Opus packets as RFC 7845 lays
them out: packet 0 is the `OpusHead` header, packet 1 the `OpusTags` comment header, and every
later packet one Opus packet of audio. A page is

    "OggS" | version 0 | flags (1 continued, 2 BOS, 4 EOS) | granule position (int64)
    | serial (u32) | sequence number (u32) | CRC-32 (u32) | segment count n | n lacing values | body

all little-endian. The lacing values cut the body into packets: a value of 255 means the
packet goes on in the next segment, anything less ends it, so a packet whose last segment is
255 long continues on the next page (which then has the "continued" flag). The CRC is the
non-reflected CRC-32 with polynomial 0x04C11DB7, initial value 0 and no final xor, over the
whole page with the CRC field zeroed. Granule positions of audio pages count 48 kHz samples
of decoded audio up to the end of the last packet that ends on the page (-1: none ends there);
the decoder drops the first `pre_skip` of them (the encoder's lookahead, from `OpusHead`), and
the granule position of the last (EOS) page tells how much of the final packet is real audio.

`OggOpusWriter` turns float32 PCM into such a stream, one page per Opus packet so that each
20 ms packet can go out at once; `OggOpusReader` takes the stream back in any chunking and
decodes each packet as soon as the page that ends it has arrived. Opus itself is libopus via
`opuslib`; the Ogg framing is done here.
"""
from __future__ import annotations

import ctypes
import random
import struct
import zlib

import numpy as np
import opuslib

__all__ = ["OggError", "OggOpusWriter", "OggOpusReader", "ogg_crc"]

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
FRAME_MS = (2.5, 5.0, 10.0, 20.0, 40.0, 60.0)
CONTINUED, BOS, EOS = 1, 2, 4
_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, sequence, crc, segments
# The opus-recorder decoder used by the PersonaPlex / Moshi web clients only looks for "OggS" at
# offsets below len(message) - 32, so a page of 32 bytes or less at the end of a websocket message
# is silently dropped. libopus codes digital silence as 3-byte packets (31-byte pages), so the
# writer pads packets to at least this size (Opus padding, which every decoder skips).
MIN_PACKET = 33 - _HEADER.size - 1


class OggError(ValueError):
    """The Ogg-Opus stream is malformed; the message says what was wrong, in one sentence."""


# Ogg's CRC is zlib's CRC-32 (which runs in C) with the bits of every byte, and of the register,
# in the opposite order: reflect the bytes in, the start value and the result.
_REFLECT = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _reflect32(x: int) -> int:
    return int.from_bytes(x.to_bytes(4, "little").translate(_REFLECT), "big")


def ogg_crc(data: bytes, crc: int = 0) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, MSB first, initial value 0, no final xor), continuing
    from `crc`."""
    data = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    r = zlib.crc32(data.translate(_REFLECT), _reflect32(crc) ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    return _reflect32(r)


def _page_crc(page: bytes | bytearray) -> int:
    """The CRC of a page, its own CRC field (bytes 22-25) counted as zeros."""
    if page[22:26] != b"\0\0\0\0":
        page = bytearray(page)
        page[22:26] = b"\0\0\0\0"
    return ogg_crc(page)


def _check_rate(sample_rate: int) -> None:
    if sample_rate not in OPUS_RATES:
        raise ValueError(f"Opus works at {', '.join(map(str, OPUS_RATES))} Hz, not {sample_rate}")


_opus_packet_pad = opuslib.api.libopus.opus_packet_pad
_opus_packet_pad.argtypes = (ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32)
_opus_packet_pad.restype = ctypes.c_int


# opuslib's `Decoder.decode_float` zero-fills a buffer four times too large and turns the samples
# into a list of Python floats before packing them again: most of a packet's decoding time. The
# same libopus call (opuslib's binding, its argtypes set) writes into a buffer the reader keeps.
_opus_decode_float = opuslib.api.decoder.libopus_decode_float


def _pad_packet(packet: bytes, size: int) -> bytes:
    if len(packet) >= size:
        return packet
    buf = ctypes.create_string_buffer(packet, size)
    if _opus_packet_pad(buf, len(packet), size) != 0:
        return packet  # cannot happen for a packet libopus just made; sending it unpadded is still valid
    return buf.raw


class OggOpusWriter:
    """Encodes float32 mono PCM to an Ogg-Opus byte stream, one page per Opus packet.

    `read_bytes()` returns whole pages only, so every message a caller sends is decodable on
    its own (the browser decoder needs that). The header pages come out of the first call.
    """

    def __init__(self, sample_rate: int = 24000, frame_ms: float = 20.0, bitrate: int | None = None,
                 complexity: int | None = None):
        """complexity: libopus's 0..10 (None: its default, 10); the encoder's cost per frame."""
        _check_rate(sample_rate)
        if frame_ms not in FRAME_MS:
            raise ValueError(f"an Opus frame lasts one of {FRAME_MS} ms, not {frame_ms}")
        if complexity is not None and not 0 <= complexity <= 10:
            raise ValueError(f"Opus encoder complexity is 0 to 10, not {complexity}")
        self.sample_rate = sample_rate
        self.frame_size = int(sample_rate * frame_ms / 1000)
        # AUDIO rather than VOIP: what we send is already-synthesised speech that should come out
        # as it went in, and VOIP's speech tuning (high-pass, SILK preferred at low rates) only
        # colours it. The official web client encodes the microphone with AUDIO (2049) as well.
        # Both applications have the same lookahead, so the latency is the same.
        self._enc = opuslib.Encoder(sample_rate, 1, opuslib.APPLICATION_AUDIO)
        if bitrate is not None:
            self._enc.bitrate = bitrate
        if complexity is not None:
            self._enc.complexity = complexity
        self._lookahead = self._enc.lookahead  # samples at sample_rate that the decoder's output lags
        self._to48k = 48000 // sample_rate
        self.pre_skip = self._lookahead * self._to48k
        self._serial = random.getrandbits(32)
        self._seq = 0
        self._granule = 0  # 48 kHz samples in the packets encoded so far
        self._samples = 0  # real input samples appended so far
        self._pending = np.zeros(0, np.float32)
        self._out = bytearray()
        self._closed = False
        head = struct.pack("<8sBBHIhB", b"OpusHead", 1, 1, self.pre_skip, sample_rate, 0, 0)
        vendor = b"ppx " + opuslib.api.info.get_version_string()
        tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
        self._write_page(head, 0, BOS)  # RFC 7845: each header packet alone on its page, granule 0
        self._write_page(tags, 0, 0)

    def append_pcm(self, pcm: np.ndarray) -> None:
        """Buffers float32 mono samples in [-1, 1] (any length) and encodes every whole frame."""
        if self._closed:
            raise ValueError("append_pcm after flush: the stream has ended")
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1:
            raise ValueError(f"expected mono samples of shape (n,), got shape {pcm.shape}")
        self._samples += len(pcm)
        buf = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        n = len(buf) // self.frame_size
        for i in range(n):
            self._encode(buf[i * self.frame_size:(i + 1) * self.frame_size])
        self._pending = buf[n * self.frame_size:].copy()

    def read_bytes(self) -> bytes:
        """Every complete page made since the last call (the header pages first, once); b"" if none."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def flush(self) -> bytes:
        """Ends the stream: encodes what is buffered padded with zeros, marks the last page EOS
        and returns everything not yet read. Afterwards `append_pcm` raises, `flush` returns b""."""
        if self._closed:
            return self.read_bytes()
        self._closed = True
        # The decoder's output lags by the lookahead, so encode enough zeros after the real samples
        # to push them all out; the EOS granule position then tells the decoder where to cut.
        need = len(self._pending) + self._lookahead
        frames = -(-need // self.frame_size)
        buf = np.zeros(frames * self.frame_size, np.float32)
        buf[:len(self._pending)] = self._pending
        self._pending = buf[:0]
        for i in range(frames):
            last = i == frames - 1
            self._encode(buf[i * self.frame_size:(i + 1) * self.frame_size],
                         end=self.pre_skip + self._samples * self._to48k if last else None)
        return self.read_bytes()

    def _encode(self, frame: np.ndarray, end: int | None = None) -> None:
        packet = self._enc.encode_float(np.ascontiguousarray(frame).tobytes(), self.frame_size)
        self._granule += self.frame_size * self._to48k
        self._write_page(_pad_packet(packet, MIN_PACKET), self._granule if end is None else end,
                         0 if end is None else EOS)

    def _write_page(self, packet: bytes, granule: int, flags: int) -> None:
        # One packet per page; Opus packets are far below the 255 * 255 bytes a page can hold.
        lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
        page = bytearray(_HEADER.pack(b"OggS", 0, flags, granule, self._serial, self._seq, 0, len(lacing)))
        page += lacing
        page += packet
        struct.pack_into("<I", page, 22, _page_crc(page))
        self._out += page
        self._seq = (self._seq + 1) & 0xFFFFFFFF


class OggOpusReader:
    """Decodes an Ogg-Opus byte stream, fed in any chunking, to float32 mono PCM.

    Each packet is decoded as soon as the page that ends it is complete. Pages may hold several
    packets and packets may continue across pages; `OpusTags` is skipped; stereo streams are
    downmixed by the decoder; the pre-skip, output gain and EOS end trimming of RFC 7845 are
    applied; a new BOS page starts a new (chained) stream. A gap in page sequence numbers (a
    client that dropped pages) loses the packets on the missing pages and nothing else.

    The reader never holds more than `max_buffer` bytes: unparsed input, a packet still
    being assembled and decoded PCM not yet taken by `read_pcm` (4 bytes a sample, so about 10 s
    of 24 kHz audio with the default) all count. Anything malformed, or more than that, raises
    `OggError`; after that every `append_bytes` raises it again.
    """

    def __init__(self, sample_rate: int = 24000, max_buffer: int = 1 << 20):
        _check_rate(sample_rate)
        self.sample_rate = sample_rate
        self.max_buffer = max_buffer
        self._max_frame = sample_rate * 120 // 1000  # the longest Opus packet, 120 ms
        self._out = np.empty(self._max_frame, np.float32)   # libopus decodes into this
        self._out_ptr = self._out.ctypes.data_as(opuslib.api.c_float_pointer)
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0], for error messages
        self._pcm: list[np.ndarray] = []
        self._pcm_len = 0
        self._error: OggError | None = None
        self._serial: int | None = None
        self._start_stream()

    def _start_stream(self) -> None:
        self._seq: int | None = None
        self._packet = bytearray()  # a packet continued onto the next page
        self._npackets = 0  # packets so far in this logical stream: 0 is OpusHead, 1 OpusTags
        self._decoder: opuslib.Decoder | None = None
        self._pre_skip = 0  # 48 kHz samples
        self._skip = 0  # output samples still to drop
        self._gain = 1.0
        self._emitted = 0  # output samples after the pre-skip in this logical stream
        self._eos = False

    def append_bytes(self, data: bytes) -> None:
        """Takes the next bytes of the stream; raises OggError on malformed data."""
        if self._error is not None:
            raise OggError(f"the stream already failed: {self._error}")
        view = memoryview(data).cast("B")
        try:
            while view:  # take no more than fits, parse it, go on: huge chunks never sit in memory twice
                room = self.max_buffer - len(self._buf) - len(self._packet) - 4 * self._pcm_len
                if room <= 0:
                    raise OggError(f"the reader would hold more than {self.max_buffer} bytes of input, partial "
                                   f"packet and unread PCM (call read_pcm more often or raise max_buffer)")
                self._buf += view[:room]
                view = view[room:]
                self._parse_pages()
        except OggError as e:
            self._error = e
            raise

    def read_pcm(self) -> np.ndarray:
        """The float32 mono samples decoded since the last call, shape (n,) (possibly (0,))."""
        pcm = np.concatenate(self._pcm) if self._pcm else np.zeros(0, np.float32)
        self._pcm, self._pcm_len = [], 0
        return pcm

    def _parse_pages(self) -> None:
        buf = self._buf
        while True:
            if buf[:4] != b"OggS"[:len(buf)]:  # fail at once on garbage, without waiting for a full header
                raise OggError(f"bad capture pattern {bytes(buf[:4])!r} at byte {self._offset}: expected b'OggS'")
            if len(buf) < _HEADER.size:
                return
            _, version, flags, granule, serial, seq, crc, nseg = _HEADER.unpack_from(buf)
            if version != 0:
                raise OggError(f"page at byte {self._offset} has Ogg version {version}, only version 0 exists")
            if flags & ~(CONTINUED | BOS | EOS):
                raise OggError(f"page at byte {self._offset} has unknown header flags {flags:#04x}")
            body_at = _HEADER.size + nseg
            if len(buf) < body_at:
                return
            lacing = bytes(buf[_HEADER.size:body_at])
            size = body_at + sum(lacing)
            if size > self.max_buffer:
                raise OggError(f"page at byte {self._offset} is {size} bytes long, "
                               f"over the {self.max_buffer}-byte limit")
            if len(buf) < size:
                return
            page = bytes(buf[:size])
            del buf[:size]
            if _page_crc(page) != crc:
                raise OggError(f"page at byte {self._offset} fails its CRC check (corrupted data)")
            self._offset += size
            self._page(flags, granule, serial, seq, lacing, page[body_at:])

    def _page(self, flags: int, granule: int, serial: int, seq: int, lacing: bytes, body: bytes) -> None:
        if flags & BOS and self._serial is not None:
            self._start_stream()  # a chained stream (or a client that restarted its encoder)
        elif self._eos:
            raise OggError(f"page {seq} comes after the end of the stream and does not start a new one")
        elif self._serial is not None and serial != self._serial:
            raise OggError(f"page {seq} belongs to another logical stream (serial {serial}, expected {self._serial})")
        self._serial = serial
        lost = self._seq is not None and seq != (self._seq + 1) & 0xFFFFFFFF
        self._seq = seq
        skipping = False
        if lost:
            self._packet.clear()  # its end was on a missing page
            skipping = bool(flags & CONTINUED)  # this page starts with the tail of a packet we lost
        elif self._packet and not flags & CONTINUED:
            raise OggError(f"page {seq} does not continue the packet left unfinished on the previous page")
        # (The continued flag on a page when no packet is pending is ignored: opus-recorder leaves
        # it set on pages after one that split a packet.)
        out: list[np.ndarray] = []
        at = 0
        for n in lacing:
            if skipping:
                skipping = n == 255
            else:
                self._packet += body[at:at + n]
                if n < 255:
                    packet = bytes(self._packet)
                    self._packet.clear()
                    self._on_packet(packet, seq, out)
            at += n
        if flags & EOS:
            self._eos = True
            if granule >= 0 and out:  # end trimming (RFC 7845 section 4.4): the last packet was padded
                end = max(0, granule - self._pre_skip) * self.sample_rate // 48000
                pcm = np.concatenate(out)
                cut = min(max(0, self._emitted - end), len(pcm))
                out = [pcm[:len(pcm) - cut]]
                self._emitted -= cut
                self._pcm_len -= cut
        self._pcm += out

    def _on_packet(self, packet: bytes, seq: int, out: list[np.ndarray]) -> None:
        index = self._npackets
        self._npackets += 1
        if index == 0:
            self._parse_head(packet)
        elif index == 1:
            if not packet.startswith(b"OpusTags"):
                raise OggError(f"the second packet (page {seq}) is not an OpusTags header")
        elif packet:  # an empty packet has no audio (RFC 6716 packets are at least one byte); not a loss to conceal
            # Checked per packet, as a few bytes of Opus can stand for 120 ms of audio.
            if len(self._buf) + len(self._packet) + 4 * self._pcm_len > self.max_buffer:
                raise OggError(f"the reader would hold more than {self.max_buffer} bytes of input and unread "
                               f"PCM (call read_pcm more often or raise max_buffer)")
            n = _opus_decode_float(self._decoder.decoder_state, packet, len(packet), self._out_ptr,
                                   self._max_frame, 0)
            if n < 0:
                reason = opuslib.api.info.strerror(n).decode()
                raise OggError(f"undecodable Opus packet of {len(packet)} bytes on page {seq}: {reason}")
            pcm = self._out[:n].copy()
            if self._skip:
                dropped = min(self._skip, len(pcm))
                pcm, self._skip = pcm[dropped:], self._skip - dropped
            if self._gain != 1.0:
                pcm = pcm * np.float32(self._gain)
            out.append(pcm)
            self._emitted += len(pcm)
            self._pcm_len += len(pcm)

    def _parse_head(self, packet: bytes) -> None:
        if not packet.startswith(b"OpusHead"):
            raise OggError(f"the first packet is not an OpusHead header (it starts with {packet[:8]!r})")
        if len(packet) < 19:
            raise OggError(f"the OpusHead header is {len(packet)} bytes long, shorter than the 19 it needs")
        version, channels, pre_skip, _rate, gain, mapping = struct.unpack_from("<BBHIhB", packet, 8)
        if version >> 4:
            raise OggError(f"OpusHead version {version} is not supported (only 0 to 15 are compatible)")
        if mapping != 0 or not 1 <= channels <= 2:
            raise OggError(f"OpusHead has {channels} channels with mapping family {mapping}; "
                           f"only mono and stereo (family 0) are supported")
        # A mono decoder takes mono and stereo packets alike and downmixes the latter.
        self._decoder = opuslib.Decoder(self.sample_rate, 1)
        self._pre_skip = pre_skip
        self._skip = pre_skip * self.sample_rate // 48000
        self._gain = 10.0 ** (gain / (20 * 256))  # Q7.8 dB
