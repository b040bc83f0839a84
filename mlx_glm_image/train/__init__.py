"""Training LoRA adapters for the AR prior model and the DiT (docs/training.md).

    from mlx_glm_image.train import TrainingConfig, train
    result = train(TrainingConfig(model="zai-org/GLM-Image", data="my-style", output="my-style-lora", steps=500))
    result = train(data="my-style", output="my-style-lora", target="dit", rank=16)   # the settings by name

The names are looked up when first used, so that importing the package (the command's settings and data checks)
loads no model code.
"""

_API = {"train": "trainer", "Trainer": "trainer", "TrainingResult": "trainer", "TrainingConfig": "config"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
