"""The built-in web page (frontends/static) in headless Chromium against a real `ppx-serve`.

The server runs the tiny golden model on the CPU on loopback; Chromium's fake microphone plays
`input.wav`. The page must encode it with WebCodecs into Ogg pages the server's strict reader
accepts (the server's frame counter grows and no error comes back), decode and play the agent's
Ogg-Opus, and show its text. Needs Debian's `chromium` and the `playwright` Python package
(driving the system browser; no `playwright install`). A screenshot goes to artifacts/page.png.
"""
from __future__ import annotations

import base64
import re
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import TINY
from frontends.ogg_opus import OggOpusReader, ogg_crc
from serving import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"

if not CHROMIUM.exists():
    pytest.skip("the browser test needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
                allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("the browser test needs the playwright Python package (pip install playwright)",
                allow_module_level=True)


@pytest.fixture()
def server(request, tmp_path):
    """The installed ppx-serve on the tiny model on 127.0.0.1 (a free port), with the extra flags
    that indirect parametrization gives; yields (base URL, log path)."""
    with ServerProcess(tmp_path, *getattr(request, "param", []), max_sessions=None) as s:
        yield s.base, s.log_path


def _frames_total(base: str) -> int:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    return int(re.search(r"^ppx_frames_total (\d+)$", text, re.M).group(1))


def _match_recording(pcm: np.ndarray, wav: Path, window: int = 6000) -> float:
    """The median over 0.25 s windows of pcm (those with sound) of the normalised correlation with
    the part of the recording each matches best. Each window finds its own place, as Chromium's
    capture drops a few ms now and then when the CPU is busy."""
    ref, rate = sf.read(wav, dtype="float32")
    assert rate == 24000
    ref = np.concatenate([ref, ref[:rate]])             # the fake microphone loops the file
    n = 1 << (len(ref) + window).bit_length()
    spectrum = np.fft.rfft(ref, n)
    scores = []
    for at in range(rate // 10, len(pcm) - window, window):  # past the codec's start-up
        a = pcm[at:at + window]
        if np.sqrt(np.mean(a ** 2)) < 0.01:
            continue
        lag = int(np.argmax(np.fft.irfft(spectrum * np.conj(np.fft.rfft(a, n)), n)[:len(ref) - window]))
        seg = ref[lag:lag + window]
        scores.append(float(a @ seg / np.sqrt((a @ a) * (seg @ seg) + 1e-12)))
    assert len(scores) >= 8, f"only {len(scores)} windows with sound"
    return float(np.median(scores))


def _check_pages(data: bytes, count: int) -> None:
    """The page's Ogg writer: `count` pages, each with a good CRC, in sequence, granules in 48 kHz."""
    at, seq, serial = 0, 0, None
    while at < len(data):
        _, version, flags, granule, ser, sq, crc, nseg = struct.unpack_from("<4sBBqIIIB", data, at)
        size = 27 + nseg + sum(data[at + 27:at + 27 + nseg])
        page = bytearray(data[at:at + size])
        page[22:26] = b"\0\0\0\0"
        assert data[at:at + 4] == b"OggS" and version == 0 and ogg_crc(bytes(page)) == crc
        assert sq == seq and serial in (None, ser) and flags == (2 if seq == 0 else 0)
        assert granule == max(0, seq - 1) * 960
        at, seq, serial = at + size, seq + 1, ser
    assert seq == count


# Records every audio message the page sends, so the test can decode it with the server's reader.
RECORD_SENT = """
window.ppxSent = [];
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (data instanceof Uint8Array && data[0] === 1) window.ppxSent.push(data.slice(1));
  return send.call(this, data);
};
"""
# Turns the browser's voice processing (echo cancellation, noise suppression, gain control) off,
# so what the page sends can be compared with the recording the fake microphone plays.
RAW_MIC = """
const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (c) => gum({ ...c, audio: { ...(c.audio || {}),
  echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
"""
# The page's Ogg reader must take a stream cut anywhere (the server may split or join pages).
OGG_CHUNKING = """() => {
  const w = new OggWriter();
  const packets = [0, 1, 254, 255, 256, 600].map((n) =>
    Uint8Array.from({ length: n + 1 }, (_, i) => (i * 7 + n) & 255));
  const stream = concat(w.headers(312), ...packets.map((p) => w.audio(p, 960)));
  const runs = [];
  for (const cut of [1, 5, 27, 100, stream.length]) {
    const got = [];
    const r = new OggReader((p) => got.push(Array.from(p).join(",")));
    for (let i = 0; i < stream.length; i += cut) r.push(stream.slice(i, i + cut));
    runs.push(JSON.stringify(got.slice(2)) === JSON.stringify(packets.map((p) => Array.from(p).join(","))));
  }
  return { runs, stream: btoa(Array.from(stream, (b) => String.fromCharCode(b)).join("")) };
}"""
SENT_BASE64 = "btoa(window.ppxSent.map((a) => Array.from(a, (b) => String.fromCharCode(b)).join('')).join(''))"


# Chromium reads the fake microphone's WAV itself (16-bit PCM; it loops it)
BROWSER_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={TINY / 'input.wav'}",
                "--autoplay-policy=no-user-gesture-required"]


def _browser(pw, tmp_path):
    return pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                 headless=True, args=BROWSER_ARGS,
                                                 viewport={"width": 900, "height": 900})


