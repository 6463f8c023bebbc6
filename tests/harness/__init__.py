"""The cross-site integration harness: two whole sites on one machine, faults on demand,
byte-exact proof. Run ``python -m tests.harness --help``."""
