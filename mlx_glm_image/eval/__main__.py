"""``python -m mlx_glm_image.eval``: the command ``mlx-glm-image-eval`` (eval/command.py)."""

import sys

from ..cli import eval_

sys.exit(eval_())