def test_page_talks_to_the_server(server, tmp_path):
    base, log = server
    problems: list[str] = []
    with sync_playwright() as pw:
        ctx = _browser(pw, tmp_path)
        try:
            ctx.add_init_script(RECORD_SENT)
            ctx.add_init_script(RAW_MIC)
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
            page.goto(f"{base}/")
            page.wait_for_selector("#voice option[value=NATF2]", state="attached", timeout=10_000)
            page.select_option("#voice", "NATF2")
            chunking = page.evaluate(OGG_CHUNKING)
            assert chunking["runs"] == [True] * 5
            _check_pages(base64.b64decode(chunking["stream"]), 2 + 6)
            assert "wise and friendly teacher" in page.input_value("#prompt")
            page.click("summary")  # the options
            page.fill("#seed", "1234")
            before = _frames_total(base)
            page.click("#connect")
            page.wait_for_function("['live', 'closed'].includes(window.ppxStats.state)", timeout=30_000)
            assert page.evaluate("window.ppxStats.state") == "live", page.text_content("#state")
            page.wait_for_timeout(5_000)
            stats = page.evaluate("({...window.ppxStats})")
            after = _frames_total(base)
            transcript = page.text_content("#transcript")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
            sent = base64.b64decode(page.evaluate(SENT_BASE64))

            assert stats["error"] is None and page.is_hidden("#error"), stats["error"]
            assert stats["state"] == "live", page.text_content("#state")
            assert stats["sentPackets"] >= 150, stats        # ~5 s of 20 ms packets went up
            assert after - before >= 40, (before, after)     # the model heard >= 3.2 s of them (80 ms frames)
            assert stats["decodedSeconds"] >= 2, stats       # >= 2 s of the agent's audio decoded
            assert stats["playedBuffers"] >= 50, stats       # ... and played to the end
            assert stats["textPieces"] > 0 and transcript.strip(), stats

            # what the page sent is a valid stream (CRCs, headers, sequence) of real sound
            reader = OggOpusReader(24000)
            reader.append_bytes(sent)
            pcm = reader.read_pcm()
            assert len(pcm) >= 0.9 * 480 * stats["sentPackets"], (len(pcm), stats)
            assert _match_recording(pcm, TINY / "input.wav") > 0.9, "what the page sent is not the recording"

            page.click("#disconnect")
            page.wait_for_function("window.ppxStats.state === 'closed'", timeout=5_000)
            assert page.is_enabled("#connect")
            text = log.read_text()
            assert "bad audio stream" not in text and "faster than real time" not in text, text[-3000:]

            # a refusal shows the server's reason (an unknown voice: 0x05, then close 1008)
            page.evaluate("document.querySelector('#voice').append(new Option('NOPE', 'NOPE'))")
            page.select_option("#voice", "NOPE")
            page.click("#connect")
            page.wait_for_function("window.ppxStats.state === 'closed'", timeout=10_000)
            assert "NOPE" in page.text_content("#error") and "1008" in page.text_content("#state")
        finally:
            ctx.close()
    assert not problems, problems


@pytest.mark.parametrize("server", [["--api-key", "sekrit"]], indirect=True)
def test_page_explains_a_refused_api_key(server, tmp_path):
    base, _ = server
    with sync_playwright() as pw:
        ctx = _browser(pw, tmp_path)
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.goto(f"{base}/")
            # the voice list is behind the key too: the page asks for it
            page.wait_for_function("document.querySelector('#voice').textContent.includes('enter the API key')",
                                   timeout=10_000)
            page.fill("#api-key", "wrong")
            page.wait_for_function("document.querySelector('#voice').textContent.includes('not valid')",
                                   timeout=10_000)
            page.click("#connect")
            page.wait_for_function("window.ppxStats.state === 'closed'", timeout=10_000)
            assert "API key" in page.text_content("#state") and "401" in page.text_content("#state")
            page.fill("#api-key", "sekrit")
            page.wait_for_selector("#voice option[value=NATF2]", state="attached", timeout=10_000)
            page.click("#connect")
            page.wait_for_function("window.ppxStats.state === 'live'", timeout=30_000)
            page.click("#disconnect")
        finally:
            ctx.close()
