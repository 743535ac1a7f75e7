"""The first code a spawned worker process (:class:`lib.runtime.parallel.WorkerPool`) runs: watch the parent, then import the
worker (and with it torch).

A worker is started by ``multiprocessing``'s spawn: a fresh interpreter unpickles its target, which imports the
target's module. Were that :mod:`lib.runtime.parallel`, the worker would spend its first seconds importing torch (and then
loading its model) before it could notice that its parent had died, and a parent killed during start-up left its
workers running for seconds (3.6 to 7.7 s measured). This module imports only the standard library (and ``lib``'s
package, which loads nothing), so the watch (:func:`die_with_parent`) starts a fraction of a second after the
spawn, before any heavy import.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PARENT_POLL_S = 0.25
"""How often a worker checks that its parent is alive (besides the parent-death signal on Linux)."""


def die_with_parent(parent: int) -> None:
    """End this process when the parent process ``parent`` dies, even by SIGKILL (which runs no clean-up): on Linux
    the kernel sends SIGKILL at the parent's death (``prctl(PR_SET_PDEATHSIG)``); everywhere, a daemon thread checks
    ``os.getppid()`` every :data:`PARENT_POLL_S` and exits (the worker is re-parented when its parent dies). A parent
    that died before the signal was set up is caught by the first check. The death signal follows the parent
    *thread* that started the worker: start pools from a thread that outlives them."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover -- no libc prctl: the thread suffices
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    if os.getppid() != parent:  # died before the signal was set up
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_entry(index: int, device: str, conn, threads: int, parent: int) -> None:
    """A pool worker's target: Ctrl-C ignored (it reaches the parent, which stops the workers) and
    :func:`die_with_parent` first, then :func:`lib.runtime.parallel._worker_main`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    from .parallel import _worker_main

    _worker_main(index, device, conn, threads)
