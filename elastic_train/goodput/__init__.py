"""Goodput accounting: where a run's time and money went (a pure computation from its events), and
its report."""
