"""Helpers for tests and the cross-site harness: real brokers and agents."""
