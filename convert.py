#!/usr/bin/env python3
"""Convert a diffusers GLM-Image checkpoint to MLX: ``python convert.py --help``."""

import sys

from mlx_glm_image.convert import main

if __name__ == "__main__":
    sys.exit(main())
