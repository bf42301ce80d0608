"""The pieces of `train()` that are not the loop: step plan, data position, run directory, signals, OOM,
the closing summary and the hub upload. train.py reads top to bottom because these live here.
"""
from __future__ import annotations

import copy
import math
import shutil
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorafit import checkpoint as ckpt
from lorafit import distributed as dist
from lorafit.errors import UserError
from lorafit.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DATA_FILE, has_adapter, write_json_atomic

if TYPE_CHECKING:
    from lorafit.config import Config
    from lorafit.train import Run

import logging

log = logging.getLogger("lorafit")
SUMMARY_FILE = "train_summary.json"
_RUN_FILES = ("metrics.jsonl", "previews.jsonl", "loss.png", SUMMARY_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md")


# -- how many steps, in what batches ------------------------------------------------------------

@dataclass
class Plan:
    micro_batch: int
    accumulation: int
    world_size: int
    epoch_micro: int
    """Micro-batches in one epoch's global batch list (all ranks together)."""
    steps_per_epoch: int
    total_steps: int
    n_train: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    def describe(self, d: dist.Dist) -> str:
        return (f"batch: {self.micro_batch} per device x {self.accumulation} accumulation x {self.world_size} "
                f"process{'es' if self.world_size > 1 else ''} = {self.global_batch} sequences per optimizer step; "
                f"{self.n_train:,} training examples -> {self.steps_per_epoch:,} steps per epoch, "
                f"{self.total_steps:,} steps")

    def check_resume(self, state: dict[str, Any], d: dist.Dist) -> None:
        if state.get("total_steps", self.total_steps) != self.total_steps:
            log.info("the checkpoint's run planned %s steps, this one %s: the learning rate follows the %s-step "
                     "schedule from step %s on, as a straight %s-step run's would", state["total_steps"],
                     self.total_steps, self.total_steps, state.get("step", 0) + 1, self.total_steps)
        old = state.get("global_batch")
        if old and old != self.global_batch:
            log.warning("the checkpoint was trained with %s sequences per step, this run uses %s; "
                        "resuming at the same data position, but the loss curve will differ", old, self.global_batch)
        if state.get("micro_in_epoch", 0) % d.world_size:
            log.warning("the checkpoint's data position is not a multiple of %d ranks; "
                        "up to %d micro-batches are repeated", d.world_size, d.world_size - 1)


def plan_steps(cfg: Config, data, d: dist.Dist, micro_batch: int) -> Plan:
    """Steps per epoch and in all, counted from the batch plan (padding and packing included)."""
    from lorafit.data import plan_batches

    t = cfg.train
    # auto_find_batch_size may shrink the micro-batch; accumulation grows so the global batch stays put
    accumulation = t.gradient_accumulation_steps * max(1, t.per_device_train_batch_size // micro_batch)
    lengths = [len(e.input_ids) for e in data.train]
    n_micro = len(plan_batches(lengths, micro_batch, packing=cfg.data.packing, max_seq_length=cfg.data.max_seq_length,
                               seed=t.seed, epoch=0, group_by_length=cfg.data.group_by_length))
    per_rank = math.ceil(n_micro / d.world_size)
    steps_per_epoch = max(1, math.ceil(per_rank / accumulation))
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    return Plan(micro_batch, accumulation, d.world_size, n_micro, steps_per_epoch, total, len(data.train))


# -- where the run is ---------------------------------------------------------------------------

@dataclass
class Position:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    micro_in_epoch: int = 0
    """Global micro-batches of this epoch consumed (all ranks together)."""
    samples: int = 0
    tokens: int = 0
    best_val: float | None = None
    bad_evals: int = 0
    """Validations in a row without a new best (early stopping)."""
    skipped: int = 0

    def to_state(self, plan: Plan, d: dist.Dist) -> dict[str, Any]:
        return {**asdict(self), "world_size": d.world_size, "micro_batch": plan.micro_batch,
                "accumulation": plan.accumulation, "global_batch": plan.global_batch, "total_steps": plan.total_steps}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Position:
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})

    def record_validation(self, loss: float, patience: int | None, tlog) -> bool:
        if self.best_val is None or loss < self.best_val:
            self.best_val, self.bad_evals = loss, 0
            return False
        self.bad_evals += 1
        if patience and self.bad_evals >= patience:
            tlog.info(f"early stopping: validation loss has not improved on {self.best_val:.4f} "
                      f"for {self.bad_evals} validations")
            return True
        return False


# -- the run directory --------------------------------------------------------------------------

