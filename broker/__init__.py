"""The sitepair broker: CA, enrollment, inventory, jobs, protection and failover orchestration."""
