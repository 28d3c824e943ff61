"""A real `ppx-serve` on loopback (the tiny golden model on the CPU) and a websocket client that
streams audio like a browser, for the server's tests."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

from frontends.ogg_opus import OggOpusReader, OggOpusWriter

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "golden" / "tiny-1234"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, tmp: Path, *extra: str, max_sessions: int = 3):
        self.voices = tmp / "voices"
        self.voices.mkdir(parents=True, exist_ok=True)
        shutil.copy(TINY / "voice.pt", self.voices / "NATF2.pt")
        shutil.copy(TINY / "voice.wav", self.voices / "VARM0.wav")
        self.port = free_port()
        cmd = [sys.executable, "-m", "frontends.serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--device", "cpu", "--moshi-weight", str(TINY / "lm.safetensors"),
               "--mimi-weight", str(TINY / "mimi.safetensors"), "--tokenizer", str(TINY / "tokenizer.model"),
               "--config", str(TINY / "config.json"), "--voice-prompt-dir", str(self.voices), "--greedy",
               "--max-sessions", str(max_sessions), *extra]
        self.log = open(tmp / f"server-{self.port}.log", "w+")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("PPX_READY"):
                break
            if not line and self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server failed to start:\n{self.log.read()[-3000:]}")
        else:
            raise RuntimeError("server did not start in time")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


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


async def session(url: str, params: dict, messages: list[bytes] = (), pace: float = 0.04, linger: float = 1.0,
                  headers: dict | None = None, read: bool = True, raw: list[bytes] = ()) -> Result:
    """Connects, waits for the handshake, sends `messages` as audio (one per `pace` seconds) and
    `raw` messages as they are, then reads until the server is quiet for `linger` seconds."""
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
            for m in messages:
                await ws.send(b"\x01" + m)
                await asyncio.sleep(pace)
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
