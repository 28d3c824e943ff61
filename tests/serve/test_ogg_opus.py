"""frontends.ogg_opus: round trips, chunking, page validity (checked by an independent parser),
the layouts other encoders produce, malformed input and fuzzing, and interop with Kyutai's sphn."""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from frontends.ogg_opus import OggError, OggOpusReader, OggOpusWriter, ogg_crc

SR = 24000
FRAME = 480  # 20 ms
LOOKAHEAD = 156  # libopus's encoder delay at 24 kHz (6.5 ms); the writer's pre-skip is twice this
T = np.arange(2 * SR) / SR
SINE = (0.5 * np.sin(2 * np.pi * 440 * T)).astype(np.float32)
CHIRP = (0.5 * np.sin(2 * np.pi * (100 * T + (2000 - 100) / 4 * T ** 2))).astype(np.float32)  # 100 Hz -> 2 kHz


# ---------------------------------------------------------------- an independent Ogg parser and writer

def crc_bitwise(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def parse_pages(data: bytes) -> list[dict]:
    pages, at = [], 0
    while at < len(data):
        assert data[at:at + 4] == b"OggS"
        version, flags, granule, serial, seq, crc, nseg = struct.unpack_from("<BBqIIIB", data, at + 4)
        lacing = list(data[at + 27:at + 27 + nseg])
        end = at + 27 + nseg + sum(lacing)
        raw = data[at:end]
        assert len(raw) == end - at, "truncated page"
        pages.append(dict(version=version, flags=flags, granule=granule, serial=serial, seq=seq, crc=crc,
                          lacing=lacing, body=raw[27 + nseg:], raw=raw,
                          crc_ok=crc_bitwise(raw[:22] + b"\0\0\0\0" + raw[26:]) == crc))
        at = end
    return pages


def packets_of(pages: list[dict]) -> list[bytes]:
    out, cur = [], b""
    for p in pages:
        at = 0
        for n in p["lacing"]:
            cur += p["body"][at:at + n]
            at += n
            if n < 255:
                out.append(cur)
                cur = b""
    return out


def make_page(segments: list[int], body: bytes, *, flags=0, granule=-1, serial=7, seq=0) -> bytes:
    head = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, seq, 0, len(segments)) + bytes(segments)
    page = bytearray(head + body)
    struct.pack_into("<I", page, 22, crc_bitwise(bytes(page)))
    return bytes(page)


