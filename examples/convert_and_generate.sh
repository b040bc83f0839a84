#!/usr/bin/env bash
# Download GLM-Image once, convert it to 4-bit MLX (DiT and AR model; glyph encoder and VAE stay full
# precision), look at the planned sizes first, then generate.
set -euo pipefail
python convert.py --hf-path zai-org/GLM-Image --mlx-path glm-image-4bit -q --q-bits 4 --dry-run
python convert.py --hf-path zai-org/GLM-Image --mlx-path glm-image-4bit -q --q-bits 4
python -m mlx_glm_image.generate --model glm-image-4bit --output hello.png \
    --prompt 'A chalkboard menu in a cafe, handwritten "Soup of the day: tomato"'
