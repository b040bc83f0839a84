"""Signals sent at moments a command reports, instead of after sleeps that a busy machine turns into other moments.

A command runs as its console script does (``from mlx_glm_image.cli import convert; sys.exit(convert())``), in a
runner that watches the interpreter's audit events (PEP 578) from the moment the entry point is called: every
module imported, and every file or folder made, opened for writing, renamed, linked or removed. ``listing`` runs
the command once and returns those moments; ``interrupted_at`` runs it again and, at the chosen moment, the process
sends the signal to itself, where the command's code is at that instant. The promise under test starts with the
entry point (what the interpreter does before it, starting up and importing ``mlx_glm_image.cli``, is its own);
``before_the_entry_point`` sends one during that import. Either can start the process with signals ignored, as a
shell script's ``cmd &`` (SIGINT) and nohup (SIGHUP) start it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

from commands import ROOT

RUNNER = r"""
import os, sys
mode, where, signum, entry, listing = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
WATCHED = {"import", "os.mkdir", "os.rename", "os.link", "os.remove", "os.rmdir", "shutil.rmtree"}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT
out = os.open(listing, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if mode == "list" else None
state = {"armed": mode == "early", "count": 0}


def writes(args):
    path, how, flags = args
    return isinstance(path, (str, bytes, os.PathLike)) and (any(c in how for c in "wax+") if how else flags & WRITE)


def hook(event, args):
    if not state["armed"] or not (event in WATCHED or event == "open" and writes(args)):
        return
    state["count"] += 1
    if out is not None:
        os.write(out, f"{event} {args[0]}\n".encode(errors="replace"))
    elif state["count"] == where:
        state["armed"] = False
        os.kill(os.getpid(), signum)


sys.addaudithook(hook)
from mlx_glm_image import cli
sys.argv = [f"mlx-glm-image-{entry}" if entry != "generate" else "mlx-glm-image", *sys.argv[6:]]
state["armed"] = True
sys.exit(getattr(cli, entry)())
"""


def _run(mode: str, where: int, signum: int, entry: str, args, listing: Path, cwd=ROOT, ignored=()):
    command = [sys.executable, "-c", RUNNER, mode, str(where), str(signum), entry, str(listing), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                          preexec_fn=partial(_ignore, ignored) if ignored else None)


def _ignore(signals):
    """In the child before it runs Python: ``signals`` ignored, as a shell script's ``cmd &`` starts a command
    (SIGINT) and nohup does (SIGHUP)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def listing(entry: str, args, folder: Path) -> list[str]:
    """The moments of a whole run of ``entry`` (``generate`` or ``convert``) with ``args``, in order."""
    path = folder / "moments.txt"
    proc = _run("list", 0, 0, entry, args, path)
    assert proc.returncode == 0, proc.stderr
    moments = path.read_text().splitlines()
    path.unlink()
    return moments


def spread(moments: list[str], n: int) -> list[int]:
    """About ``n`` moments (1-based) over the whole run: evenly spaced, and every one that makes, renames or
    removes a file or folder (those are where a half-done output could be left)."""
    even = {round(1 + i * (len(moments) - 1) / max(n - 1, 1)) for i in range(n)}
    changes = {i + 1 for i, m in enumerate(moments) if not m.startswith(("import ", "open "))}
    return sorted(even | changes)


def interrupted_at(entry: str, args, where: int, signum: int, folder: Path, ignored=()):
    """Run ``entry`` and send ``signum`` at moment ``where``: the finished process. ``ignored``: signals the
    process starts with ignored."""
    return _run("at", where, signum, entry, args, folder / "unused", ignored=ignored)


def before_the_entry_point(entry: str, args, signum: int, folder: Path, ignored=()):
    """Send ``signum`` while the interpreter imports ``mlx_glm_image.cli``, before any of the command's code."""
    return _run("early", 1, signum, entry, args, folder / "unused", ignored=ignored)
