"""kiln's runtime: config, launch, loop, checkpoints, metrics and signals, shared by every stage."""
