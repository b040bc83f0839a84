"""Training LoRA adapters for the AR prior model and the DiT (docs/training.md). Nothing is imported here, so that
the command's settings and data checks run before MLX loads any model."""
