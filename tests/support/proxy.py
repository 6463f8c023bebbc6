"""The fault proxy moved to :mod:`tests.harness.network.proxy`; this name keeps old imports working.

It shapes and breaks TCP connections between the sites (delay, jitter, bandwidth, stalls,
corruption, cuts, partitions); see that module.
"""

from tests.harness.network.proxy import FaultProxy, ProxyStats, Route

__all__ = ["FaultProxy", "ProxyStats", "Route"]
