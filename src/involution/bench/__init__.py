"""Benchmarks: ``involution bench op`` (the operator) and ``involution bench model`` (networks)."""
