"""The sitepair provider agent: enrollment, the control stream, host backends and replication."""
