"""Resumable checkpoints: written atomically, verified by checksum, restored exactly.

    checkpoints/step-000200/
      adapter_model.safetensors, adapter_config.json   the adapter (PEFT's format, loadable as is)
      optimizer.pt        optimizer, lr schedule and loss-scaler state (loaded with weights_only=True)
      rng.pt              Python and torch (CPU, CUDA) generator states
      trainer_state.json  step, epoch and data position, early-stopping state
      manifest.json       size and sha256 of every file above; written last

A checkpoint is written into `checkpoints/.tmp-step-000200/` and renamed into place when
whole, so a crash mid-write leaves a `.tmp-*` folder that is never read (and is cleaned on
the next start), never a half-written `step-*`. A `step-*` whose manifest is missing or
whose files do not match it is skipped, with a message, for the previous good one.

Data position is stored in units that do not depend on the number of processes: the
optimizer step, the epoch, and the micro-batches of the epoch's *global* batch list consumed
(see train.py: rank r of W reads global micro-batches r, r + W, ...), so a run saved with N
ranks resumes with M. Tensors are stored whole even when FSDP trained them sharded (fsdp.py), in
the layout one process writes, so a checkpoint moves between FSDP, DDP and one process.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lorafit.errors import UserError
from lorafit.parsing import json_loads
from lorafit.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_json_atomic
from lorafit.train.fsdp import load_adapter_state, shard_optimizer_state

log = logging.getLogger("lorafit")

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (not yet verified)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def clean_partial(run_dir: Path) -> None:
    """Remove folders left by a save or prune that a crash interrupted."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            log.warning("removing %s, left by an interrupted checkpoint write", p)
            shutil.rmtree(p, ignore_errors=True)


# -- saving -------------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, model, optimizer, scheduler, scaler, state: dict[str, Any],
                    limit: int | None, whole: tuple[dict, dict] | None = None) -> Path:
    """Write one checkpoint atomically, then prune to `limit`. ENOSPC and friends become a UserError
    that names the earlier checkpoints, which stay whole. `whole`: (adapter tensors, optimizer state
    dict) already gathered from FSDP's shards (fsdp.py), written instead of the model's and optimizer's own."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": whole[0]} if whole else {}))
        _torch_save({"optimizer": whole[1] if whole else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        _torch_save(rng_state(), tmp / "rng.pt")
        write_json_atomic(tmp / STATE, state)
        write_json_atomic(tmp / MANIFEST, _manifest(tmp))
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step after resuming from an earlier one
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(run_dir, f"checkpoint {final}", e) from None
    if limit is not None:
        for old in list_checkpoints(run_dir)[:-limit]:
            _discard(old)
    return final


def write_failed(run_dir: Path, what: str, e: BaseException) -> UserError:
    """The one message for a write that failed (a full disk above all), naming the checkpoints that stay whole.
    safetensors and torch report ENOSPC in their own types, so the words are checked as well as errno."""
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "os error 28" in str(e) \
        or "file write failed" in str(e)
    why = "no space left on the device" if full else f"{type(e).__name__}: {str(e).strip()[:300]}"
    good = [p.name for p in list_checkpoints(run_dir)]
    return UserError(f"could not write {what}: {why}. Earlier checkpoints are untouched: {', '.join(good) or 'none'}",
                     fix="free disk space (or lower save_total_limit, or use another output_dir), "
                         "then run the same command with --resume")


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _discard(path: Path) -> None:
    """Rename first, so a crash mid-delete never leaves a half-deleted `step-*` that looks real."""
    trash = path.with_name(f".trash-{path.name}-{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, Any]:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format": 1, "files": files}


# -- loading ------------------------------------------------------------------------------------

def verify(path: Path) -> str | None:
    """None when the checkpoint is whole, else why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    for required in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "optimizer.pt", "rng.pt", STATE):
        if required not in files:
            return f"{required} is not in the manifest"
    for fname, meta in files.items():
        p = path / fname
        if not p.is_file():
            return f"{fname} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{fname} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(p) != meta["sha256"]:
            return f"{fname} does not match its checksum"
    return None


