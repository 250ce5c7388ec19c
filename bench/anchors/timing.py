# SPDX-License-Identifier: Apache-2.0
"""CUDA-event timing shared by the torch anchor scripts in this folder."""
import datetime

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


def utc_now():
    """The current UTC time, ISO 8601, for the JSON the anchors print."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
