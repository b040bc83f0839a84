"""A training run's settings: ONE table (``TrainingConfig``, each field with its kind, default and help), from which
the JSON config file (``--config FILE``) and the command's flags are both made, as mlx-lm's ``lora.py`` makes its
YAML keys and flags from one set of defaults. Every field is a flag; a flag given overrides the file; the file
overrides the defaults. Every value is checked with one line that names the flag or the file's key.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import MISSING, dataclass, field, fields

from ..lora import LoraConfig
from ..pipeline.checks import check_seed, described, is_kind, read_json
from ..pipeline.pipeline import DEFAULT_REPO

TARGETS = ("ar", "dit")
# The layers each target adapts by default: the upstream recipe's for the AR model's text decoder (its README's
# baseline); diffusers' LoRA training scripts' attention projections for the DiT.
DEFAULT_LAYERS = {"ar": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
                  "dit": ("to_q", "to_k", "to_v", "to_out.0")}
DTYPES = ("bfloat16", "float32")
QUANTIZE = (4, 8)  # QLoRA: the frozen base at these widths, the adapters in full precision
_NAME = re.compile(r"[\w.]+")  # a layer name (PEFT's list rule); anything else is a regular expression
_BLOCKS = re.compile(r"([0-9]+)?:([0-9]+)?")


def setting(default, help: str, *, kind, flags=(), choices=None, low=None, above=None, metavar=None):
    """One row of the table: a field with its default and what the flag and the check need. ``kind``: int, float,
    str, bool or list (of text); ``low``: the least value allowed; ``above``: a bound the value must exceed."""
    meta = dict(help=help, kind=kind, flags=flags, choices=choices, low=low, above=above, metavar=metavar)
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The settings of one training run (the command's flags, the config file's keys; docs/training.md)."""

    model: str = setting(DEFAULT_REPO, "pipeline folder (diffusers layout or converted) or Hugging Face repo id",
                         kind=str, flags=("-m", "--model"), metavar="PATH")
    data: str = setting(MISSING, "the training data: a folder with metadata.jsonl (the upstream recipe's format) or "
                                 "images with same-name .txt captions (mflux's)", kind=str, metavar="DIR")
    output: str = setting(MISSING, "where the adapter goes (--lora OUTPUT loads it); checkpoints go below it",
                          kind=str, metavar="DIR")
    target: str = setting("ar", "what to train: ar, the AR prior model's text decoder (the upstream recipe), or dit, "
                                "the diffusion transformer", kind=str, choices=TARGETS)
    steps: int = setting(1000, "optimizer steps, each over batch-size x grad-accumulation examples", kind=int, low=1,
                         metavar="N")
    rank: int = setting(32, "the adapters' rank r", kind=int, low=1, metavar="R")
    alpha: float = setting(64.0, "the adapters' lora_alpha: their update is scaled by alpha / rank", kind=float,
                           above=0, metavar="A")
    learning_rate: float = setting(1e-4, "AdamW's peak learning rate (after the warm-up, then cosine to 0)",
                                   kind=float, above=0, metavar="LR")
    weight_decay: float = setting(0.01, "AdamW's decoupled weight decay", kind=float, low=0, metavar="W")
    warmup_steps: int = setting(100, "steps of linear warm-up of the learning rate", kind=int, low=0, metavar="N")
    max_grad_norm: float = setting(1.0, "the gradients are clipped to this global norm", kind=float, above=0,
                                   metavar="X")
    batch_size: int = setting(1, "examples per batch; a batch holds images of one size", kind=int, low=1, metavar="N")
    grad_accumulation: int = setting(4, "batches whose gradients are summed for one optimizer step", kind=int, low=1,
                                     metavar="N")
    seed: int = setting(0, "the seed of the adapters' initialisation, the data order and the noise", kind=int,
                        metavar="S")
    targets: list = setting(None, "the layers to adapt: names (a layer whose path ends with the name, PEFT's rule) "
                                  "or regular expressions matched against the whole path (default for ar: "
                                  f"{' '.join(DEFAULT_LAYERS['ar'])}; for dit: {' '.join(DEFAULT_LAYERS['dit'])})",
                            kind=list, metavar="NAME")
    blocks: str = setting(None, "only the blocks START:END (Python's slice: END excluded, either may be left out) of "
                                "the AR decoder or the DiT (default: all)", kind=str, metavar="START:END")
    resolution: int = setting(1024, "each image is resized, keeping its aspect ratio, to about this many pixels "
                                    "squared, each side a multiple of 32", kind=int, low=32, metavar="PX")
    dtype: str = setting("bfloat16", "the frozen base's compute dtype (the adapters train in float32)", kind=str,
                         choices=DTYPES)
    quantize: int = setting(None, "QLoRA: the frozen base quantized to 4 or 8 bits at load time", kind=int,
                            flags=("-q", "--quantize"), choices=QUANTIZE)
    gradient_checkpointing: bool = setting(True, "recompute each block's activations in the backward pass instead "
                                                 "of keeping them (less memory, about a third more time)", kind=bool)
    save_every: int = setting(100, "write a checkpoint every N steps (0: only at the end and when stopped)",
                              kind=int, low=0, metavar="N")
    condition_dropout: float = setting(0.0, "dit: the share of batches trained unconditioned (the empty prompt, "
                                            "no prior tokens), as classifier-free guidance's unconditional pass; "
                                            "about 0.1 keeps guidance strong over a long run", kind=float, low=0,
                                       metavar="P")
    validation_data: str = setting(None, "held-out examples, in either data format, for the validation loss",
                                   kind=str, metavar="DIR")
    validation_prompts: list = setting(None, "prompts whose preview images (at --resolution, seeds --seed, "
                                             "--seed + 1, ...) are made with the adapter so far at each validation",
                                       kind=list, metavar="PROMPT")
    validate_every: int = setting(0, "validate every N steps (0: never; always at the end when there is something "
                                     "to validate): the loss of --validation-data and the images of "
                                     "--validation-prompts", kind=int, low=0, metavar="N")
    cache_dir: str = setting(None, "where the frozen models' encodings of the data are kept between runs (default: "
                                   "$MLX_GLM_IMAGE_CACHE/encodings, else ~/.cache/mlx-glm-image/encodings)",
                             kind=str, metavar="DIR")
    resume: str = setting(None, "continue the run whose checkpoint is this folder (below --output)", kind=str,
                          metavar="DIR")
    dry_run: bool = setting(False, "check the data and the settings, print the plan and stop: no model is loaded",
                            kind=bool)

    def __post_init__(self):
        for f in fields(self):
            _checked(f.name, f.name, getattr(self, f.name))
        if self.validate_every and self.validation_data is None and not self.validation_prompts:
            raise ValueError("--validate-every needs --validation-data or --validation-prompts")
        if self.condition_dropout > 1:
            raise ValueError(f"--condition-dropout must be at most 1, got {self.condition_dropout}")
        if self.condition_dropout and self.target != "dit":
            raise ValueError("--condition-dropout is for --target dit")
        if self.blocks is not None and len(self.layers) == 1 and not _NAME.fullmatch(self.layers[0]):
            raise ValueError("--blocks takes layer names in --targets, not a regular expression")

    @property
    def layers(self) -> tuple[str, ...]:
        """The layer names or patterns to adapt: --targets, else the target's default."""
        return tuple(self.targets) if self.targets else DEFAULT_LAYERS[self.target]

    def lora_config(self, blocks: str, count: int) -> LoraConfig:
        """PEFT's LoraConfig of this run's adapters on a model whose ``count`` blocks are the modules named
        ``blocks`` (--blocks picks some of them, as PEFT's layers_to_transform)."""
        layers = self.layers
        pattern = layers[0] if len(layers) == 1 and not _NAME.fullmatch(layers[0]) else None
        picked = None
        if self.blocks is not None:
            picked = tuple(range(*slice(*self.block_range).indices(count)))
            if not picked:
                raise ValueError(f"--blocks {self.blocks} holds no block of the {count} of the model")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=pattern or layers,
                          layers_to_transform=picked, layers_pattern=blocks.rsplit(".", 1)[-1] if picked else None)

    @property
    def block_range(self) -> tuple[int | None, int | None]:
        """(start, end) of --blocks, each None when left out."""
        if self.blocks is None:
            return None, None
        start, end = _BLOCKS.fullmatch(self.blocks).groups()
        return (None if start is None else int(start)), (None if end is None else int(end))

    def as_json(self) -> dict:
        """The settings as the config file writes them (what a checkpoint records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


FIELDS = {f.name: f for f in fields(TrainingConfig)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(name: str, value):
    """One field's value: its kind and its range; a ValueError says what is wrong (the caller names where)."""
    meta = FIELDS[name].metadata
    kind = meta["kind"]
    if value is None and FIELDS[name].default is None:
        return
    words = {int: "an integer", float: "a number", str: "text", bool: "true or false", list: "a list of text"}
    if not (isinstance(value, bool) if kind is bool else is_kind(value, kind)):
        raise ValueError(f"must be {words[kind]}, got {described(value)}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if meta["low"] is not None and value < meta["low"]:
        raise ValueError(f"must be at least {meta['low']}, got {value}")
    if meta["above"] is not None and not value > meta["above"]:
        raise ValueError(f"must be above {meta['above']}, got {value}")
    if name == "seed":
        check_seed(value)
    elif name == "targets":
        _check_layers(value)
    elif name == "validation_prompts" and not (value and all(isinstance(v, str) and v.strip() for v in value)):
        raise ValueError("must be one or more prompts, none empty")
    elif name == "blocks" and not (_BLOCKS.fullmatch(value) and value != ":"):
        raise ValueError(f"must be START:END (block numbers, either may be left out), got {value!r}")
    elif kind is str and not value.strip():
        raise ValueError("must not be empty")


def _check_layers(values: list):
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError("must be one or more layer names or patterns")
    patterns = [v for v in values if not _NAME.fullmatch(v)]
    if patterns and len(values) > 1:  # PEFT's target_modules: a list of names, or one regular expression
        raise ValueError(f"takes layer names, or one regular expression alone; got {patterns[0]!r} among others")
    for v in patterns:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is not a regular expression ({e})") from None


# ---- the command's flags and the config file, both from the table ----------------------------------------------

def add_arguments(parser: argparse.ArgumentParser):
    """Every field as a flag, each defaulting to None so that a run knows what was given (it overrides --config);
    --help shows the table's defaults."""
    parser.add_argument("--config", metavar="FILE",
                        help="a JSON object of these settings by name (learning_rate, ...); flags given override it")
    for f in fields(TrainingConfig):
        meta = f.metadata
        flags = meta["flags"] or (flag(f.name),)
        default = "" if f.default is MISSING else (f" (default: {_shown_default(f)})")
        options = dict(dest=f.name, default=None, help=meta["help"] + default)
        if meta["kind"] is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(metavar=meta["metavar"], choices=meta["choices"],
                           type={list: str, float: _number}.get(meta["kind"], meta["kind"]))
            if meta["kind"] is list:
                options["nargs"] = "+"
        if f.default is MISSING:
            options["help"] += " (required)"
        parser.add_argument(*flags, **options)


def _shown_default(f) -> str:
    if f.name == "targets":
        return "the target's layers"
    if f.default is None:
        return "none"
    return {True: "on", False: "off"}.get(f.default, str(f.default)) if isinstance(f.default, bool) else str(f.default)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def read_file(path: str) -> dict:
    """The config file's settings by field name; an unknown key, or a value that does not fit, is one line naming
    the file and the key."""
    data = read_json(path, "--config")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: a JSON object of settings by name, got {described(data)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"--config {path}: unknown setting {unknown[0]!r} (the settings are the flags' names with "
                         "_ for -: learning_rate, ...)")
    for name, value in data.items():
        _checked(f"--config {path}: {name!r}", name, value)
    return data


def resolve(args: argparse.Namespace) -> TrainingConfig:
    """The run's settings: the flags given, then the config file's, then the table's defaults."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainingConfig) if getattr(args, f.name) is not None}
    for name, value in given.items():
        _checked((FIELDS[name].metadata["flags"] or (flag(name),))[-1], name, value)
    values = {**(read_file(args.config) if args.config else {}), **given}
    for f in fields(TrainingConfig):
        if f.default is MISSING and f.name not in values:
            raise ValueError(f"give {flag(f.name)} {f.metadata['metavar']} (or {f.name!r} in the --config file)")
    return TrainingConfig(**values)


def _checked(where: str, name: str, value):
    try:
        check(name, value)
    except ValueError as e:
        raise ValueError(f"{where} {e}") from None
