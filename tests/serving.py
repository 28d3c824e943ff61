"""A real `ppx-serve` on loopback (the tiny golden model on the CPU) and a websocket client that
streams audio like a browser, for the server's tests."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

from frontends.ogg_opus import OggOpusReader, OggOpusWriter

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "golden" / "tiny-1234"


def installed(name: str) -> Path:
    """An installed console script (`ppx-serve`, ...) beside this Python: the tests run the
    product as a user does, not `python -m` from the source tree."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise RuntimeError(f"'{name}' is not installed beside {sys.executable}: run `make install` (or "
                           f"`pip install -e .`) first")
    return path


def tiny_model_args() -> list[str]:
    return ["--moshi-weight", str(TINY / "lm.safetensors"), "--mimi-weight", str(TINY / "mimi.safetensors"),
            "--tokenizer", str(TINY / "tokenizer.model"), "--config", str(TINY / "config.json")]


def _die_with_parent() -> None:
    """The server gets SIGTERM if pytest dies before its teardown (Linux: PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


class ServerProcess:
    """The installed `ppx-serve` on a free loopback port, run from `tmp` as its working
    directory, on the tiny golden model on the CPU (greedy), with voices NATF2 (.pt) and VARM0
    (a recording) unless `voices` is False. `extra` flags come last, so they win. `program`
    replaces the installed ppx-serve (e.g. the stand-in server of `benchmarks.serve_host`)."""

    def __init__(self, tmp: Path, *extra: str, max_sessions: int | None = 3, voices: bool = True,
                 model: list[str] | None = None, timeout: float = 60, env: dict | None = None,
                 program: list[str] | None = None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.voices = tmp / "voice-prompts"  # (a folder named like a package would shadow it for python -m)
        vflags = []
        if voices:
            self.voices.mkdir(exist_ok=True)
            shutil.copy(TINY / "voice.pt", self.voices / "NATF2.pt")
            shutil.copy(TINY / "voice.wav", self.voices / "VARM0.wav")
            vflags = ["--voice-prompt-dir", str(self.voices)]
        cmd = [*(program or [str(installed("ppx-serve"))]), "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
               *(tiny_model_args() + ["--greedy"] if model is None else model), *vflags,
               *(["--max-sessions", str(max_sessions)] if max_sessions else []), *extra]
        self.log_path = tmp / f"server-{os.getpid()}-{id(self)}.log"
        self.log = open(self.log_path, "w+")
        self.stdout: list[str] = []
        self.port: int | None = None
        self.ready_fields: dict = {}
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     preexec_fn=_die_with_parent)
        ready = threading.Event()

        def watch():  # reads stdout to its end, so the server never blocks on a full pipe
            for line in self.proc.stdout:
                self.stdout.append(line)
                if line.startswith("PPX_READY port=") and self.port is None:
                    self.ready_fields = dict(f.split("=", 1) for f in line.split()[1:])
                    self.port = int(self.ready_fields["port"])
                    ready.set()
            ready.set()

        threading.Thread(target=watch, daemon=True).start()
        if not ready.wait(timeout) or self.port is None:
            self.stop()
            raise RuntimeError(f"ppx-serve did not start:\n{self.log_path.read_text()[-3000:]}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.base}{path}", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        """SIGINT: stop at once (SIGTERM would drain live sessions first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def input_pcm() -> np.ndarray:
    import soundfile as sf

    pcm, _ = sf.read(TINY / "input.wav", dtype="float32")
    return pcm


def encode(pcm: np.ndarray, complexity: int | None = None) -> list[bytes]:
    """Ogg-Opus pages for pcm, one message per 80 ms frame."""
    w = OggOpusWriter(24000, complexity=complexity)
    out = []
    for i in range(0, pcm.shape[0], 1920):
        w.append_pcm(pcm[i:i + 1920])
        out.append(w.read_bytes())
    return [m for m in out if m]


def heard(messages: list[bytes]) -> np.ndarray:
    """The PCM a server decodes from these audio messages."""
    r = OggOpusReader(24000)
    for m in messages:
        r.append_bytes(m)
    return r.read_pcm()


@dataclass
class Result:
    handshake: bool = False
    handshake_s: float = 0.0
    texts: list[str] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None
    arrivals: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def pcm(self) -> np.ndarray:
        return heard(self.audio)

    def gaps(self) -> np.ndarray:
        return np.diff(np.array(self.arrivals)) if len(self.arrivals) > 1 else np.zeros(0)


async def session(url: str, params: dict, messages: list[bytes] = (), pace: float | list[float] = 0.04,
                  linger: float = 1.0, headers: dict | None = None, read: bool = True, raw: list[bytes] = ()) -> Result:
    """Connects, waits for the handshake, sends `raw` messages as they are and `messages` as
    audio, waiting `pace` seconds after each (or pace[i] after message i), then reads until the
    server is quiet for `linger` seconds."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    res = Result()
    t0 = time.monotonic()
    async with connect(f"{url}?{urlencode(params)}", additional_headers=headers or {}, max_size=1 << 22,
                       open_timeout=30, close_timeout=2, max_queue=16 if read else 1) as ws:
        async def reader():
            try:
                async for m in ws:
                    if m[0] == 0:
                        res.handshake = True
                        res.handshake_s = time.monotonic() - t0
                    elif m[0] == 1:
                        res.audio.append(m[1:])
                        res.arrivals.append(time.monotonic())
                    elif m[0] == 2:
                        res.texts.append(m[1:].decode())
                    elif m[0] == 5:
                        res.errors.append(m[1:].decode())
            except ConnectionClosed:
                pass
            res.close_code = ws.close_code

        task = asyncio.create_task(reader()) if read else None
        if not read:
            first = await asyncio.wait_for(ws.recv(), 30)
            res.handshake = first[:1] == b"\x00"
        else:
            for _ in range(600):
                if res.handshake or task.done():
                    break
                await asyncio.sleep(0.01)
        try:
            for m in raw:
                await ws.send(m)
            for i, m in enumerate(messages):
                await ws.send(b"\x01" + m)
                await asyncio.sleep(pace if isinstance(pace, (int, float)) else pace[i])
        except ConnectionClosed:
            pass
        if read:
            last = -1
            while not task.done():
                n = len(res.audio) + len(res.errors)
                if n == last:
                    break
                last = n
                await asyncio.sleep(linger)
            task.cancel()
    res.close_code = res.close_code if res.close_code is not None else ws.close_code
    return res


def http_status(url: str) -> tuple[int, str]:
    """The status and body of a GET, errors included."""
    import urllib.error

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Background:
    """A session in a thread: `frames` frames of the golden input sent at real time (`params`:
    the query; NATF2 by default). `join` returns its `Result`."""

    def __init__(self, url: str, frames: int = 60, params: dict | None = None):
        self.result = None
        msgs = encode(input_pcm()[: 1920 * frames])
        self.thread = threading.Thread(target=lambda: setattr(self, "result", asyncio.run(
            session(url, params or {"voice_prompt": "NATF2"}, msgs, pace=0.08))), daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float = 40) -> Result:
        self.thread.join(timeout)
        return self.result
