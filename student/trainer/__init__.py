"""The training job (``atkd-student``): config, loop, metrics log, checkpoints, CLI, and the HF Trainer integration."""
