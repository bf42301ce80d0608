"""Stopping on request: the first SIGINT/SIGTERM saves a checkpoint after the step, a second stops at once."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from lorafit.errors import UserError

log = logging.getLogger("lorafit")


class Interrupted(UserError):
    """SIGINT/SIGTERM: a checkpoint was saved; exit code 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int, step: int, path: Path | None):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint saved to {path}",
                         fix="run the same command with --resume to continue")
        self.exit_code = 128 + signum


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step; a second one stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: saving a checkpoint after this step (send it again to stop now)",
                    signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:  # noqa: PYI034
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
