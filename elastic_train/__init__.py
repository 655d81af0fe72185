"""elastic-train: the trainer (config, model, data stream, FSDP2 step loop, metrics, CLI)."""
