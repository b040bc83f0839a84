"""Image editing: the condition image is encoded by the VAE (keys/values cached once) and by the AR model's
vision encoder (its prior tokens); the prompt says what to change.

    python examples/edit_image.py photo.jpg 'Replace the sign text with "CLOSED"' --model glm-image-4bit
"""

import argparse

from PIL import Image

from mlx_glm_image import GlmImagePipeline

parser = argparse.ArgumentParser()
parser.add_argument("image")
parser.add_argument("prompt")
parser.add_argument("--model", default="zai-org/GLM-Image")
parser.add_argument("--output", default="edited.png")
args = parser.parse_args()

pipe = GlmImagePipeline.from_pretrained(args.model, verbose=True)
source = Image.open(args.image).convert("RGB")
# height/width default to the condition image's size, rounded down to a multiple of 32
result = pipe(args.prompt, image=[source], generator=0, progress=True).images[0]
result.save(args.output)
print(f"saved {args.output} ({result.width}x{result.height})")
