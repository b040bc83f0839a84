"""The handlers the commands set, in this process: a signal the process was started with ignored stays ignored,
and a signal that comes while ``atomic.signals_held`` swaps the handlers leaves none of its deferring handlers
behind (each moment reached by sending the signal from inside ``signal.signal``, just before the swap)."""

import os
import signal

import pytest

from mlx_glm_image import atomic
from mlx_glm_image.cli import interrupting

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raising(signum, frame):
    raise KeyboardInterrupt


@pytest.fixture
def handlers():
    """Every signal raising KeyboardInterrupt, as within a command, and the process's own handlers back after."""
    before = {sig: signal.signal(sig, raising) for sig in SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def sent_before(monkeypatch, swap, signum):
    """``signum`` sent to this process once, just before ``signal.signal`` makes the swap ``swap(sig, handler)``
    says."""
    real, sent = signal.signal, []

    def swapping(sig, handler):
        if swap(sig, handler) and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)  # os.kill runs the handler at once, as signal.signal would before its swap
        return real(sig, handler)

    monkeypatch.setattr(signal, "signal", swapping)


def test_a_signal_between_two_swaps_into_the_block_leaves_no_deferring_handler(handlers, monkeypatch):
    """Before: SIGTERM met while SIGTERM's handler was being swapped left SIGINT's deferring handler in place,
    appending to a list no one read: every later Ctrl-C was lost."""
    sent_before(monkeypatch, lambda sig, handler: sig == signal.SIGTERM and handler is not raising, signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with atomic.signals_held():
            pytest.fail("the block does not run: the signal came first")
    monkeypatch.undo()
    assert [signal.getsignal(sig) for sig in SIGNALS] == [raising] * 3
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_while_the_handlers_are_put_back_leaves_none_behind(handlers, monkeypatch):
    """Before: SIGINT met after its own handler was back, while SIGTERM's was put back, raised there and left
    SIGTERM and SIGHUP deferred for good."""
    sent_before(monkeypatch, lambda sig, handler: sig == signal.SIGTERM and handler is raising, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with atomic.signals_held():
            pass
    monkeypatch.undo()
    assert [signal.getsignal(sig) for sig in SIGNALS] == [raising] * 3
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_held_is_met_after_the_block(handlers):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with atomic.signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append(1)
    assert done == [1] and [signal.getsignal(sig) for sig in SIGNALS] == [raising] * 3


def test_a_signal_ignored_from_the_start_stays_ignored(handlers):
    """Before: ``interrupting`` took over an ignored SIGINT (a script's ``cmd &``) or SIGHUP (nohup), so that the
    same signal was ignored in a command's first milliseconds (the interpreter's start) and stopped it later."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with interrupting():
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is raising


def test_a_signal_met_inside_a_callback_that_ignores_exceptions_is_met_again():
    """A handler that runs inside a __del__ (or an import lock's weakref callback) raises there in vain: Python prints
    "Exception ignored in ..." and goes on. The command meets that signal again once the callback has returned."""
    from mlx_glm_image import cli

    class Dropped:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside __del__

    with pytest.raises(KeyboardInterrupt):
        with cli.interrupting():
            Dropped()
            sum(range(1000))
