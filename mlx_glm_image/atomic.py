"""Writing so that nothing is ever half-written: a file or a folder is made under a temporary name beside its
destination and renamed into place only once complete (an existing destination is replaced only then). Any
failure or interruption removes the temporary; a signal that arrives while the temporary is made or while it is
swapped in waits for that step to end. Temporary names carry their process id, so that a later write to the same
destination removes what a killed run left. Modes follow the umask.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import secrets
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM/SIGHUP) that arrived while the destination was being swapped in: it is complete."""

    def __init__(self, dst: Path):
        super().__init__(str(dst))
        self.dst = dst


@contextmanager
def signals_held():
    """Defer SIGINT, SIGTERM and SIGHUP to the end of the block, then meet them as before it.

    A signal mask would not do: it holds a signal for this thread only, and another thread of the process (MLX's,
    tqdm's) may take it, after which Python runs the handler here anyway. Handlers can only be set from the main
    thread; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got, old = [], {}
    try:
        for sig in SIGNALS:  # one by one, so that a signal met between two swaps finds the ones made put back
            old[sig] = signal.signal(sig, lambda signum, frame: got.append(signum))
        yield
    finally:
        _put_back(old)
        if got:
            signal.raise_signal(got[0])


def _put_back(handlers: dict):
    """Each of ``handlers`` set again. ``signal.signal`` first runs the handlers of the signals that came in, so it
    can raise (a KeyboardInterrupt) before its own swap: that one is raised once every handler is back, never
    midway, which left a deferring handler behind to swallow every later signal."""
    met = None
    for sig, handler in handlers.items():
        while True:
            try:
                signal.signal(sig, handler)
                break
            except KeyboardInterrupt as e:
                met = met or e
    if met is not None:
        raise met


def temporary_path(dst: Path) -> Path:
    """A free name beside ``dst`` for its temporary, with this process's id."""
    return dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")


def remove_stale(dst: Path) -> list[Path]:
    """The temporaries of ``dst`` that killed runs left (their process is gone): removed; returns them."""
    return _remove_stale(dst.parent, re.escape(dst.name), f".{glob.escape(dst.name)}.*.partial")


def remove_stale_in(folder: Path) -> list[Path]:
    """The temporaries of any destination in ``folder`` that killed runs left: removed; returns them."""
    return _remove_stale(folder, ".+", ".*.partial")


def _remove_stale(folder: Path, name: str, candidates: str) -> list[Path]:
    removed = []
    pattern = re.compile(rf"^\.{name}\.(\d+)\.[0-9a-f]+\.partial$")
    for path in folder.glob(candidates):
        match = pattern.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue  # not ours, or another run is writing there
        _remove(path)
        removed.append(path)
    return removed


@contextmanager
def replacing(dst: str | os.PathLike, folder: bool = False, on_commit: Callable[[], None] | None = None,
              exclusive: bool = False) -> Iterator[Path]:
    """Yields the temporary path to fill (an empty folder with ``folder``, else an empty file); once the block
    ends it becomes ``dst``, replacing what was there. A failure or an interruption inside the block removes it
    and leaves ``dst`` as it was; a signal during the final swap is raised after it as ``InterruptedAfterCommit``.
    ``on_commit`` runs with the swap, signals still held: a caller meeting a signal after the block can tell
    whether ``dst`` is the new one (the swap's end and the caller's next statement are bytecodes apart).
    ``exclusive`` (a file): never replace; if ``dst`` exists by then, even made a moment ago by another process,
    FileExistsError is raised and nothing is left behind."""
    with replacing_together([dst], folder=folder, on_commit=on_commit, exclusive=exclusive) as (tmp,):
        yield tmp


@contextmanager
def replacing_together(dsts: list, folder: bool = False, on_commit: Callable[[], None] | None = None,
                       exclusive: bool = False) -> Iterator[list[Path]]:
    """``replacing`` for files that are one unit (an image and the JSON beside it): yields their temporaries;
    once the block ends they become ``dsts``, in the order given, in one step that no signal cuts (so the last one
    in place means the others are). With ``exclusive`` every name is claimed or none: FileExistsError names the one
    that exists, and the names claimed before it are given back. ``InterruptedAfterCommit`` names the last."""
    dsts = [Path(d) for d in dsts]
    tmps: list[Path] = []
    try:
        for dst in dsts:
            dst.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(dst)
            tmp = temporary_path(dst)
            with signals_held():  # the temporary exists and is known, or nothing
                if folder:
                    os.mkdir(tmp)
                else:
                    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                tmps.append(tmp)
        yield tmps
        _commit(tmps, dsts, exclusive, on_commit)
    except BaseException:
        for tmp in tmps:
            _remove(tmp)
        raise


def _commit(tmps: list[Path], dsts: list[Path], exclusive: bool, on_commit: Callable[[], None] | None):
    """Every temporary becomes its destination, signals held: all of them, or (an error) none of the new ones stays."""
    committed = False
    try:
        with signals_held():  # the swaps are never cut in half
            done = []
            try:
                for tmp, dst in zip(tmps, dsts):
                    _claim(tmp, dst) if exclusive else _swap(tmp, dst)
                    done.append(dst)
            except Exception:
                for dst in done:  # made by this call a moment ago
                    _remove(dst)
                raise
            committed = True
            if on_commit is not None:
                on_commit()
    except KeyboardInterrupt:  # held during the swaps, met after them
        if committed:
            raise InterruptedAfterCommit(dsts[-1]) from None
        raise


def _swap(tmp: Path, dst: Path):
    """``tmp`` becomes ``dst``. A file replaces in one rename; a folder moves an old folder aside first (a folder
    cannot be renamed onto another), and removes it once the new one is in place. Only a folder is moved aside:
    a folder onto a file (or a dangling link) fails in the rename, the file where it was."""
    if not (tmp.is_dir() and dst.is_dir()):
        os.replace(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.old")
    _remove(old)
    dst.rename(old)
    tmp.rename(dst)
    _remove(old)


def _claim(tmp: Path, dst: Path):
    """``tmp`` becomes ``dst`` only if no ``dst`` exists: a hard link is made or refused in one step. Where the
    file system has no hard links (FAT, exFAT), the name is claimed with O_EXCL and then replaced."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None  # named: dst, not tmp
    except OSError:
        os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, dst)
        return
    tmp.unlink()


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, under another user
        return True
    return True
