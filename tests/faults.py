"""Run `lorafit` with faults made injectable from outside, for the kill -9 / signal tests (not a test module).

    python tests/faults.py [--step-delay SECONDS] [--slow-save STEP:SECONDS] train --output_dir ... ...

--step-delay sleeps after every optimizer step (room to send a signal mid-run); --slow-save sleeps inside the
checkpoint write of STEP, after the adapter and before optimizer.pt (room to kill a half-written checkpoint).
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

from lorafit.train import checkpoint, loop


def delay_steps(seconds: float) -> None:
    step = loop._optimizer_step

    @functools.wraps(step)
    def slow_step(*args, **kwargs):
        step(*args, **kwargs)
        time.sleep(seconds)

    loop._optimizer_step = slow_step


def slow_save(at_step: int, seconds: float) -> None:
    save = checkpoint._torch_save

    @functools.wraps(save)
    def slow(obj, path: Path):
        if path.name == "optimizer.pt" and path.parent.name == f".tmp-step-{at_step:06d}":
            time.sleep(seconds)
        return save(obj, path)

    checkpoint._torch_save = slow


def main(argv: list[str]) -> int:
    from lorafit.cli import main as lorafit_main

    while argv and argv[0] in ("--step-delay", "--slow-save"):
        flag, value, argv = argv[0], argv[1], argv[2:]
        if flag == "--step-delay":
            delay_steps(float(value))
        else:
            at, secs = value.split(":")
            slow_save(int(at), float(secs))
    return lorafit_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
