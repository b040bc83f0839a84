"""A training run planned before any weight is read: the checkpoint's facts and the data checked against them, the
layers the adapters go on (``adapted_layers``: the one rule that picks them), the trainable parameters, and a
memory estimate, all from the config files and a lazily built model skeleton (nothing allocated, nothing read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from .. import lora
from ..conversion import human
from ..pipeline.checks import check_size
from ..pipeline.components import Components
from .config import TrainingConfig
from .data import DataOrder, Example, check_examples, read_records

# The model each target trains and where its blocks are (PEFT's paths, which are ours).
MODEL = {"ar": "vision_language_encoder", "dit": "transformer"}
BLOCKS = {"ar": "model.language_model.layers", "dit": "transformer_blocks"}
ADAM_BYTES = 4 * 4  # per trainable float32 value: the value, its gradient and AdamW's two moments


@dataclass(frozen=True, kw_only=True)
class Plan:
    config: TrainingConfig
    examples: list[Example]
    validation: list[Example]
    order: DataOrder
    layers: dict[str, tuple[int, int]]  # adapted layer path -> (in, out)
    blocks: tuple[int, int]  # the adapted blocks, START:END
    weight_bytes: int  # the trained model's frozen weights once loaded
    activation_bytes: int  # about, per optimizer micro-batch

    @property
    def trainable(self) -> int:
        return sum(self.config.rank * (i + o) for i, o in self.layers.values())

    @property
    def epochs(self) -> float:
        return self.config.steps * self.config.grad_accumulation / self.order.per_epoch

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.trainable * ADAM_BYTES + self.activation_bytes

    def render(self) -> str:
        c = self.config
        sizes = sorted({(e.width, e.height) for e in self.examples})
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:6]) + (f" and {len(sizes) - 6} more" if len(sizes) > 6 else "")
        start, end = self.blocks
        lines = [
            ("model", f"{c.model} ({MODEL[c.target]}, {c.dtype}" + (f", {c.quantize}-bit base" if c.quantize else "")
             + ")"),
            ("data", f"{len(self.examples)} examples in {len(sizes)} size(s): {shown}"
             + (f"; {len(self.validation)} held out" if self.validation else "")),
            ("steps", f"{c.steps} of {c.batch_size} x {c.grad_accumulation} examples: {self.order.per_epoch} batches "
                      f"an epoch, {self.epochs:.2f} epochs"),
            ("adapters", f"rank {c.rank}, alpha {c.alpha:g} on {len(self.layers)} layers ({' '.join(c.layers)} in "
                         f"blocks {start}:{end})"),
            ("trainable", f"{self.trainable:,} parameters ({self.trainable * 4 / 1e6:.1f} MB in float32)"),
            ("optimizer", f"AdamW lr {c.learning_rate:g}, weight decay {c.weight_decay:g}, {c.warmup_steps} warm-up "
                          f"steps then cosine, clip {c.max_grad_norm:g}, seed {c.seed}"),
            ("memory", f"about {human(self.memory_bytes)}: weights {human(self.weight_bytes)}, adapters and AdamW "
                       f"{human(self.trainable * ADAM_BYTES)}, activations {human(self.activation_bytes)} (gradient checkpointing "
                       f"{'on' if c.gradient_checkpointing else 'off'}; an estimate from the configs)"),
            ("output", f"{c.output}: the adapter, checkpoints in {Path(c.output) / 'checkpoints'}"
             + (f"; resuming from {c.resume}" if c.resume else "")),
        ]
        return "\n".join(f"{k:<11}{v}" for k, v in lines)


def adapted_layers(model: nn.Module, config: TrainingConfig) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """({path: (in, out)} of the linear layers the adapters go on, (start, end) of the blocks): lora.target_shapes
    of the run's LoraConfig. A ValueError names a range or a name that picks nothing."""
    container = model
    for part in BLOCKS[config.target].split("."):
        container = getattr(container, part)
    lora_config = config.lora_config(BLOCKS[config.target], len(container))
    start, end, _ = slice(*config.block_range).indices(len(container))
    try:
        found = lora.target_shapes(model, lora_config)
    except lora.LoraError:
        found = {}
    unused = lora_config.unused(found)
    if unused:
        raise ValueError(f"--targets {unused[0]} names no linear layer in blocks {start}:{end} of the model")
    return found, (start, end)


