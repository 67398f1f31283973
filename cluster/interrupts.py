"""Ctrl-C that is never lost while the driver waits on Ray.

Python raises KeyboardInterrupt at whatever bytecode the main thread runs when SIGINT arrives.
The driver's wait loops create and drop Ray object refs every few milliseconds, and an exception
raised inside a finalizer (`ObjectRef.__del__`) is printed and ignored, so a plain Ctrl-C could
be swallowed and the batch ran to its end. The CLI installs a handler that, inside those loops
(`deferred_interrupts()`), only records the request; the loop calls `raise_if_interrupted()` at
a safe point every poll (20 ms while generating). Anywhere else, and on a second Ctrl-C before
the first is acted upon, it raises at once, as the default handler does.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_requested = threading.Event()
_deferring = [0]  # depth of deferred_interrupts() blocks


def _on_sigint(signum, frame) -> None:
    if _deferring[0] and not _requested.is_set():
        _requested.set()
        return
    _requested.clear()
    raise KeyboardInterrupt


def install_interrupt_handler() -> None:
    """Routes SIGINT through this module (main thread only; left alone where SIGINT is ignored)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        _requested.clear()
        signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    if _requested.is_set():
        _requested.clear()
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupts():
    """A wait loop that checks raise_if_interrupted() every iteration."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    raise_if_interrupted()
