"""Training: run configuration, data pipeline, checkpoints and the training loop used by recipes/."""
