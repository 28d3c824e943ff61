"""What one grid-wide barrier costs on this GPU: a kernel whose programs (one or two per SM, all
resident) pass 1000 sense-reversing barriers on two counters 128 B apart (an arrival count the
last arrival resets, and a generation the others wait for), polled by one thread per program
(a scalar atomic) or by every thread (volatile loads).

It is the floor of a persistent kernel that synchronises its grid between dependent steps, to
set beside the cost of a kernel boundary between programmatic-dependent launches.

    python -m benchmarks.grid_barrier
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _barriers(bar_ptr, n, ALL_THREADS: tl.constexpr):
    G = tl.num_programs(0)
    for _ in range(n):
        tl.debug_barrier()
        gen = tl.atomic_add(bar_ptr + 32, 0, sem="relaxed", scope="gpu")
        if tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu") == G - 1:
            tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_add(bar_ptr + 32, 1, sem="release", scope="gpu")
        else:
            if ALL_THREADS:
                while tl.load(bar_ptr + 32, volatile=True) == gen:
                    pass
                tl.atomic_add(bar_ptr + 32, 0, sem="acquire", scope="gpu")
            else:
                while tl.atomic_add(bar_ptr + 32, 0, sem="acquire", scope="gpu") == gen:
                    pass
        tl.debug_barrier()


def main() -> int:
    bar = torch.zeros(64, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name())
    for all_threads in (False, True):
        for programs in (sms, 2 * sms):
            _barriers[(programs,)](bar, 10, ALL_THREADS=all_threads, num_warps=4)
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            _barriers[(programs,)](bar, 1000, ALL_THREADS=all_threads, num_warps=4)
            e.record()
            e.synchronize()
            poll = "every thread polling" if all_threads else "one thread per program polling"
            print(f"{programs} programs, {poll}: {s.elapsed_time(e):.2f} us per barrier")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
