"""The released model's facts (docs/checkpoint.md) as ``Request.from_call`` takes them, without a checkpoint: its size
rule, largest side and DiT blocks, no generation_config.json (so GLM-Image's published sampling settings) and no
processor (so no prompt-length check: tests/test_generate.py counts on a checkpoint). Condition images are kept as
they are, and recorded."""

from dataclasses import dataclass, field

from mlx_glm_image.pipeline.facts import CheckpointFacts


@dataclass(frozen=True, kw_only=True)
class Facts(CheckpointFacts):
    size_multiple: int = 32
    max_side: int | None = 2048
    dit_blocks: int = 30
    fitted: list = field(default_factory=list)

    def prepare_condition_images(self, images):
        self.fitted.append(images)
        return images