def check_output_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to train over a finished or unfinished run unless told to overwrite or resume it."""
    t = cfg.train
    if not run_dir.exists() or t.overwrite_output_dir:
        return
    finished, checkpoints = has_adapter(run_dir), ckpt.list_checkpoints(run_dir)
    if t.resume:
        if finished and not checkpoints:
            raise UserError(f"'{run_dir}' holds a finished run and no checkpoint: nothing to resume",
                            fix="pass --overwrite_output_dir true to train it again, or choose another --output_dir")
        return
    if finished:
        raise UserError(f"'{run_dir}' already holds a trained adapter",
                        fix="pass --overwrite_output_dir true to replace it, --resume to continue it, "
                            "or choose another --output_dir")
    if checkpoints:
        raise UserError(f"'{run_dir}' holds checkpoints of an unfinished run ({checkpoints[-1].name})",
                        fix="add --resume to continue it, or --overwrite_output_dir true to start over")


def prepare_output_dir(r: Run) -> None:
    """Clear an overwritten run, drop partial checkpoints, check free space; rank 0 only."""
    from lorafit.lora import parameter_counts
    from lorafit.optim import optimizer_state_bytes

    t = r.cfg.train
    if r.d.main:
        if t.overwrite_output_dir and not t.resume and r.run_dir.exists():
            shutil.rmtree(r.run_dir / ckpt.CHECKPOINTS, ignore_errors=True)
            shutil.rmtree(r.run_dir / "tb", ignore_errors=True)
            for name in _RUN_FILES:
                (r.run_dir / name).unlink(missing_ok=True)
        ckpt.clean_partial(r.run_dir)
        trainable, _ = parameter_counts(r.model)
        adapter = trainable * 4 + 64 * 1024
        kept = 0
        if t.save_strategy != "no":
            saves = r.plan.total_steps // t.save_steps if t.save_strategy == "steps" else \
                math.ceil(r.plan.total_steps / r.plan.steps_per_epoch)
            kept = min(saves, t.save_total_limit or saves) + 1  # +1: a new one is whole before the oldest goes
        need = kept * (adapter + optimizer_state_bytes(trainable, t.optim)) + 2 * adapter + 16 * 2**20
        ckpt.check_disk_space(r.run_dir, need)
        r.run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier(r.d)


def write_run_files(r: Run) -> None:
    """config.yaml, template.json, versions.json, data.json: what eval/chat/merge and resume read back."""
    import json

    from lorafit.rundir import VERSIONS_FILE, package_versions, save_config

    old = r.run_dir / DATA_FILE
    if r.cfg.train.resume and old.is_file():
        before = json.loads(old.read_text(encoding="utf-8")).get("fingerprint")
        if before and before != r.data.fingerprint:
            log.warning("the data differ from the checkpoint's run (fingerprint %s.. vs %s..); resuming anyway",
                        before[:12], r.data.fingerprint[:12])
    saved = copy.deepcopy(r.cfg)
    saved.train.resume = saved.train.overwrite_output_dir = False  # how this run was set up, not how it was started
    save_config(r.run_dir, saved)
    r.data.template.save(r.run_dir)
    write_json_atomic(r.run_dir / VERSIONS_FILE, package_versions())
    write_json_atomic(old, {"fingerprint": r.data.fingerprint, "report": r.data.report})


def save_adapter(model, run_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The final adapter at the top of run_dir in PEFT's format; written aside, then renamed into place.
    `state`: the trainable tensors gathered whole (FSDP), instead of the model's own."""
    tmp = run_dir / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state} if state else {}))
        for name in sorted(p.name for p in tmp.iterdir()):  # adapter_config.json last: its presence means done
            if name != ADAPTER_CONFIG:
                (tmp / name).replace(run_dir / name)
        (tmp / ADAPTER_CONFIG).replace(run_dir / ADAPTER_CONFIG)
    except OSError as e:
        raise UserError(f"could not write the adapter to '{run_dir}': {e}",
                        fix="free disk space, then run the same command with --resume") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_summary(r: Run, seconds: float, peaks: list[float] | None = None) -> None:
    from lorafit.lora import parameter_counts
    from lorafit.plots import plot_loss
    from lorafit.trainlog import memory_gib

    trainable, total = parameter_counts(r.model)
    summary = {"steps": r.pos.step, "epochs": round(r.pos.epoch + r.pos.micro_in_epoch / max(r.plan.epoch_micro, 1), 3),
               "trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1),
               "peak_memory_gib": round(memory_gib(r.d.device), 3), "seconds": round(seconds, 1),
               "tokens": r.pos.tokens, "tokens_per_s": round(r.pos.tokens / max(seconds, 1e-9), 1),
               "best_val_loss": r.pos.best_val, "skipped_steps": r.pos.skipped, "world_size": r.d.world_size,
               "fsdp": r.fsdp is not None, "peak_memory_gib_per_rank": [round(x, 3) for x in peaks or []]}
    write_json_atomic(r.run_dir / SUMMARY_FILE, summary)
    try:
        plot_loss(r.run_dir)
    except Exception as e:  # noqa: BLE001 -- a plot must never cost a finished run
        log.warning("could not draw loss.png: %s", e)
    mem = "GPU" if r.d.device.type == "cuda" else "process RSS"
    if peaks and len(peaks) > 1:
        log.info("peak memory per rank (%s): %s GiB", mem, ", ".join(f"{x:.2f}" for x in peaks))
    log.info("done: %d steps in %.0f s, %s tokens (%.0f tok/s); trainable parameters %s of %s (%.3f%%); "
             "peak memory %.2f GiB (%s); best validation loss %s\nadapter: %s",
             r.pos.step, seconds, f"{r.pos.tokens:,}", summary["tokens_per_s"], f"{trainable:,}", f"{total:,}",
             100 * summary["trainable_share"], summary["peak_memory_gib"], mem,
             "n/a" if r.pos.best_val is None else f"{r.pos.best_val:.4f}", r.run_dir)


