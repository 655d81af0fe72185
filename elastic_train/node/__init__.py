"""What runs beside torchrun on every node: the launcher, the rendezvous backend, the prefork
server, the hang watchdog and the SkyPilot rendering. Workers import only `contract`."""
