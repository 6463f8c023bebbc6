"""Virtual disk tests."""
