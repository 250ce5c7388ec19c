# SPDX-License-Identifier: Apache-2.0
"""CUDA-event timing shared by the torch anchor scripts in this folder."""
import torch


def median_us(fn, reps, warmup=3):
    """Median over `reps` calls of fn's GPU time in microseconds, timed with
    CUDA events on the current stream after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    times.sort()
    return times[len(times) // 2]
