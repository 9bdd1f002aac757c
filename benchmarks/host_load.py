"""How much *other* work ran on this host while a benchmark measured something.

A compile or a training step on a shared 2-core host takes longer when something else runs beside
it, so a time says little without the load it was measured under. Both benchmarks that time things
(`compare_timm`, `tpu_step_estimate`) record it the same way: the host's busy CPU seconds over the
interval, less the measured processes' own, per second of wall time.
"""

from __future__ import annotations

import os


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on this host has used since boot (Linux's /proc/stat: all but
    idle and iowait); None where the host does not say."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def others_cores(host_before: float | None, host_after: float | None, own_cpu_s: float,
                 wall_s: float) -> float | None:
    """How many cores other work kept busy, on average, over an interval: the host's busy CPU
    seconds over it less the measured processes' own, per second of wall time (0: undisturbed;
    never below 0, since clock ticks round). None where the host's CPU seconds are unknown."""
    if host_before is None or host_after is None or wall_s <= 0:
        return None
    return max(0.0, (host_after - host_before - own_cpu_s) / wall_s)
