"""Evaluation: what a setting (-q, --cache, --steps, ...) does to the text in the images, to their closeness to a
reference setting, to time and to memory (``mlx-glm-image-eval``; docs/eval.md)."""
