"""Asynchronous sharded checkpoints to object storage with an atomic commit. Knows nothing of models or data."""
