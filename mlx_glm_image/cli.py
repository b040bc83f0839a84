"""What the commands share: bad input is one line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path


def prog_name(fallback: str) -> str:
    """How the user invoked the command: the console script's name, else ``fallback`` (python -m ...)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name and not name.endswith(".py") and name != "-c" else fallback


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit 1, like every other bad input."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def above_zero(unit: str):
    """An argparse type: a finite number of ``unit`` above 0 (float() also reads "nan" and "inf")."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a finite number of {unit} above 0, got {text!r}")
        return value

    return parse


def fail(error: BaseException, then: str | None = None) -> int:
    """Print one line for ``error`` (an OSError names its file), ending with ``then`` (what the command had done
    by then), and return the exit code 1."""
    if isinstance(error, OSError) and error.strerror:
        message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    else:
        message = " ".join(str(error).split())  # one line, whatever the message held
    print(f"error: {message}" + (f"; {then}" if then else ""), file=sys.stderr)
    return 1


@contextmanager
def interrupting():
    """Within the block SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so that a stopped command cleans up as
    after Ctrl-C: its temporaries removed, one line said. A signal the process was started with ignored stays
    ignored (SIGINT for a script's ``cmd &``, SIGHUP under nohup): the interpreter ignores it until the block
    begins, so taking it over here made the same signal lost or not by the millisecond it came in.

    A handler that runs inside a callback whose exceptions Python ignores (an import lock's weakref callback, a
    ``__del__``) raises there in vain ("Exception ignored in ...") and the run would go on: such a signal is sent
    again, by another thread (from the hook, the handler would run inside the hook and be ignored once more), and
    the block does not end before it is met."""
    import _thread
    import signal
    import threading

    met, resent = [], []
    main = threading.main_thread().ident

    def interrupt(signum, frame):
        met.append(signum)
        raise KeyboardInterrupt

    def send_again(signum, sent):
        signal.pthread_kill(main, signum)
        sent.set()

    def unraisable(hook):
        if hook.exc_type is not None and issubclass(hook.exc_type, KeyboardInterrupt) and met:
            resent.append(threading.Event())
            _thread.start_new_thread(send_again, (met[-1], resent[-1]))  # not waited for: see above
        else:
            previous_hook(hook)

    signals = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
    old = {sig: signal.signal(sig, interrupt) for sig in signals}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        try:
            for sent in resent:
                sent.wait(5.0)  # the signal is met here at the latest
        finally:
            sys.unraisablehook = previous_hook
            for sig, handler in old.items():
                signal.signal(sig, handler)


def run_command(module: str, interrupted: str) -> int:
    """A command's entry point: its module (MLX and all) is imported inside, so that a Ctrl-C while it loads is
    the line ``interrupted`` and exit 130 too, as later in its own main."""
    try:
        with interrupting():
            main = import_whole(f"mlx_glm_image.{module}").main
    except KeyboardInterrupt:
        return done(130, interrupted)
    return done(main())


def import_whole(name: str):
    """``name`` imported with signals held to its end: a KeyboardInterrupt raised inside an extension's import
    (numpy's) comes out of it as an ImportError, not as the interruption it was; held, it is met right after."""
    import importlib

    from .atomic import signals_held

    with signals_held():
        return importlib.import_module(name)


def done(code: int, said: str | None = None) -> int:
    """A command's exit code (after its last line, ``said``), with SIGINT, SIGTERM and SIGHUP ignored from here
    on: the work is over, so a late signal must not turn it into a kill or a traceback at the interpreter's exit."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if said:
        print(said, file=sys.stderr)
    return code


def generate() -> int:
    """``mlx-glm-image`` and ``python -m mlx_glm_image.generate``."""
    return run_command("generate", "interrupted; no image written")


def convert() -> int:
    """``mlx-glm-image-convert`` and ``python convert.py``."""
    return run_command("convert", "interrupted; nothing was written")


def server() -> int:
    """``mlx-glm-image-server`` and ``python -m mlx_glm_image.server``."""
    return run_command("server", "interrupted; the server did not start")


def train() -> int:
    """``mlx-glm-image-train`` and ``python -m mlx_glm_image.train``."""
    return run_command("train.command", "interrupted; nothing was written")


def eval_() -> int:
    """``mlx-glm-image-eval`` and ``python -m mlx_glm_image.eval``."""
    return run_command("eval.command", "interrupted; nothing was written")


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = False, fill_defaults: bool = True):
    """The options of every command that loads a pipeline (mflux's add_*_arguments): -m, -q, --dtype, --memory.
    Without ``fill_defaults`` each option defaults to None, so that the command knows what the user gave (the
    CLI: a flag overrides --config-from-metadata); --help shows the defaults either way."""
    from .loading import DTYPES
    from .pipeline.components import MEMORY_MODES
    from .pipeline.pipeline import DEFAULT_REPO
    from .quantize import BITS

    defaults = model_defaults()
    parser.set_defaults(**(defaults if fill_defaults else dict.fromkeys(defaults)))
    parser.add_argument("-m", "--model", required=model_required,
                        help="pipeline folder (diffusers layout or converted by convert.py) or Hugging Face repo id"
                             + ("" if model_required else f" (default: {DEFAULT_REPO})"))
    parser.add_argument("-q", "--quantize", type=int, choices=BITS,
                        help="quantize the DiT and the AR model at load time (a converted folder is used as it is)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: bfloat16)")
    parser.add_argument("--memory", choices=list(MEMORY_MODES),
                        help="staged: load each model for its stage and free it after (peak = the largest stage); "
                             "resident: keep every model loaded; auto: resident when the weights fit "
                             f"(default: {defaults['memory']})")
    parser.add_argument("--lora", action="append", metavar="PATH[:SCALE][@NAME]",
                        help="a LoRA adapter for the AR model or the DiT (PEFT's or diffusers' files: a folder, a "
                             ".safetensors file or a Hub repo id), at SCALE (a finite number, default 1), named NAME "
                             "(default: its file's or folder's name, with _2, _3... when taken); repeat for several")


def model_defaults() -> dict:
    """What -m, --dtype and --memory are when not given (--memory: the pipeline's own default)."""
    from .pipeline.components import DEFAULT_MEMORY
    from .pipeline.pipeline import DEFAULT_REPO

    return {"model": DEFAULT_REPO, "dtype": "bfloat16", "memory": DEFAULT_MEMORY}


# cache-dit's own example flags for the DBCacheConfig fields (its _utils/utils.py), beside the long names
CACHE_ALIASES = {"Fn_compute_blocks": "--Fn", "Bn_compute_blocks": "--Bn", "residual_diff_threshold": "--rdt",
                 "max_warmup_steps": "--ws", "warmup_interval": "--wi", "max_cached_steps": "--mc",
                 "max_continuous_cached_steps": "--mcc"}


def add_cache_arguments(parser: argparse.ArgumentParser):
    """The step cache's options (pipeline/step_cache.py), by cache-dit's names: --cache turns on the preset
    (step_cache.SGLANG), each field flag changes one of its settings (and turns the cache on)."""
    from dataclasses import fields

    from .pipeline.step_cache import SGLANG, DBCacheConfig

    parser.add_argument("--cache", dest="cache_on", action="store_true", default=None,
                        help="the step cache: skip the DiT's middle blocks at steps where they would barely change, "
                             f"for speed at the cost of small changes to the image ({SGLANG.source}: "
                             f"{SGLANG.described()})")
    for f in fields(DBCacheConfig):
        if f.name == "enable_separate_cfg":
            continue
        flags = ["--" + f.name.replace("_", "-")] + ([CACHE_ALIASES[f.name]] if f.name in CACHE_ALIASES else [])
        parser.add_argument(*flags, dest=f"cache_{f.name}", type=float if f.type == "float" else int, metavar="N",
                            help=f"{f.metadata['help']} (cache-dit's {f.name}; --cache: "
                                 f"{getattr(SGLANG.cache_config, f.name)})")
    parser.add_argument("--taylorseer-order", type=int, metavar="K",
                        help=f"the step cache's TaylorSeer extrapolation order, 0 for none "
                             f"(with --cache: {SGLANG.calibrator_config.taylorseer_order})")


def cache_settings(args) -> dict | None:
    """{"cache": DBCacheConfig, "calibrator": TaylorSeerCalibratorConfig or None} from the step cache's flags,
    or None when none was given (a ValueError names a bad value)."""
    import dataclasses

    from .pipeline.step_cache import SGLANG, TaylorSeerCalibratorConfig

    changed = {k[len("cache_"):]: v for k, v in vars(args).items() if k.startswith("cache_") and k != "cache_on"
               and v is not None}
    order = args.taylorseer_order
    if not (args.cache_on or changed or order is not None):
        return None
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
    settings = SGLANG.settings(**({} if order is None else {"calibrator_config": calibrator}))
    return {"cache": dataclasses.replace(settings["cache_config"], **changed),
            "calibrator": settings["calibrator_config"]}


def lora_entries(texts) -> list[dict]:
    """--lora's ``PATH[:SCALE][@NAME]`` values as {"source", "scale", "name"}, checked as they enter, before any
    work (an empty path, a scale that is not a finite number: one line)."""
    from . import lora

    return [dict(zip(("source", "scale", "name"), lora.parse_with_name(text))) for text in texts or []]


def load_adapters(pipe, entries, origin: str = "--lora") -> None:
    """Adapters onto ``pipe``: ``lora_entries``' or the records of an image's metadata (whose weights must be the
    ones it was made with), read and matched to their model now, before any weight is loaded; ``origin`` is what
    gave them, for the messages (--lora, or the --config-from-metadata file). A name not given is made unique."""
    from . import lora

    for entry in entries or []:
        adapter = lora.read(entry["source"], entry.get("name"), origin)
        if entry.get("sha256") not in (None, adapter.sha256):
            raise lora.LoraError(f"{adapter.who} is not the adapter the image was made with (its weights changed)")
        pipe.components.adapters.add(adapter, entry["scale"], rename=entry.get("name") is None)
