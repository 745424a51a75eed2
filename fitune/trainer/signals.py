"""Ctrl-C and SIGTERM during a run: inside the steps, stop after the current one with a checkpoint."""

from __future__ import annotations

import signal
import threading

from fitune.errors import RunInterrupted


class Signals:
    """SIGINT and SIGTERM while training: inside the steps, stop after the current one (``pending``);
    elsewhere, or at a second signal, at once. Installed from the main thread only (Python's rule)."""

    def __init__(self, echo):
        self.echo = echo
        self.pending: str | None = None
        self.deferring = False
        self.previous: dict = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.pending is None:
            self.pending = name
            self.echo(f"  {name}: stopping after this step with a checkpoint (send it again to stop at once)")
            return
        raise RunInterrupted(name, "")