def latest_good(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies and loads, and its trainer state; broken ones are reported and skipped.

    A matching manifest proves only that the files are the ones written; a hand-edited trainer state or an
    optimizer.pt that is not a torch file would still fail mid-restore, so each is read here first."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            try:
                return path, read_checkpoint(path)[0]
            except DamagedCheckpoint as e:
                problem = str(e)
        log.warning("checkpoint %s is damaged (%s); trying the previous one", path, problem)
    return None


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read back into the types training needs."""


# Every field training reads from trainer_state.json, with its type (best_val: a float or null).
_STATE_TYPES = {"step": int, "epoch": int, "micro_in_epoch": int, "samples": int, "tokens": int, "bad_evals": int,
                "skipped": int, "best_val": (int, float, type(None))}


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(trainer state, optimizer file, rng file) of a checkpoint, each checked; DamagedCheckpoint says what is wrong.

    torch.load runs with weights_only=True: a checkpoint is data, and a pickle that needs more is refused."""
    try:
        state = json_loads((path / STATE).read_bytes())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{STATE} is not readable JSON: {e}") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{STATE} holds a {type(state).__name__}, not an object")
    for key, types in _STATE_TYPES.items():
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, types) or (isinstance(value, int) and value < 0):
            raise DamagedCheckpoint(f"{STATE} has {key} = {value!r}")
    files = []
    for name, keys in (("optimizer.pt", ("optimizer", "scheduler")), ("rng.pt", ("python", "torch", "numpy"))):
        try:
            obj = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, EOFError ... per damage
            raise DamagedCheckpoint(f"{name} is not a torch file lorafit wrote ({type(e).__name__}: "
                                    f"{str(e).strip().split('. ')[0][:120]})") from None
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise DamagedCheckpoint(f"{name} does not hold {', '.join(keys)}")
        files.append(obj)
    return state, files[0], files[1]


def restore(path: Path, model, optimizer, scheduler, scaler) -> None:
    """Load adapter weights, optimizer/schedule/scaler state and RNG states from a verified checkpoint.
    Checkpoints hold whole tensors however they were trained; under FSDP each rank keeps its shard."""
    from safetensors.torch import load_file

    fix = "resume with the same model and LoRA settings (lora_r, lora_alpha, target_modules) and optim"
    try:
        _, opt, rng = read_checkpoint(path)
        weights = load_file(str(path / ADAPTER_WEIGHTS), device="cpu")
    except (DamagedCheckpoint, OSError) as e:
        raise UserError(f"checkpoint {path} is damaged: {e}",
                        fix="move it aside; --resume then starts from the one before it") from None
    try:
        unexpected = load_adapter_state(model, weights)
    except RuntimeError as e:  # "size mismatch for ...lora_A.weight": another rank or model
        raise UserError(f"checkpoint {path} does not fit this model: {str(e).strip().splitlines()[-1][:300]}",
                        fix=fix) from None
    if unexpected:
        raise UserError(f"checkpoint {path} does not fit this model ({len(unexpected)} unknown tensors, "
                        f"e.g. {unexpected[0]})", fix=fix)
    try:
        optimizer.load_state_dict(opt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path} has optimizer state for other parameters: {e}", fix=fix) from None
    shard_optimizer_state(optimizer)
    scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt.get("scaler"):
        scaler.load_state_dict(opt["scaler"])
    set_rng_state(rng)


def rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(s: dict[str, Any]) -> None:
    import numpy as np

    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- disk ---------------------------------------------------------------------------------------

def check_disk_space(run_dir: Path, need_bytes: int) -> None:
    """Refuse to start when the run's own writes (checkpoints kept, final adapter, logs) cannot fit."""
    probe = Path(run_dir).resolve()
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    if usage.total == 0 or not os.access(probe, os.W_OK):  # /proc, /sys: virtual, nothing can be written there
        why = "is on a virtual filesystem that holds no files" if usage.total == 0 else "is not writable"
        raise UserError(f"output_dir '{run_dir}' {why} ('{probe}')", fix="pick an output_dir on a real disk you own")
    free = usage.free
    if free < need_bytes:
        raise UserError(f"not enough disk space for this run in '{run_dir}': it will write about "
                        f"{need_bytes / 2**20:.1f} MiB, and {free / 2**20:.1f} MiB are free",
                        fix="free space, lower save_total_limit, or pick another output_dir")
