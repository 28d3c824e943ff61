"""When ticks start: as soon as every session has a frame, or when the oldest waiting frame has
waited the deadline; never on a fixed cadence."""
import threading
import time

import numpy as np

from benchmarks.serve_host import StandInEngine
from frontends.serve.scheduler import OpenRequest, Scheduler


class _Sink:
    def __init__(self):
        self.answers = 0

    def answer(self, out, born, late):
        self.answers += 1

    def behind(self, dropped):
        raise AssertionError("nothing should be dropped")


def _serve(deadline: float, sessions: int = 16, seconds: float = 1.6):
    """`sessions` streams at phases spread over a frame period (a frame arrives every 5 ms),
    ticks of 1 ms: returns the frame waits (s) and the batch sizes of the ticks."""
    eng = StandInEngine(max_slots=sessions, tick_s=0.001)
    sizes = []
    step = eng.step
    eng.step = lambda frames: (sizes.append(len(frames)), step(frames))[1]
    sched = Scheduler(eng, deadline=deadline, max_wait=2.0)
    sched.start()
    sinks = [_Sink() for _ in range(sessions)]
    slots = [sched.open(OpenRequest(None, "", None, s)).result(5) for s in sinks]
    frame = np.zeros(1920, np.float32)
    period = 0.08
    t0 = time.monotonic()
    due = sorted((t0 + i * period / sessions + k * period, slot)
                 for i, slot in enumerate(slots) for k in range(int(seconds / period)))

    def feed():
        for t, slot in due:
            time.sleep(max(0.0, t - time.monotonic()))
            sched.push(slot, frame, time.monotonic())

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join()
    time.sleep(0.1)
    sched.stop()
    assert sum(s.answers for s in sinks) == len(due)   # every frame answered
    return np.array(sched.metrics.wait_window), sizes


def test_frames_wait_the_deadline_not_a_cadence():
    waits, sizes = _serve(deadline=0.002)
    # (a 20 ms cadence would make them wait 10 ms on average)
    assert np.median(waits) < 0.006, np.median(waits)
    assert max(sizes) < 16   # frames at spread phases share ticks but do not wait for every session


def test_a_longer_deadline_batches_more_frames_per_tick():
    _, short = _serve(deadline=0.002)
    _, long = _serve(deadline=0.02)
    assert np.mean(long) > 1.5 * np.mean(short)
