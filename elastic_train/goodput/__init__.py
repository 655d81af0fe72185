"""Goodput accounting: where a run's time and money went.

- `ledger`: the pure computation from metrics records to a `Ledger` (buckets, costs).
- `store`: ledger.json beside the checkpoints (read, write, `LedgerWriter` on rank 0).
- `report`: the text table, the plot and the `elastic-train report` command.
"""
