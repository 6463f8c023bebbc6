"""The sitepair broker: CA, enrollment, inventory, jobs, protection and failover orchestration."""

from sitepair.log import quiet_grpc_core

# Before anything imports grpc: its C core reads GRPC_VERBOSITY once, at import.
quiet_grpc_core()