def paginate(packets: list[bytes], max_segments: int, *, granules=None, serial=7, first_seq=0,
             eos=False) -> bytes:
    """Lays packets out as a generic Ogg muxer would: fill pages up to max_segments lacing values,
    splitting packets across pages where they do not fit (with the continued flag)."""
    segs = []  # (lacing value, bytes, index of the packet it ends or None)
    for i, p in enumerate(packets):
        for k in range(0, len(p) // 255 * 255, 255):
            segs.append((255, p[k:k + 255], None))
        segs.append((len(p) % 255, p[len(p) // 255 * 255:], i))
    out, seq, continued = b"", first_seq, False
    for s in range(0, len(segs), max_segments):
        chunk = segs[s:s + max_segments]
        ended = [i for _, _, i in chunk if i is not None]
        granule = granules[ended[-1]] if ended and granules is not None else -1
        flags = (1 if continued else 0) | (4 if eos and s + max_segments >= len(segs) else 0)
        out += make_page([n for n, _, _ in chunk], b"".join(b for _, b, _ in chunk), flags=flags, granule=granule,
                         serial=serial, seq=seq)
        seq += 1
        continued = chunk[-1][2] is None
    return out


def opus_head(pre_skip: int, channels: int = 1, mapping: int = 0) -> bytes:
    return struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, pre_skip, 48000, 0, mapping)


TAGS = b"OpusTags" + struct.pack("<I", 10) + b"RecorderJS" + struct.pack("<I", 0)


def header_pages(pre_skip=312, serial=7, head=None) -> bytes:
    return (make_page([19], head or opus_head(pre_skip), flags=2, granule=0, serial=serial, seq=0)
            + make_page([len(TAGS)], TAGS, granule=0, serial=serial, seq=1))


# ---------------------------------------------------------------- helpers

def encode(pcm, chunk=1000, flush=True, **kw) -> bytes:
    w = OggOpusWriter(**kw)
    out = b""
    for i in range(0, len(pcm), chunk):
        w.append_pcm(pcm[i:i + chunk])
        out += w.read_bytes()
    return out + (w.flush() if flush else w.read_bytes())


def decode(data: bytes, chunk: int | None = None, **kw) -> np.ndarray:
    r = OggOpusReader(**kw)
    parts = []
    for i in range(0, len(data), chunk or max(1, len(data))):
        r.append_bytes(data[i:i + (chunk or len(data))])
        parts.append(r.read_pcm())
    return np.concatenate(parts)


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    n = min(len(ref), len(out))
    ref, out = ref[:n].astype(np.float64), out[:n].astype(np.float64)
    return 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum())


def ncc(ref: np.ndarray, out: np.ndarray) -> float:
    n = min(len(ref), len(out))
    return float(np.dot(ref[:n], out[:n]) / np.linalg.norm(ref[:n]) / np.linalg.norm(out[:n]))


def best_lag(ref: np.ndarray, out: np.ndarray, max_lag: int) -> int:
    """The delay of out against ref (out[t] ~ ref[t - lag]), by cross-correlation over 0..max_lag,
    on a chirp so that the peak is unambiguous."""
    scores = [ncc(ref, out[lag:]) for lag in range(max_lag + 1)]
    return int(np.argmax(scores))


def feed_expecting_oggerror_or_success(data: bytes, chunk: int, **kw) -> None:
    r = OggOpusReader(**kw)
    try:
        for i in range(0, len(data), chunk):
            r.append_bytes(data[i:i + chunk])
            pcm = r.read_pcm()
            assert pcm.dtype == np.float32 and pcm.ndim == 1
    except OggError as e:
        assert str(e)


# ---------------------------------------------------------------- round trips and streaming

def test_crc_is_oggs():
    # CRC-32/POSIX (cksum) is the same CRC with a final xor: 0x765E7680 on "123456789".
    assert ogg_crc(b"123456789") == 0x765E7680 ^ 0xFFFFFFFF == crc_bitwise(b"123456789")
    # any length, and continued from a running value as the page checksum chains it
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 22, 255, 4096):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert ogg_crc(data) == crc_bitwise(data)
        assert ogg_crc(data[n // 2:], ogg_crc(data[:n // 2])) == crc_bitwise(data)


@pytest.mark.parametrize("signal", [SINE, CHIRP], ids=["sine", "chirp"])
def test_round_trip_keeps_length_and_waveform(signal):
    out = decode(encode(signal))
    # The pre-skip removes the codec delay and the EOS granule position the padding: exact length.
    assert out.dtype == np.float32 and len(out) == len(signal)
    if signal is CHIRP:  # and no delay is left (a sine's correlation peak would be ambiguous)
        assert best_lag(signal, out, 400) == 0
    assert snr_db(signal, out) > 15
    assert ncc(signal, out) > 0.95


def test_reader_gives_what_opuslibs_own_decoder_gives():
    """The reader calls libopus into its own buffer: the samples are opuslib's `decode_float`'s."""
    import opuslib

    data = encode(CHIRP)
    packets = packets_of(parse_pages(data))[2:]   # (after OpusHead and OpusTags)
    dec = opuslib.Decoder(SR, 1)
    want = np.concatenate([np.frombuffer(dec.decode_float(p, SR * 120 // 1000), np.float32) for p in packets])
    reader = OggOpusReader(SR)
    got = []
    for k in range(0, len(data), 333):
        reader.append_bytes(data[k:k + 333])
        got.append(reader.read_pcm())
    got = np.concatenate(got)
    skip = LOOKAHEAD   # (the pre-skip: the encoder delay, dropped by the reader)
    assert len(got) == len(CHIRP)
    np.testing.assert_array_equal(got, want[skip:skip + len(got)])


def test_unflushed_stream_decodes_as_it_arrives():
    w, r = OggOpusWriter(), OggOpusReader()
    got = []
    for i in range(0, len(CHIRP), FRAME):
        w.append_pcm(CHIRP[i:i + FRAME])
        data = w.read_bytes()
        assert len(parse_pages(data)) == (3 if i == 0 else 1)  # headers once, then one page per packet
        r.append_bytes(data)
        pcm = r.read_pcm()
        assert len(pcm) == (FRAME - LOOKAHEAD if i == 0 else FRAME)  # decoded as soon as its page is in
        got.append(pcm)
    out = np.concatenate(got)
    assert len(CHIRP) - FRAME <= len(out) <= len(CHIRP)
    assert snr_db(CHIRP, out) > 15
    assert w.read_bytes() == b"" and r.read_pcm().shape == (0,)


def test_odd_sized_appends_and_flush_at_any_point():
    rng = np.random.default_rng(0)
    for n in [0, 1, 479, 480, 481, 1000]:
        w = OggOpusWriter()
        pcm, at = SINE[:n], 0
        while at < n:
            k = int(rng.integers(1, 300))
            w.append_pcm(pcm[at:at + k])
            at += k
        data = w.read_bytes() + w.flush()
        assert w.flush() == b""
        assert len(decode(data)) == n
        assert parse_pages(data)[-1]["flags"] & 4
        with pytest.raises(ValueError):
            w.append_pcm(SINE[:10])


@pytest.mark.parametrize("chunk", [1, 7, 1000, None])
def test_chunking_does_not_change_the_output(chunk):
    data = encode(SINE)
    assert np.array_equal(decode(data, chunk), decode(data))


def test_pages_are_valid_ogg_opus():
    data = encode(SINE, chunk=777)
    pages = parse_pages(data)
    assert all(p["crc_ok"] and p["version"] == 0 for p in pages)
    assert [p["seq"] for p in pages] == list(range(len(pages)))
    assert len({p["serial"] for p in pages}) == 1
    assert [p["flags"] for p in pages] == [2] + [0] * (len(pages) - 2) + [4]  # BOS first, EOS last, no continuation
    head, tags = pages[0], pages[1]
    assert head["lacing"] == [19] and tags["granule"] == head["granule"] == 0
    magic, version, channels, pre_skip, rate, gain, mapping = struct.unpack("<8sBBHIhB", head["body"])
    assert (magic, version, channels, pre_skip, rate, gain, mapping) == (b"OpusHead", 1, 1, 2 * LOOKAHEAD, SR, 0, 0)
    assert tags["body"].startswith(b"OpusTags") and len(tags["lacing"]) == 1
    audio = pages[2:]
    assert all(p["lacing"][-1] < 255 for p in audio)  # one whole packet per page
    granules = [p["granule"] for p in audio]
    assert granules[:-1] == [960 * (i + 1) for i in range(len(audio) - 1)]  # 48 kHz units, 20 ms a packet
    assert granules[-1] == pre_skip + 2 * len(SINE)  # end trimming
    assert all(a < b for a, b in zip(granules, granules[1:]))
    assert granules[-1] <= 960 * len(audio)


def test_silence_pages_are_long_enough_for_the_browser_decoder():
    data = encode(np.zeros(SR, np.float32))
    pages = parse_pages(data)
    assert all(len(p["raw"]) >= 33 for p in pages)  # opus-recorder's decoder misses shorter trailing pages
    out = decode(data)
    assert len(out) == SR and np.abs(out).max() < 1e-3


def test_bitrate_is_applied():
    low, high = encode(SINE, bitrate=12000), encode(SINE, bitrate=128000)
    assert len(low) < len(high) / 3
    assert snr_db(SINE, decode(high)) > 15


@pytest.mark.parametrize("signal", [SINE, CHIRP], ids=["sine", "chirp"])
def test_complexity_is_applied(signal):
    # the server's cheaper setting changes the packets, and the stream still round-trips
    fast, default = encode(signal, complexity=5), encode(signal)
    assert audio_packets(fast) != audio_packets(default)
    out = decode(fast)
    assert len(out) == len(signal) and snr_db(signal, out) > 15
    for bad in (-1, 11):
        with pytest.raises(ValueError, match="complexity"):
            OggOpusWriter(complexity=bad)


def test_server_encodes_at_complexity_5_unless_told():
    from frontends.serve import build_parser

    assert build_parser().parse_args([]).opus_complexity == 5
    assert build_parser().parse_args(["--opus-complexity", "10"]).opus_complexity == 10
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--opus-complexity", "11"])


# ---------------------------------------------------------------- layouts of other encoders

def audio_packets(data: bytes) -> list[bytes]:
    return packets_of(parse_pages(data))[2:]


def test_several_packets_per_page_like_opus_recorder():
    packets = audio_packets(encode(CHIRP, flush=False))
    granules = [960 * (i + 1) for i in range(len(packets))]
    # opus-recorder: pre-skip 3840, 2 packets a page, then on stop an empty EOS page with granule -1.
    stream = header_pages(pre_skip=3840) + paginate(packets, 2, granules=granules, first_seq=2)
    stream += make_page([], b"", flags=4, granule=-1, seq=2 + (len(packets) + 1) // 2)
    out = decode(stream, chunk=100)
    assert len(out) == len(packets) * FRAME - 1920
    reference = decode(header_pages(pre_skip=3840) + paginate(packets, 1, granules=granules, first_seq=2))
    assert np.array_equal(out, reference)


def test_packets_continued_across_pages():
    data = encode(CHIRP, bitrate=256000, flush=False)
    packets = audio_packets(data)
    assert min(map(len, packets)) > 255  # several lacing values each, so pages split them
    stream = header_pages() + paginate(packets, 2, first_seq=2)
    assert any(p["flags"] & 1 for p in parse_pages(stream))
    assert np.array_equal(decode(stream, chunk=333), decode(data))


def test_lost_pages_lose_only_their_packets():
    data = encode(CHIRP, flush=False)
    pages = parse_pages(data)
    full = decode(data)
    assert len(decode(b"".join(p["raw"] for i, p in enumerate(pages) if i != 10))) == len(full) - FRAME
    # a lost page in the middle of a continued packet: the packet's other pieces are skipped
    packets = audio_packets(encode(CHIRP, bitrate=256000, flush=False))
    split = parse_pages(header_pages() + paginate(packets, 2, first_seq=2))
    kept = b"".join(p["raw"] for i, p in enumerate(split) if i != 5)
    assert len(decode(kept)) < len(decode(b"".join(p["raw"] for p in split)))


def test_chained_streams_play_one_after_the_other():
    a, b = encode(SINE[:10000]), encode(CHIRP[:7000])
    assert len(decode(a + b, chunk=500)) == 17000


def test_stereo_stream_is_downmixed():
    import opuslib
    enc = opuslib.Encoder(SR, 2, opuslib.APPLICATION_AUDIO)
    stereo = np.stack([SINE, SINE], 1)
    packets = [enc.encode_float(stereo[i:i + FRAME].tobytes(), FRAME) for i in range(0, len(SINE), FRAME)]
    out = decode(header_pages(head=opus_head(312, channels=2)) + paginate(packets, 4, first_seq=2))
    assert len(out) == len(SINE) - LOOKAHEAD
    assert snr_db(SINE, out) > 15


# ---------------------------------------------------------------- malformed input

def expect_error(data: bytes, match: str, chunk: int | None = None, **kw) -> OggError:
    with pytest.raises(OggError, match=match) as e:
        decode(data, chunk, **kw)
    return e.value


def test_garbage_is_rejected_at_once():
    expect_error(b"GET / HTTP/1.1\r\n", "capture pattern")
    r = OggOpusReader()
    r.append_bytes(b"Og")  # a valid prefix: wait for more
    with pytest.raises(OggError, match="capture pattern"):
        r.append_bytes(b"x")


def test_flipped_bit_fails_the_crc():
    data = bytearray(encode(SINE[:4800]))
    pages = parse_pages(bytes(data))
    at = sum(len(p["raw"]) for p in pages[:3]) + 40
    data[at] ^= 0x10
    expect_error(bytes(data), "CRC", chunk=50)


def test_truncated_header_then_garbage():
    data = encode(SINE[:4800])
    garbage = random.Random(1).randbytes(70000)
    expect_error(data[:20] + garbage, "CRC|version|flags")
    expect_error(data[:100] + data, "CRC|capture|version|flags")


def test_first_packet_must_be_opus_head():
    vorbis = b"\x01vorbis" + bytes(22)
    expect_error(make_page([len(vorbis)], vorbis, flags=2, granule=0), "OpusHead")
    expect_error(make_page([10], b"OpusHead\x01\x01", flags=2), "19")
    expect_error(header_pages(head=opus_head(312, channels=6, mapping=1)), "mapping family")
    expect_error(make_page([19], opus_head(312), flags=2) + make_page([5], b"hello", seq=1), "OpusTags")


def test_other_stream_errors():
    data = encode(SINE[:4800])
    pages = parse_pages(data)
    bad_version = bytearray(pages[0]["raw"])
    bad_version[4] = 1
    expect_error(bytes(bad_version), "version")
    expect_error(data + pages[3]["raw"], "after the end of the stream")
    other = make_page(pages[3]["lacing"], pages[3]["body"], serial=pages[0]["serial"] ^ 1, seq=3)
    expect_error(b"".join(p["raw"] for p in pages[:3]) + other, "another logical stream")
    # a packet left unfinished (last lacing value 255) whose next page lacks the continued flag
    expect_error(header_pages() + make_page([255], bytes(255), seq=2) + make_page([3], b"\xf8\xff\xfe", seq=3),
                 "does not continue")


def test_undecodable_opus_packet():
    # TOC 0xff: code 3; frame-count byte 0xff: 63 frames of 20 ms, far over the 120 ms an Opus packet may last
    expect_error(header_pages() + make_page([3], b"\xff\xff\xff", seq=2),
                 "undecodable Opus packet .*: corrupted stream$")


def test_size_limits():
    # a page whose header announces 65 kB, past a 4 kB limit: refused before its body arrives
    big = struct.pack("<4sBBqIIIB", b"OggS", 0, 2, 0, 7, 0, 0, 255) + bytes([255]) * 255
    expect_error(big, "limit", max_buffer=4096)
    # more than max_buffer of unread PCM; fine when the caller keeps reading
    data = encode(SINE)
    expect_error(data, "max_buffer", max_buffer=50_000)
    assert len(decode(data, chunk=1000, max_buffer=50_000)) == len(SINE)
    # a decompression bomb: 2-byte packets of 120 ms (six empty 20 ms frames) cannot blow up memory
    bomb = header_pages() + b"".join(make_page([2] * 255, b"\xfb\x06" * 255, seq=2 + i) for i in range(10))
    expect_error(bomb, "max_buffer")
    # one packet spanning many pages must fit the limit too
    endless = header_pages() + b"".join(make_page([255] * 255, bytes(255 * 255), flags=1 if i else 0, seq=2 + i)
                                        for i in range(3))
    expect_error(endless, "max_buffer", max_buffer=100_000)


def test_reader_stays_failed_after_an_error():
    r = OggOpusReader()
    with pytest.raises(OggError):
        r.append_bytes(b"garbage!")
    with pytest.raises(OggError, match="already failed.*capture pattern"):
        r.append_bytes(encode(SINE[:4800]))


def test_fuzz_random_bytes_raise_only_oggerror():
    rng = random.Random(2)
    valid_header = encode(SINE[:960])[:27]
    for i in range(300):
        junk = rng.randbytes(rng.randrange(0, 400))
        prefix = [b"", b"OggS", valid_header[:rng.randrange(4, 28)]][i % 3]
        feed_expecting_oggerror_or_success(prefix + junk, rng.choice([1, 13, 1000]))


def test_fuzz_corrupted_streams_raise_only_oggerror():
    rng = random.Random(3)
    data = encode(CHIRP[:7200], bitrate=64000)
    pages = [p["raw"] for p in parse_pages(data)]
    for i in range(400):
        d = bytearray(data)
        op = i % 5
        if op == 0:  # flip bytes anywhere
            for _ in range(rng.randrange(1, 4)):
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
        elif op == 1:  # cut, insert or delete a span
            a = rng.randrange(len(d))
            b = min(len(d), a + rng.randrange(1, 64))
            d[a:b] = [b"", rng.randbytes(rng.randrange(1, 64)), d[a:b] * 2][rng.randrange(3)]
        else:  # corrupt inside one page and fix its CRC, so that the packet-level checks are reached
            k = rng.randrange(len(pages))
            page = bytearray(pages[k])
            body = 27 + page[26]
            for _ in range(rng.randrange(1, 4)):  # a header field, the lacing, a packet's first bytes, anywhere
                j = rng.choice([rng.randrange(4, 22), rng.randrange(26, body), body, body + 1,
                                rng.randrange(len(page))])
                page[min(j, len(page) - 1)] = rng.randrange(256)
            page[22:26] = b"\0\0\0\0"
            struct.pack_into("<I", page, 22, crc_bitwise(bytes(page)))
            d = bytearray(b"".join(pages[:k]) + page + b"".join(pages[k + 1:]))
        feed_expecting_oggerror_or_success(bytes(d), rng.choice([1, 50, len(d) or 1]))


# ---------------------------------------------------------------- interop with Kyutai's sphn

def sphn_encode(sphn, pcm: np.ndarray) -> bytes:
    w = sphn.OpusStreamWriter(SR)
    out = b""
    for i in range(0, len(pcm) - 959, 960):  # it takes whole frames only
        got = w.append_pcm(pcm[i:i + 960])
        out += got if isinstance(got, (bytes, bytearray)) else w.read_bytes()  # sphn >= 0.2 returns the bytes
    return out


def sphn_decode(sphn, data: bytes) -> np.ndarray:
    r = sphn.OpusStreamReader(SR)
    parts = []
    for i in range(0, len(data), 1000):
        got = r.append_bytes(data[i:i + 1000])
        parts.append(np.asarray(got if got is not None else r.read_pcm(), np.float32).reshape(-1))
    return np.concatenate(parts)


def test_sphn_decodes_our_stream():
    sphn = pytest.importorskip("sphn")
    out = sphn_decode(sphn, encode(CHIRP, flush=False))
    # sphn does not apply the pre-skip: its output lags by the codec delay and is one frame short at most
    assert len(CHIRP) - FRAME <= len(out) <= len(CHIRP) + LOOKAHEAD
    assert best_lag(CHIRP, out, 400) == LOOKAHEAD
    assert snr_db(CHIRP, out[LOOKAHEAD:]) > 15


def test_we_decode_sphns_stream():
    sphn = pytest.importorskip("sphn")
    data = sphn_encode(sphn, CHIRP)
    pages = parse_pages(data)
    assert all(p["crc_ok"] for p in pages)
    pre_skip = struct.unpack_from("<H", pages[0]["body"], 10)[0]  # sphn writes 3840 (80 ms), as opus-recorder does
    theirs, ours = sphn_decode(sphn, data), decode(data, chunk=7)
    assert len(ours) == len(theirs) - pre_skip // 2  # we apply the pre-skip, sphn does not
    assert ncc(theirs[pre_skip // 2:], ours) > 0.999
    # sphn's pre-skip is longer than its codec delay, so our output starts that much into the input
    ahead = best_lag(ours, CHIRP, 2 * pre_skip)  # ours[t] ~ CHIRP[t + ahead]
    assert pre_skip // 2 - 400 < ahead < pre_skip // 2
    assert snr_db(CHIRP[ahead:], ours) > 10 and ncc(CHIRP[ahead:], ours) > 0.95  # sphn's bitrate is lower
