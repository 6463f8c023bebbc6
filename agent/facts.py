"""Static facts about this host, sent at registration and in every Hello."""

from __future__ import annotations

import platform
import socket
import sys

import psutil

from sitepair import PROTOCOL_VERSION, __version__
from sitepair.v1 import common_pb2


def host_facts(*, backend: str, cloud: str = "") -> common_pb2.HostFacts:
    return common_pb2.HostFacts(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        platform=sys.platform,
        backend=backend,
        cpu_count=psutil.cpu_count() or 1,
        memory_total_bytes=psutil.virtual_memory().total,
        agent_version=__version__,
        protocol_version=PROTOCOL_VERSION,
        cloud=cloud,
    )
