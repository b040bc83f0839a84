"""The training loop (mlx-lm's tuner ``train``, for GLM-Image's two models): the frozen encodings made or read from
the cache (encode.py), the trainable adapters put on the trained model, then optimizer steps over the data order
until ``--steps``, with validation, checkpoints, a log and a progress line.

A step is ``grad_accumulation`` micro-batches, each ``batch_size`` examples; its gradient is their mean, clipped,
then AdamW (optim.py). Every random draw of micro-batch ``m`` (the DiT's noise, timestep and drop-out) comes from a
key made of the seed and ``m`` alone, and the data order from the seed and the epoch (data.py), so a resumed run
continues exactly (checkpoints.py). A step whose loss or gradients are not finite is skipped and counted.

Several processes (``mlx.launch``) split each step's micro-batches: process ``r`` of ``n`` takes those with
``m % n == r`` and the gradients are summed over the processes before the mean (mlx-lm's ``average_gradients``), so
the step equals one process's with the same global batch; ``grad_accumulation`` must be a multiple of ``n``.
Process 0 writes the checkpoints, the log and the adapter.

A first Ctrl-C (or SIGTERM) lets the step end, writes a checkpoint and stops (exit 130); a second stops at once,
leaving the last checkpoint.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from .. import lora
from ..loading import load_model
from ..pipeline.components import MODELS, Components
from ..quantize import as_spec
from . import checkpoints, encode
from . import optim as train_optim
from .config import TrainingConfig
from .memory import checkpoint_blocks, evaluate_step
from .plan import BLOCKS, MODEL, Plan
from .plan import make as make_plan
from .report import LossLog, Progress


@dataclass(frozen=True, kw_only=True)
class TrainingResult:
    """What a run ended with: where the adapter is, the steps done and skipped, the last step's loss."""

    output: Path
    adapter: Path | None  # the final adapter's folder (None when stopped before the end)
    step: int
    skipped: int
    loss: float | None
    checkpoint: Path | None  # the last checkpoint written
    stopped: bool  # by a signal


def micro_batch_key(seed: int, m: int) -> mx.array:
    """The key of every random draw of the run's micro-batch ``m``: a function of the seed and ``m`` alone."""
    return mx.random.key(int(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, m]).generate_state(1)[0]))


