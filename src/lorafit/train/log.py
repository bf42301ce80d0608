"""What a run tells its user while it trains: console lines, a progress bar, metrics files, trackers.

Only rank 0 makes a `TrainLog`; other ranks get `NullLog`. Every optimizer step goes to
`metrics.jsonl` (one JSON object a line, flushed, so a killed run loses at most a line and a
resumed run can cut it back to its checkpoint) and to TensorBoard under `tb/`; the console
shows every `logging_steps`-th step, as a rich progress bar on a terminal and as plain lines
otherwise (CI logs, `| tee`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorafit.console import attach_log_file
from lorafit.run_dir import write_text_atomic
from lorafit.train.checkpoint import write_failed

log = logging.getLogger("lorafit")

METRICS = "metrics.jsonl"
PREVIEWS = "previews.jsonl"


def setup_console() -> None:
    """Show lorafit's INFO lines on stderr, unless the application (or pytest) configured logging itself."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / METRICS)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):  # the last line of a killed run may be half written
            out.append(json.loads(line))
    return out


def truncate_after(run_dir: Path, step: int) -> None:
    """Drop records past `step` from metrics.jsonl and previews.jsonl (a resumed run writes them again)."""

    for name in (METRICS, PREVIEWS):
        path = Path(run_dir) / name
        if path.is_file():
            keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def memory_gib(device) -> float:
    """Peak memory so far: the GPU's allocator peak on CUDA, else the process's peak RSS."""
    import torch

    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


def reserved_gib(device) -> float | None:
    """Peak memory the CUDA allocator held from the driver (allocated plus cached; CUDA graphs' pools count here)."""
    import torch

    if device is None or device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**30


def steady_tokens_per_s(tlog) -> float | None:
    """Tokens/s of the steps after a process's first, or None with fewer than two steps."""
    seconds = getattr(tlog, "steady_seconds", 0.0)
    return round(tlog.steady_tokens / seconds, 1) if seconds > 0 else None


class TrainLog:
    def __init__(self, run_dir: Path, report_to: list[str], total_steps: int, logging_steps: int, device,
                 config: dict[str, Any] | None = None, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.every = logging_steps
        self.device = device
        self.metrics = open(self.run_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.window: list[dict[str, Any]] = []
        self.steady_tokens = 0
        self.steady_seconds = 0.0
        """Tokens and step time of this process's steps after its first (which compiles and warms up)."""
        self.trackers = _open_trackers(self.run_dir, report_to, config or {}, purge_step)
        attach_log_file(self.run_dir)
        self._hook = _quiet_tracker_threads()
        self.progress = self.task = None
        if sys.stderr.isatty():
            self._open_progress()

    def _open_progress(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total, info="")

    def step(self, rec: dict[str, Any]) -> None:
        """One optimizer step: step, loss, lr, grad_norm, tokens, step_time."""
        if self.first_step is None:
            self.first_step, self.start = rec["step"] - 1, time.perf_counter() - rec["step_time"]
        else:
            self.steady_tokens += rec["tokens"]
            self.steady_seconds += rec["step_time"]
        elapsed = time.perf_counter() - self.start
        done = rec["step"] - self.first_step
        rec = {**rec, "tokens_per_s": rec["tokens"] / max(rec["step_time"], 1e-9), "mem_gib": memory_gib(self.device),
               "eta_s": elapsed / done * (self.total - rec["step"])}
        self._write(rec)
        self.window.append(rec)
        if self.progress is not None:
            self.progress.update(self.task, completed=rec["step"], info=_info(rec))
        if rec["step"] % self.every == 0 or rec["step"] == self.total:
            self._console(rec)
            self.window = []

    @contextmanager
    def phase(self, name: str, total: int | None = None):
        """A stretch of work between steps (validation, saving) shown as its own bar, not as a frozen train bar.
        Yields `advance()`, to call once per unit of `total`."""
        if self.progress is None:
            yield lambda: None
            return
        task = self.progress.add_task(name, total=total, info="")
        try:
            yield lambda: self.progress.advance(task) if self.progress is not None else None
        finally:
            if self.progress is not None:
                self.progress.remove_task(task)

    def _console(self, rec: dict[str, Any]) -> None:
        loss = sum(r["loss"] for r in self.window) / len(self.window)
        tps = sum(r["tokens"] for r in self.window) / max(sum(r["step_time"] for r in self.window), 1e-9)
        reward = f"  reward {sum(r['reward'] for r in self.window) / len(self.window):.4f}" if "reward" in rec else ""
        # The bar shows the last step's loss; this line averages the window: say which is which.
        which = f"loss (avg of last {len(self.window)} steps)" if len(self.window) > 1 else "loss (last step)"
        line = (f"step {rec['step']}/{self.total}  {which} {loss:.4f}{reward}  lr {rec['lr']:.3g}  "
                f"grad_norm {rec['grad_norm']:.3g}  {tps:,.0f} tok/s  mem {rec['mem_gib']:.2f} GiB  "
                f"ETA {_hms(rec['eta_s'])}")
        self.info(line)

    def info(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg, markup=False, highlight=False)
        else:
            log.info(msg)

    def validation(self, step: int, loss: float, n_tokens: int, metrics: dict[str, float] | None = None) -> None:
        """`metrics`: the objective's per-unit means (DPO: accuracy, margin, ...); for those, units are pairs
        and a perplexity means nothing."""
        if metrics:
            self._write({"step": step, "val_loss": loss, "val_units": n_tokens,
                         **{f"val_{k}": v for k, v in metrics.items()}})
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)
            self.info(f"step {step}: validation loss {loss:.4f}, {shown} ({n_tokens:,} held out)")
            return
        ppl = math.exp(min(loss, 50.0))
        self._write({"step": step, "val_loss": loss, "val_ppl": ppl, "val_tokens": n_tokens})
        self.info(f"step {step}: validation loss {loss:.4f}, perplexity {ppl:.2f} ({n_tokens:,} tokens)")

    def preview(self, step: int, prompt: str, text: str, **extra: Any) -> None:
        """One previewed reply; `extra` (GRPO: reward, rewards per function) goes into its previews.jsonl line."""
        with open(self.run_dir / PREVIEWS, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "prompt": prompt, "text": text, **extra}, ensure_ascii=False) + "\n")
        scored = f"  (reward {extra['reward']:.3f})" if "reward" in extra else ""
        self.info(f"step {step} preview{scored}\n  prompt: {prompt[:200]!r}\n  reply:  {text[:400]!r}")

    def _write(self, rec: dict[str, Any]) -> None:
        rec = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in rec.items()}
        try:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
        except OSError as e:
            raise write_failed(self.run_dir, f"{METRICS} in '{self.run_dir}'", e) from None
        for t in list(self.trackers):
            try:
                t.log(rec)
            except OSError as e:  # TensorBoard's writer thread hit the disk (full, or gone)
                raise write_failed(self.run_dir, f"TensorBoard events under '{self.run_dir / 'tb'}'", e) from None
            except Exception as e:  # noqa: BLE001 -- a tracker (wandb, mlflow servers) must not stop training
                log.warning("%s failed (%s: %s); continuing without it", type(t).__name__.strip("_"),
                            type(e).__name__, e)
                self.trackers.remove(t)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        for t in self.trackers:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 -- closing after a full disk: the run's own error says it
                log.warning("%s could not close (%s: %s)", type(t).__name__.strip("_"), type(e).__name__, e)
        self.trackers = []
        self.metrics.close()
        threading.excepthook = self._hook


