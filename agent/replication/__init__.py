"""Replication: change tracking, cycles between agents, the replica store."""