def push_adapter(run_dir: Path, repo: str) -> None:
    """Upload the saved adapter; any failure is reported after the fact, the local copy is already whole."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from HF_TOKEN or the login cache; it is never logged or stored by us
        api.create_repo(repo, exist_ok=True, private=True)
        api.upload_folder(repo_id=repo, folder_path=str(run_dir),
                          allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "template.json"])
    except Exception as e:  # noqa: BLE001 -- offline, no token, no permission, hub down: all the same to the user
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"the adapter is saved in '{run_dir}', but uploading it to the hub repo '{repo}' failed: "
                        f"{type(e).__name__}: {first}",
                        fix="check the network and your token (HF_TOKEN or `hf auth login`), then upload the folder "
                            f"with `hf upload {repo} {run_dir}`") from None
    log.info("adapter uploaded to https://huggingface.co/%s", repo)


# -- speed and memory ---------------------------------------------------------------------------

def loss_path(cfg: Config, model, fsdp: bool = False) -> tuple[Any, str]:
    """(FastLoss or None, why): fused kernels only when asked (on) or auto on a CUDA GPU they support."""
    mode = cfg.model.fast_kernels
    if mode == "off":
        return None, "fast_kernels off"
    if fsdp:
        return None, f"fast_kernels {mode} overridden: the fused kernels read whole base weights, which FSDP shards"
    if mode == "auto" and not torch.cuda.is_available():
        return None, "no CUDA GPU, so fast_kernels auto uses the reference path"
    try:
        from lorafit import fast
    except ImportError:
        return None, "lorafit.fast is not available in this build"
    ok, reason = fast.fast_forward_supported(model)
    if not ok:
        return None, f"fused kernels do not support this model: {reason}"
    fn = fast.enable_fast_path(model, gradient_checkpointing=cfg.model.gradient_checkpointing)
    return fn, "fused LoRA kernels"


def oom_error(r: Run) -> UserError:
    c = r.cfg
    shape = f"micro-batch {r.plan.micro_batch if r.plan else c.train.per_device_train_batch_size}, " \
            f"max_seq_length {c.data.max_seq_length}, gradient_checkpointing {c.model.gradient_checkpointing}, " \
            f"load_in_4bit {c.model.load_in_4bit}, packing {c.data.packing}"
    return UserError(f"out of GPU memory at step {r.pos.step + 1} (this run uses {shape})",
                     fix="lower --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the batch), "
                         "lower --max_seq_length, turn on --gradient_checkpointing, load the base with --load_in_4bit,"
                         " or let --auto_find_batch_size pick the micro-batch")


def find_batch_size(r: Run, loss_module) -> int:
    """The largest micro-batch (halving from the configured one) whose widest batch survives forward+backward."""
    from lorafit.data import make_batches

    c = r.cfg
    micro = c.train.per_device_train_batch_size
    if not c.train.auto_find_batch_size:
        return micro
    rng = torch.get_rng_state()  # the probe's dropout must not shift the run's random stream
    while True:
        batches = make_batches(r.data.train, micro, packing=c.data.packing, max_seq_length=c.data.max_seq_length,
                               pad_token_id=r.tokenizer.pad_token_id, seed=c.train.seed, epoch=0)
        widest = max(batches, key=lambda b: b["input_ids"].numel())
        try:
            with torch.autocast(r.d.device.type, dtype=r.dtype, enabled=r.dtype != torch.float32):
                ce, n = loss_module({k: v.to(r.d.device) for k, v in widest.items()})
            (ce / n.clamp(min=1)).backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        r.model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        fits = not dist.any_rank(r.d, not fits)
        if fits:
            break
        if micro == 1:
            r.plan = None
            raise oom_error(r)
        log.info("auto_find_batch_size: micro-batch %d does not fit; trying %d", micro, micro // 2)
        micro //= 2
    torch.set_rng_state(rng)
    if micro != c.train.per_device_train_batch_size:
        log.info("auto_find_batch_size: micro-batch %d (accumulation raised to keep the global batch)", micro)
    return micro


# -- stopping on request ------------------------------------------------------------------------

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