def _quiet_tracker_threads():
    """Install a threading.excepthook that leaves TensorBoard's writer-thread I/O errors to the main thread,
    which gets the same exception at its next write (and turns it into one message); returns the old hook.

    The writer thread re-raises after storing the error, so Python would print its traceback first."""
    previous = threading.excepthook

    def hook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    threading.excepthook = hook
    return previous


def _info(rec: dict[str, Any]) -> str:
    reward = f"reward {rec['reward']:.3f}  " if "reward" in rec else ""
    return (f"last step loss {rec['loss']:.4f}  {reward}lr {rec['lr']:.2e}  {rec['tokens_per_s']:,.0f} tok/s  "
            f"mem {rec['mem_gib']:.2f} GiB")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class NullLog:
    """What ranks other than 0 log: nothing. It has TrainLog's methods, each doing nothing, and no others
    (a misspelt method fails on every rank, not only on rank 0)."""

    @contextmanager
    def phase(self, name: str, total: int | None = None):
        yield lambda: None


for _name in [n for n in vars(TrainLog) if not n.startswith("_") and callable(getattr(TrainLog, n))
              and n not in vars(NullLog)]:
    setattr(NullLog, _name, lambda self, *args, **kwargs: None)

_NOT_PLOTTED = ("step", "epoch", "tokens", "step_time", "eta_s", "val_tokens")


# -- trackers -----------------------------------------------------------------------------------


class _TensorBoard:
    def __init__(self, run_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote past its checkpoint, so the resumed curve has no doubles
        self.w = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)

    def log(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        for key, value in rec.items():  # loss, lr, ... and whatever an objective logs (GRPO: reward, kl, ...)
            if key in _NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.w.add_scalar(("val/" if key.startswith("val") else "train/") + key, value, step)

    def close(self) -> None:
        self.w.flush()
        self.w.close()


class _Wandb:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project="lorafit", name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({f"{s}.{k}": str(v)[:250] for s, sec in config.items() for k, v in sec.items()})

    def log(self, rec: dict[str, Any]) -> None:
        vals = {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}
        self.mlflow.log_metrics(vals, step=rec["step"])

    def close(self) -> None:
        self.mlflow.end_run()


def _open_trackers(run_dir: Path, report_to: list[str], config: dict[str, Any], purge_step: int | None) -> list:

    out: list = []
    for name in dict.fromkeys(report_to):
        if name == "none":
            continue
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            log.warning("report_to %s: the package is not installed; logging to metrics.jsonl only (pip install %s)",
                        name, name)
            continue
        try:
            out.append({"tensorboard": lambda: _TensorBoard(run_dir, purge_step),
                        "wandb": lambda: _Wandb(run_dir, config), "mlflow": lambda: _MLflow(run_dir, config)}[name]())
        except Exception as e:  # noqa: BLE001 -- a tracker that cannot start (no login, no server) must not stop training
            log.warning("report_to %s could not start (%s: %s); continuing without it", name, type(e).__name__, e)
    return out
