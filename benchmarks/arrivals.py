"""When each request is sent: a seeded schedule of offsets from the run's start.

An infinite rate sends everything at once (then `--max-concurrency` alone shapes the
load). Otherwise gaps follow a gamma distribution with shape = burstiness and mean
1/rate: burstiness 1 is a Poisson process, < 1 burstier, > 1 more even, inf constant.
As in vLLM, the offsets are rescaled so the last one is exactly n / rate, which keeps
throughput figures comparable across seeds.
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.errors import BenchConfigError


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Cumulative send times (seconds after start) of `num_requests` requests."""
    if request_rate <= 0:
        raise BenchConfigError(f"--request-rate must be > 0, got {request_rate}")
    if burstiness <= 0:
        raise BenchConfigError(f"--burstiness must be > 0, got {burstiness}")
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness),
                         size=num_requests)
    offsets = np.cumsum(gaps)
    if offsets[-1] > 0:
        offsets *= (num_requests / request_rate) / offsets[-1]
    return offsets.tolist()
