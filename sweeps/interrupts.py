"""Ctrl-C and SIGTERM stop a sweep cleanly: the running phase is left resumable, never marked done.

Tune's own SIGINT handler ends ``Tuner.fit`` early and *returns* as if the experiment had finished,
so the caller could not tell an interrupted phase from a finished one, and SIGTERM (what ``kill``
and batch schedulers send) fell to Ray's handler, which aborted the driver. Here both signals are
recorded; inside ``Tuner.fit`` they ask Tune for its graceful stop (Tune's SIGUSR1 handler: one
last experiment snapshot, trials stopped), elsewhere they raise :class:`Interrupted` at once. After
``fit`` returns, :meth:`StopSignals.raise_if_received` turns a recorded signal into
:class:`Interrupted`, so the phase is not recorded as done and ``--resume`` restores it.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator

#: Tune installs its own SIGINT handler in ``fit`` unless this is set; ours must stay in place.
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The sweep was stopped by a signal; what finished is kept and ``--resume`` continues."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """Records SIGINT/SIGTERM for the life of a ``with`` block (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._in_fit = False
        self._deferred = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; nothing to do
        os.environ[TUNE_SIGINT_ENV] = "1"
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        tune_stop = signal.getsignal(signal.SIGUSR1)  # Tune's graceful stop while Tuner.fit runs
        if self._deferred:
            return  # raised when the deferred block ends
        if self._in_fit and first and callable(tune_stop):
            print(f"\n{signal.Signals(signum).name} received: stopping the running trials after Tune's last "
                  f"snapshot (send it again to stop at once)", flush=True)
            tune_stop(signal.SIGUSR1, frame)
            return
        raise Interrupted(signum)

    @contextmanager
    def tune_fit(self) -> Iterator[None]:
        """Around ``Tuner.fit``: a signal asks Tune to stop gracefully; afterwards it is raised."""
        self._in_fit = True
        try:
            yield
        except Exception as err:  # e.g. Ray's processes got the terminal's Ctrl-C too: still a stop
            if self.received is None:
                raise
            raise Interrupted(self.received) from err
        finally:
            self._in_fit = False
        self.raise_if_received()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a signal must not cut in two (writing the sweep's files); it is raised after."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
        self.raise_if_received()

    def raise_if_received(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)
