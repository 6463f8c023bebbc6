"""sitepair: open disaster-recovery replication for virtual machines (shared code)."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
