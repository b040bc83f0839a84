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
