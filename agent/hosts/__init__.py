"""Host backends: the boundary between the agent and the hypervisor."""
