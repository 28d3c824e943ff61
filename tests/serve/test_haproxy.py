"""Scale-out behind a real load balancer: the shipped deploy/haproxy/haproxy.cfg (its addresses
swapped for loopback ports) in front of two `ppx-serve` replicas of the tiny model with
`--agent-port`. New sessions follow free room, a full replica is skipped, a draining replica
(SIGTERM) gets no new sessions while its live one runs to its end, and both websocket
endpoints pass through."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from serving import ROOT, Background, ServerProcess

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make install installs it as "
                                                        "root on Debian/Ubuntu: apt-get install haproxy)")


def run(coro):
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HAProxy:
    """HAProxy in the foreground with the shipped configuration, the replicas' addresses and
    agent ports swapped in, and an admin socket to read the servers' state."""

    def __init__(self, tmp: Path, replicas: dict[str, tuple[int, int]]):
        self.port = free_port()
        self.sock = tmp / "haproxy.sock"
        cfg = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
        cfg = cfg.replace("global\n", f"global\n    stats socket {self.sock} mode 600 level admin\n", 1)
        cfg = re.sub(r"(?m)^    bind .*$", f"    bind 127.0.0.1:{self.port}", cfg)
        cfg = re.sub(r"(?m)^    server .*\n", "", cfg)
        cfg += "".join(f"    server {name} 127.0.0.1:{port} agent-port {agent}\n"
                       for name, (port, agent) in replicas.items())
        (tmp / "haproxy.cfg").write_text(cfg)
        self.log = open(tmp / "haproxy.log", "w+")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp / "haproxy.cfg")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.wait(lambda s: all(s.get(n, {}).get("status") == "UP" for n in replicas), "every replica UP")

    def stats(self) -> dict[str, dict]:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.sock))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "ppx_replicas"}

    def wait(self, pred, what: str, timeout: float = 20):
        t = time.monotonic() + timeout
        last = {}
        while time.monotonic() < t:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"haproxy stopped:\n{self.log.read()}")
            last = self.stats()
            if last and pred(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: "
                             + repr({k: (v["status"], v["weight"], v["agent_status"]) for k, v in last.items()}))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def connections(server: ServerProcess) -> int:
    return int(server.metric("ppx_connections"))


def wait_for(pred, what: str, timeout: float = 20):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def cluster(tmp_path):
    agents = {"a": free_port(), "b": free_port()}
    a = ServerProcess(tmp_path / "a", "--agent-port", str(agents["a"]), "--drain-timeout", "60", max_sessions=1)
    b = ServerProcess(tmp_path / "b", "--agent-port", str(agents["b"]), "--drain-timeout", "60", max_sessions=2)
    lb = HAProxy(tmp_path, {"a": (a.port, agents["a"]), "b": (b.port, agents["b"])})
    try:
        yield lb, a, b
    finally:
        lb.stop()
        a.stop()
        b.stop()


def test_sessions_follow_free_room_through_haproxy(cluster):
    lb, a, b = cluster
    lb.wait(lambda s: s["a"]["weight"] == "100" and s["b"]["weight"] == "100", "both agents at 100%")
    # a is filled directly (HAProxy does not see it): its agent reports 0%, and HAProxy, whose
    # least-connections rule alone would pick a (no connection of its own there), skips it
    direct = Background(a.url, frames=80)
    wait_for(lambda: connections(a) == 1, "a's direct session")
    lb.wait(lambda s: s["a"]["weight"] == "0", "a's agent at 0% (full)")
    first = Background(lb.url, frames=60)
    wait_for(lambda: connections(b) == 1, "the first session on b")
    lb.wait(lambda s: s["b"]["weight"] == "50", "b's agent at 50%")
    # the Realtime endpoint passes through as well, to the replica with room
    async def realtime():
        from websockets.asyncio.client import connect
        async with connect(f"ws://127.0.0.1:{lb.port}/v1/realtime") as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 30))["type"], connections(b)

    assert run(realtime()) == ("session.created", 2)
    assert connections(a) == 1
    for r in (first.join(), direct.join()):
        assert r.handshake and not r.errors and len(r.audio) > 50


def test_a_draining_replica_gets_no_new_sessions_while_its_live_one_ends(cluster):
    lb, a, b = cluster
    lb.wait(lambda s: s["a"]["weight"] == "100" and s["b"]["weight"] == "100", "both agents at 100%")
    # fill b directly, so that HAProxy's next session goes to a
    held = [Background(b.url, frames=40) for _ in range(2)]
    wait_for(lambda: connections(b) == 2, "b full")
    lb.wait(lambda s: s["b"]["weight"] == "0", "b's agent at 0%")
    live = Background(lb.url, frames=120)
    wait_for(lambda: connections(a) == 1, "a session through HAProxy on a")
    a.proc.send_signal(signal.SIGTERM)
    lb.wait(lambda s: s["a"]["weight"] == "0" and s["a"]["status"] != "UP", "a drained and down")
    for r in (held[0].join(), held[1].join()):
        assert r.handshake and not r.errors
    lb.wait(lambda s: s["b"]["weight"] == "100" and s["b"]["status"] == "UP", "b free again")
    # while a drains, new sessions through HAProxy land on b
    later = Background(lb.url, frames=10)
    wait_for(lambda: connections(b) == 1, "a new session on b")
    assert connections(a) == 1
    r = live.join()
    assert r.handshake and not r.errors and len(r.audio) > 110, r
    assert later.join().handshake
    # a stopped once its session ended
    assert a.proc.wait(15) == 0
    assert "drained: every session ended" in a.log_text()
