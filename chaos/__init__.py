"""Chaos harness: a local elastic cluster, seeded faults, invariant checks, reports and plots.

- `scenario`: the scenario YAML as data, validated (contracts/scenario.schema.json + rules).
- `cluster`: `LocalCluster`, nodes as torchrun agents around a standalone rendezvous store
  (`rdzv_store`), each agent serving its node's hang watchdog; kills whole node trees; always
  cleans up.
- `faults`: seeded random schedules and the `Injector` that fires faults as steps are reported.
- `backends`: checkpoint/data storage for a run (a folder, or S3/GCS on loopback behind the
  fault proxy of `proxy`, servers from `services`).
- `metrics`, `invariants`, `report`: reading metrics.jsonl, the five invariants, report.json and
  timeline.png.
- `harness`: one scenario end to end (with the cached fault-free reference); `cli`: the command.
"""
