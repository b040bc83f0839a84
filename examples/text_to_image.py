"""Text to image with the Python API: a poster whose quoted text GLM-Image renders as glyphs.

    python examples/text_to_image.py --model glm-image-4bit
"""

import argparse

from mlx_glm_image import GlmImagePipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="zai-org/GLM-Image", help="converted folder, diffusers folder or repo id")
parser.add_argument("--quantize", type=int, choices=[4, 8], help="quantize a full-precision model at load time")
args = parser.parse_args()

pipe = GlmImagePipeline.from_pretrained(args.model, quantize=args.quantize, verbose=True)
prompt = (
    'A vintage travel poster of a lighthouse at dusk. Large art-deco title "VISIT NORTH CAPE", '
    'and below it, smaller, "Ferries daily 08:00 - 20:00".'
)
out = pipe(prompt, height=1024, width=768, num_inference_steps=50, guidance_scale=1.5, generator=42, progress=True)
out.images[0].save("poster.png")
for stage, seconds in out.timings.items():
    print(f"{stage:>14}: {seconds:6.1f} s, peak {out.peak_memory[stage] / 1e9:.2f} GB")
