"""``python -m mlx_glm_image.train``: the command ``mlx-glm-image-train`` (train/command.py)."""

import sys

from ..cli import train

sys.exit(train())