class StopRequest:
    """Within the block, a first SIGINT/SIGTERM/SIGHUP only asks the loop to stop after its step (``asked``); a
    second raises KeyboardInterrupt at once."""

    def __init__(self):
        self.asked = False

    def __enter__(self):
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # started ignoring it (nohup, cmd &): it stays so
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nstopping after this step, with a checkpoint (again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ---- the two targets: what each encodes, trains and saves ----------------------------------------------------

class Target:
    """What a target shares: its settings, the run's components, and the trained model, loaded once (``-q``: its
    frozen base quantized)."""

    def __init__(self, config: TrainingConfig, components: Components):
        self.config, self.components = config, components
        self.model = None

    def load(self) -> nn.Module:
        if self.model is None:
            c = self.config
            self.model = load_model(MODELS[MODEL[c.target]], c.model, dtype=c.dtype,
                                    quantize=as_spec(c.quantize) if c.quantize else None)
        return self.model


class ArTarget(Target):
    """The AR prior model's text decoder on inference's sequence (train/ar.py). The trained model encodes its own
    targets (its vision encoder + VQ), so it loads first."""

    unit = "tok"
    save = staticmethod(lora.save_peft)

    def encoder(self) -> Callable:
        from .ar import ar_example, target_codes

        model, processor = self.load(), self.components.get("processor")

        def encode_one(e):
            codes = target_codes(model, processor, e.image, e.height, e.width)
            sources = None if e.source is None else [fitted_source(self.components, e.source)]
            return ar_example(model, processor, e.prompt, codes, e.height, e.width, images=sources)

        return encode_one

    @staticmethod
    def rebuild(arrays: dict, values: dict):
        from .ar import ArExample

        return ArExample(input_ids=np.array(arrays["input_ids"]), position_ids=np.array(arrays["position_ids"]),
                         labels=np.array(arrays["labels"]), grids=_grids(values["grids"]))

    def free_encoders(self):
        pass  # the trained model is its own encoder

    def prepare(self, batch: list, key: mx.array, dropout: float):
        return batch

    def loss(self, model, batch) -> mx.array:
        from .ar import ar_batch_loss

        return ar_batch_loss(model, batch)

    @staticmethod
    def amount(batch) -> int:
        return sum(e.input_ids.shape[1] for e in batch)


def fitted_source(components: Components, path: Path):
    """An editing example's source image as inference fits a condition image (facts.prepare_condition_images)."""
    from PIL import Image

    return components.facts.prepare_condition_images([[Image.open(path)]])[0][0]


def _grids(values: dict):
    from ..pipeline.processor import TargetGrids

    return TargetGrids(target=tuple(values["target"]),
                       preview=None if values.get("preview") is None else tuple(values["preview"]))


class DitTarget(Target):
    """The DiT, flow matching on the image's latents under inference's conditions (train/dit.py)."""

    unit = "img"
    save = staticmethod(lora.save_diffusers)

    def encoder(self) -> Callable:
        from PIL import Image

        from ..pipeline.image_processor import to_rgb
        from .ar import target_codes
        from .dit import dit_example

        get = self.components.get
        ar, processor = get("vision_language_encoder"), get("processor")

        def encode_one(e):
            image = to_rgb(Image.open(e.image))
            extra = {}
            if e.source is not None:
                source = fitted_source(self.components, e.source)
                extra = dict(source=source, source_codes=target_codes(ar, processor, source, source.height,
                                                                      source.width))
            codes = target_codes(ar, processor, image, e.height, e.width)
            return dit_example(vae=get("vae"), text_encoder=get("text_encoder"), tokenizer=get("tokenizer"),
                               image=image, prompt=e.prompt, codes=codes, height=e.height, width=e.width, **extra)

        return encode_one

    @staticmethod
    def rebuild(arrays: dict, values: dict):
        from .dit import DitExample

        return DitExample(**arrays, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def free_encoders(self):
        for name in ("vision_language_encoder", "vae", "text_encoder"):
            self.components.set(name, None)
        gc.collect()
        mx.clear_cache()

    def prepare(self, batch: list, key: mx.array, dropout: float):
        from .dit import DitBatch, draw, training_sampler

        b = DitBatch.of(batch)
        sampler = training_sampler(self.components.get("scheduler"), self.load(), b.latents)
        return b, sampler, draw(sampler, b, key, dropout)

    def loss(self, model, prepared) -> mx.array:
        from .dit import flow_matching_loss

        batch, sampler, d = prepared
        return flow_matching_loss(model, sampler, batch, d)

    @staticmethod
    def amount(batch) -> int:
        return len(batch)


TARGETS = {"ar": ArTarget, "dit": DitTarget}


# ---- the run ------------------------------------------------------------------------------------------------

class Trainer:
    """One training run of ``config`` (planned by plan.py; ``train`` is the whole of it)."""

    def __init__(self, config: TrainingConfig, *, plan: Plan | None = None, group=None, say=print):
        self.config = config
        self.plan = plan or make_plan(config)
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        if config.grad_accumulation % self.world:
            raise ValueError(f"--grad-accumulation {config.grad_accumulation} does not split over {self.world} "
                             "processes: give a multiple of their number")
        self.say = say if self.rank == 0 else (lambda *a, **k: None)
        self.components = Components(given={}, source=config.model, dtype=config.dtype, quantize=None,
                                     memory="resident")
        self.target = TARGETS[config.target](config, self.components)
        self.output = Path(config.output).expanduser()
        self.lora_config = None
        self.model = None
        self.blocks: list = []
        self.optimizer = None
        self.step = 0
        self.skipped = 0

    # -- preparing ---------------------------------------------------------------------------------------------

    def encodings(self, examples) -> list:
        """The examples' frozen encodings, each process encoding its share of what the cache lacks first (a cache
        on a shared disk is then whole for all of them), then reading or encoding the rest."""
        c = self.config
        cache = encode.Cache(Path(c.cache_dir).expanduser() if c.cache_dir else encode.default_folder())
        settings = encode.Settings.of(c)
        encoder = None

        def encode_one(example):
            nonlocal encoder
            if encoder is None:  # the encoders load only when the cache lacks something
                encoder = self.target.encoder()
            return encoder(example)

        def progress(done, total):
            if done == 1 or done == total or done % max(1, total // 10) == 0:
                self.say(f"encoded {done}/{total} examples (kept in {cache.folder})", flush=True)

        kw = dict(cache=cache, settings=settings, encode=encode_one, rebuild=self.target.rebuild, progress=progress)
        if self.world > 1:
            encode.encodings(examples[self.rank::self.world], **kw)
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))  # everyone's share is written
        return encode.encodings(examples, **kw)

    def prepare(self):
        """Encodings, then the trained model with its adapters (restored when resuming), then the optimizer."""
        c = self.config
        self.train_set = self.encodings(self.plan.examples)
        self.validation_set = self.encodings(self.plan.validation) if self.plan.validation else []
        self.target.free_encoders()
        model = self.target.load()
        self.blocks = list(_get(model, BLOCKS[c.target]))
        self.lora_config = c.lora_config(BLOCKS[c.target], len(self.blocks))
        lora.add_trainable(model, self.lora_config, mx.random.key(c.seed))
        if c.gradient_checkpointing:
            checkpoint_blocks(self.blocks)
        self.model = model
        self.optimizer = train_optim.adamw(learning_rate=c.learning_rate, weight_decay=c.weight_decay,
                                           warmup_steps=c.warmup_steps, steps=c.steps)
        self.optimizer.init(model.trainable_parameters())
        self.loss_and_grad = nn.value_and_grad(model, self.target.loss)
        if c.resume:
            self.restore(checkpoints.find(c.resume))

    def restore(self, folder: Path):
        state = checkpoints.read(folder)
        checkpoints.check_same_run(state, self.config, folder)
        adapter = lora.read(str(folder))
        for path, layer in lora.trained(self.model).items():
            a, b, _ = adapter.layers[path]
            module = dict(self.model.named_modules())[path]
            module.lora_A, module.lora_B = a.astype(mx.float32), b.astype(mx.float32)
        checkpoints.restore_optimizer(self.optimizer, folder)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.step, self.skipped = state.step, state.skipped
        self.say(f"resuming after step {state.step} from {folder}")

    # -- a step ----------------------------------------------------------------------------------------------

    def micro_batches(self, n: int) -> list[int]:
        """This process's micro-batches of optimizer step ``n`` (0-based), by their index over the run."""
        accumulation = self.config.grad_accumulation
        return [n * accumulation + j for j in range(accumulation) if j % self.world == self.rank]

    def take_step(self) -> tuple[float, float, int, bool]:
        """Optimizer step ``self.step + 1``: (its loss, the gradients' norm, the tokens or images, taken)."""
        c = self.config
        total, losses, amount = None, [], 0
        for m in self.micro_batches(self.step):
            batch = [self.train_set[i] for i in self.plan.order.batch(m)]
            prepared = self.target.prepare(batch, micro_batch_key(c.seed, m), c.condition_dropout)
            loss, grads = self.loss_and_grad(self.model, prepared)
            evaluate_step(loss, grads, self.model, self.blocks)  # the last block's gradients first (memory.py)
            total = grads if total is None else tree_map(mx.add, total, grads)
            mx.eval(total)
            losses.append(loss)
            amount += self.target.amount(batch)
        loss = sum(losses)
        if self.world > 1:
            total = tree_map(lambda g: mx.distributed.all_sum(g, group=self.group), total)
            loss = mx.distributed.all_sum(loss, group=self.group)
            amount = int(mx.distributed.all_sum(mx.array(amount), group=self.group).item())
        grads = tree_map(lambda g: g / c.grad_accumulation, total)
        loss = loss / c.grad_accumulation
        norm, taken = train_optim.apply_step(self.model, self.optimizer, grads, c.max_grad_norm, loss)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.step += 1
        self.skipped += not taken
        return loss.item(), norm.item(), amount, taken

    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.item())

    # -- validation, checkpoints, the adapter --------------------------------------------------------------

    def validation_loss(self) -> float | None:
        """The mean loss over the held-out examples, one at a time, each with a fixed draw."""
        if not self.validation_set:
            return None
        total = 0.0
        for i, example in enumerate(self.validation_set):
            prepared = self.target.prepare([example], micro_batch_key(self.config.seed + 1, i), 0.0)
            total += self.target.loss(self.model, prepared).item()
        return total / len(self.validation_set)

    def previews(self) -> Path | None:
        """The --validation-prompts' images with the adapter so far, in ``previews/step-N/``."""
        prompts = self.config.validation_prompts
        if not prompts or self.rank != 0:
            return None
        from .. import atomic
        from ..pipeline.pipeline import GlmImagePipeline

        c = self.config
        pipe = GlmImagePipeline(source=c.model, dtype=c.dtype, memory="staged", **{MODEL[c.target]: self.model})
        folder = self.output / "previews" / f"step-{self.step:06d}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(folder, folder=True) as tmp:
            for i, prompt in enumerate(prompts):
                image = pipe(prompt, height=c.resolution, width=c.resolution, seed=c.seed + i).images[0]
                image.save(tmp / f"{i:02d}.png")
        del pipe
        gc.collect()
        mx.clear_cache()
        return folder

    def write_adapter(self, folder: Path):
        self.target.save(folder, self.model, self.lora_config)

    def checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        state = checkpoints.State(step=self.step, skipped=self.skipped, config=self.config.as_json())
        return checkpoints.save(self.output, state, self.optimizer, self.write_adapter)

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        c = self.config
        self.prepare()
        self.output.mkdir(parents=True, exist_ok=True)  # only now: a run stopped while preparing leaves nothing
        log = LossLog(self.output, resume_step=self.step if c.resume else None) if self.rank == 0 else None
        progress = Progress(total=c.steps, start=self.step, unit=self.target.unit) if self.rank == 0 else None
        last_checkpoint, loss = None, None
        with StopRequest() as stop:
            while self.step < c.steps:
                t0 = time.perf_counter()
                loss, norm, amount, taken = self.take_step()
                lr = self.learning_rate()
                if progress:
                    progress.update(self.step, loss=loss, learning_rate=lr, amount=amount,
                                    peak_bytes=mx.get_peak_memory(), skipped=self.skipped)
                record = dict(loss=loss, learning_rate=lr, grad_norm=norm, seconds=time.perf_counter() - t0)
                if not taken:
                    record["skipped"] = True
                end = self.step == c.steps
                if (c.validate_every and self.step % c.validate_every == 0) or (end and c.validate_every):
                    val = self.validation_loss()
                    if val is not None:
                        record["validation_loss"] = val
                    shown = self.previews()
                    if progress and (val is not None or shown):
                        progress.message(f"step {self.step}: " + ", ".join(
                            ([f"validation loss {val:.4f}"] if val is not None else [])
                            + ([f"previews in {shown}"] if shown else [])))
                if log:
                    log.record(self.step, **record)
                stopping = self._agreed(stop.asked)
                if (c.save_every and self.step % c.save_every == 0 and not end) or stopping:
                    last_checkpoint = self.checkpoint()
                    if progress and last_checkpoint:
                        progress.message(f"checkpoint written: {last_checkpoint}")
                if stopping:
                    break
        if progress:
            progress.close()
        if log:
            log.plot(self.output / "loss.png")
        done = self.step >= c.steps
        adapter = None
        if done and self.rank == 0:
            self.write_adapter(self.output)
            adapter = self.output
        return TrainingResult(output=self.output, adapter=adapter, step=self.step, skipped=self.skipped, loss=loss,
                              checkpoint=last_checkpoint, stopped=not done)

    def _agreed(self, asked: bool) -> bool:
        """Whether any process was asked to stop (all stop after the same step)."""
        if self.world == 1:
            return asked
        return mx.distributed.all_sum(mx.array(int(asked)), group=self.group).item() > 0


def _get(model, path: str):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def train(config: TrainingConfig | None = None, **settings) -> TrainingResult:
    """Train an adapter: ``train(TrainingConfig(...))`` or ``train(data=..., output=..., steps=...)`` with the
    command's settings by name (docs/training.md)."""
    if config is None:
        config = TrainingConfig(**settings)
    elif settings:
        raise TypeError("give a TrainingConfig or settings by name, not both")
    return Trainer(config).run()
