"""Student training: the loop, checkpoints, teacher sources and prefetch, the export cache, the CLI."""