def check_output(config: TrainingConfig):
    """--output is a folder of this run: new, empty, or the one --resume continues (its checkpoint is below it)."""
    out = Path(config.output).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {config.output} is a file")
    if config.resume is not None:
        resume = Path(config.resume).expanduser()
        if not resume.is_dir():
            raise ValueError(f"--resume {config.resume} is not a folder" if resume.exists()
                             else f"--resume {config.resume} does not exist")
        if out.resolve() not in (resume.resolve(), *resume.resolve().parents):
            raise ValueError(f"--resume {config.resume} is not below --output {config.output}")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--output {config.output} holds files this run did not make: give a new or empty folder, "
                         "or --resume a checkpoint below it")


def make(config: TrainingConfig) -> Plan:
    """Everything checked and counted; only config files, the processor and the data's headers are read."""
    check_output(config)
    components = Components(given={}, source=config.model, dtype=config.dtype, quantize=config.quantize,
                            memory="resident")
    missing = components.missing()
    if missing:
        raise ValueError(f"{config.model} lacks {', '.join(m + '/' for m in missing)}")
    facts = components.facts
    try:
        check_size(config.resolution, config.resolution, facts.size_multiple, facts.max_side)
    except ValueError as e:
        raise ValueError(f"--resolution {config.resolution}: {e}") from None
    length = _prompt_length(facts) if config.target == "ar" else None
    sizes = dict(resolution=config.resolution, multiple=facts.size_multiple, max_side=facts.max_side,
                 prompt_length=length)
    examples = check_examples(read_records(config.data), **sizes)
    validation = (check_examples(read_records(config.validation_data, "--validation-data"), **sizes)
                  if config.validation_data else [])
    name = MODEL[config.target]
    model = components.skeleton(name)
    layers, blocks = adapted_layers(model, config)
    activations = _activation_bytes(config, components, examples, facts)
    return Plan(config=config, examples=examples, validation=validation,
                order=DataOrder(examples, config.batch_size, config.seed), layers=layers, blocks=blocks,
                weight_bytes=components.weight_bytes(name), activation_bytes=activations)


def _prompt_length(facts):
    """The AR model's context check of generation (CheckpointFacts.check_prompt_length), for one record."""

    def check(prompt: str, height: int, width: int, source_size):
        images = [[_Sized(*source_size)]] if source_size else None
        facts.check_prompt_length([prompt], height, width, images)

    return check


@dataclass(frozen=True)
class _Sized:
    """A condition image as the length check sees it: its size alone (the file is not decoded)."""

    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _activation_bytes(config: TrainingConfig, components: Components, examples: list[Example], facts) -> int:
    """About the activations of one micro-batch of the longest sequence: with gradient checkpointing each block's
    input is kept and one block's inside at a time; without, every block's inside. A block's inside is counted as
    its projections' outputs and the attention scores; the AR model adds its vision head's logits and their
    gradient in float32."""
    itemsize = 2 if config.dtype == "bfloat16" else 4
    cfg = components.config(MODEL[config.target])
    if config.target == "ar":
        text = cfg.text_config
        d, ff, heads, depth = text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_hidden_layers
        tokens = max(_ar_tokens(e, facts) for e in examples)
        extra = tokens * text.vision_vocab_size * 4 * 2
    else:
        d, heads, depth = cfg.inner_dim, cfg.num_attention_heads, cfg.num_layers
        ff = 4 * d
        scale = components.vae_scale_factor * cfg.patch_size
        tokens = max(e.height * e.width // scale**2 * (2 if e.source else 1) for e in examples)
        extra = 0
    inside = tokens * (6 * d + 3 * ff) * itemsize + heads * tokens * tokens * 4
    kept = depth * tokens * d * itemsize + inside if config.gradient_checkpointing else depth * inside
    return config.batch_size * (kept + extra)


def _ar_tokens(example: Example, facts) -> int:
    processor = facts.processor
    sizes = [example.source_size] if example.source_size else ()
    return processor.sequence_length(example.prompt, example.height, example.width, sizes) if processor else 0
