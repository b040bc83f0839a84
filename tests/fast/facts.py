"""What a checkpoint says about itself, as ``Request.from_call`` asks it, without a checkpoint: the released
model's size rule and largest side, and its sampling defaults (no generation_config.json)."""

from mlx_glm_image.pipeline.prior_tokens import sampling_settings


class Facts:
    size_multiple = 32
    max_side = 2048
    dit_blocks = 30

    def __init__(self):
        self.fitted = []

    def sampling_settings(self, temperature=None, top_p=None, top_k=None):
        return sampling_settings({}, temperature, top_p, top_k)

    def check_prompt_length(self, prompts, height, width, images=None):
        pass  # the tokenizer's count: tests/test_generate.py, on a checkpoint

    def prepare_condition_images(self, images):
        self.fitted.append(images)
        return images
