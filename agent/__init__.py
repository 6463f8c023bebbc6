"""The sitepair provider agent: enrollment, the control stream, host backends and replication."""

from sitepair.log import quiet_grpc_core

# Before anything imports grpc: its C core reads GRPC_VERBOSITY once, at import.
quiet_grpc_core()
