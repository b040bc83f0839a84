"""The project's commands run as a user runs them, each in a process of its own: ``generate`` and ``server`` as
``python -m mlx_glm_image.<command>``, the converter as the README runs it (``python convert.py``), from the
repository's root unless a test says where."""

import shutil
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def argv(command: str, *args) -> list:
    """The command line: a name ending in .py is a script under the repository's root (``convert.py``), any other a
    module of the package. Arguments become text, except bytes, which go to the process as they are (a prompt that
    is not UTF-8)."""
    program = [str(ROOT / command)] if command.endswith(".py") else ["-m", f"mlx_glm_image.{command}"]
    return [sys.executable, *program, *(a if isinstance(a, bytes) else str(a) for a in args)]


def run(command: str, *args, cwd=ROOT, **kwargs) -> subprocess.CompletedProcess:
    """Run to the end; stdout and stderr captured as text."""
    return subprocess.run(argv(command, *args), capture_output=True, text=True, cwd=cwd, **kwargs)


def start(command: str, *args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs) -> subprocess.Popen:
    """Start it and return at once (to signal it, or to run several together)."""
    return subprocess.Popen(argv(command, *args), cwd=cwd, stdout=stdout, stderr=stderr, text=True, **kwargs)


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """``mlx-glm-image ARGS``."""
    return run("generate", *args, **kwargs)


def cli_ok(*args, **kwargs) -> subprocess.CompletedProcess:
    """``mlx-glm-image ARGS``, which must succeed."""
    proc = cli(*args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line(proc: subprocess.CompletedProcess, message: str):
    """Refused as the project refuses bad input: exit 1, one line ``error: ...`` holding ``message``."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr



LAUNCH = shutil.which("mlx.launch")


def ring(n: int) -> list:
    """``mlx.launch`` for ``n`` processes on this machine, on ports of their own: the ring backend listens with
    SO_REUSEPORT, so two runs on the same ports (two test sessions on one machine) would connect each other's ranks."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        try:
            with ExitStack() as held:
                for port in range(first, first + n):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        return [LAUNCH, "-n", str(n), "--backend", "ring", "--starting-port", str(first)]
    raise RuntimeError(f"no {n} free ports in a row")
