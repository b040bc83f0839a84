#!/usr/bin/env python3
"""Convert a diffusers GLM-Image checkpoint to MLX: ``python convert.py --help``."""

import sys

from mlx_glm_image.cli import convert

if __name__ == "__main__":
    sys.exit(convert())
