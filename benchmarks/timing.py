"""The one timer the kernel benchmarks share: median milliseconds of a call."""

from __future__ import annotations

import statistics
import time


def time_ms(fn, *, gpu: bool = False, repeats: int = 3, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU; on a CPU ``perf_counter`` over
    ``repeats`` calls after one warm-up. ``grad_to_none`` tensors get ``.grad = None`` before each call, so
    a timed backward does not accumulate into old gradients."""
    if gpu:
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
