"""What the commands share: bad input is one line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import argparse
import sys
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


def fail(error: BaseException) -> int:
    """Print one line for ``error`` (an OSError names its file) and return the exit code 1."""
    if isinstance(error, OSError) and error.strerror:
        message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    else:
        message = " ".join(str(error).split())  # one line, whatever the message held
    print(f"error: {message}", file=sys.stderr)
    return 1


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
                             "resident: keep every model loaded; auto: resident when the weights fit (default: auto)")


def model_defaults() -> dict:
    """What -m, --dtype and --memory are when not given."""
    from .pipeline.pipeline import DEFAULT_REPO

    return {"model": DEFAULT_REPO, "dtype": "bfloat16", "memory": "auto"}
