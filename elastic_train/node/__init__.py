"""What runs beside torchrun on every node: the launcher and the agent's command line, the
rendezvous backend, the prefork server and the per-rank entry that uses it, the hang watchdog,
process cleanup and the SkyPilot rendering. Workers import only `contract`."""
