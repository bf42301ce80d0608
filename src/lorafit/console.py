"""Keep the libraries' chatter off the user's screen: their warnings go to the run's log file, their bars nowhere.

Without this every command prints bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community
... pip install kernels" (a CPU fallback that works) and transformers' "Loading weights" bars, which read as
errors and push lorafit's own lines off screen. `--verbose` shows them all as before.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

LIBRARIES = ("bitsandbytes", "transformers", "peft", "accelerate", "datasets", "huggingface_hub", "torch", "gguf")
LOG_FILE = "libraries.log"
_KEEP = 2000
"""Records held until a log file is attached (a command without a run directory drops them beyond this)."""


class _Deferred(logging.Handler):
    """Holds records until `attach` names a file, then writes them (and every later one) there."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        self.held: list[logging.LogRecord] = []
        self.file: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.held) < _KEEP:
            self.held.append(record)

    def attach(self, path: Path) -> None:
        try:
            self.file = logging.FileHandler(path, encoding="utf-8", delay=True)
        except OSError:
            return  # the run's own writes report a full or read-only disk; this log is best effort
        self.file.setFormatter(self.formatter)
        for record in self.held:
            self.file.emit(record)
        self.held = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


_HANDLER: _Deferred | None = None


def quiet_libraries(verbose: bool = False) -> None:
    """Route the libraries' log records away from the console, before any of them is imported.

    Environment variables rather than the libraries' own switches: importing transformers to call
    `disable_progress_bar()` would cost ~2 s on commands that stop at a config error."""
    global _HANDLER
    if verbose or _HANDLER is not None:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' tqdm follows huggingface_hub's switch
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers installs its own stderr handler
    _HANDLER = _Deferred()
    logging.captureWarnings(True)  # torch's and peft's warnings.warn(...) too, through the "py.warnings" logger
    for name in (*LIBRARIES, "py.warnings"):
        logger = logging.getLogger(name)
        logger.addHandler(_HANDLER)
        logger.propagate = False  # not to the root logger, nor to Python's last-resort stderr handler


def attach_log_file(run_dir: Path) -> None:
    """Write the libraries' records (those held so far and the rest) to run_dir/libraries.log."""
    if _HANDLER is not None:
        _HANDLER.attach(Path(run_dir) / LOG_FILE)
