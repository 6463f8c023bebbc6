"""Host metrics for heartbeats, sampled with psutil (CPU, memory, free space per volume)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from sitepair.v1 import common_pb2

_BOOT = psutil.boot_time()


def sample(volumes: list[Path]) -> common_pb2.HostMetrics:
    """Current metrics; ``volumes`` are folders whose file systems are reported (deduplicated)."""
    mem = psutil.virtual_memory()
    metrics = common_pb2.HostMetrics(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_total_bytes=mem.total,
        memory_available_bytes=mem.available,
        uptime_seconds=max(0, int(time.time() - _BOOT)),
    )
    if hasattr(os, "getloadavg"):
        metrics.load_average_1m = os.getloadavg()[0]
    seen: set[int] = set()
    for folder in volumes:
        try:
            dev = folder.stat().st_dev
            if dev in seen:
                continue
            seen.add(dev)
            usage = psutil.disk_usage(str(folder))
        except OSError:
            continue  # a folder that does not exist yet reports nothing
        metrics.volumes.add(path=str(folder), total_bytes=usage.total, free_bytes=usage.free)
    return metrics
