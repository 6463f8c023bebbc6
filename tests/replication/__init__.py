"""Replication tests: two agents on loopback with real mTLS and tickets."""
