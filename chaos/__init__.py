"""Chaos harness: a local elastic cluster, seeded faults, invariant checks, reports and plots."""
