"""`lorafit train`: fine-tune a LoRA (or QLoRA) adapter, top to bottom: load -> setup -> loop -> save.

The loss of one optimizer step is the sum of token cross-entropies over every labelled token of
every micro-batch on every rank, divided by the number of those tokens, so gradient
accumulation and data parallelism give the gradient of one big batch (a per-micro-batch mean
would weight a short micro-batch's tokens more). Each micro-batch contributes
`ce_sum * world_size / n_tokens_global` to the backward pass; DDP's gradient average (or FSDP's
reduce-scatter average, fsdp.py) divides the world_size back out.

Data position: rank r of W reads micro-batches r, r + W, r + 2W, ... of the epoch's global
batch list (`make_batches(..., rank, world_size)`), and optimizer step s of the epoch consumes
global micro-batches [s*G, (s+1)*G) with G = accumulation x W. Checkpoints store the epoch and
the number of global micro-batches consumed, so they resume on any number of ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from lorafit.config.schema import Config
from lorafit.data.batching import make_batches
from lorafit.data.encode import prepare_data
from lorafit.data.records import IGNORE_INDEX
from lorafit.errors import UserError
from lorafit.infer.generate import generate_text
from lorafit.model.load import compute_dtype, describe_model, load_base_model, load_tokenizer, resolve_model
from lorafit.model.lora import apply_lora, parameter_counts
from lorafit.train import checkpoint as ckpt
from lorafit.train import fsdp
from lorafit.train import parallel as dist
from lorafit.train.fast import loss_path
from lorafit.train.fsdp import offload_requested
from lorafit.train.log import NullLog, TrainLog, memory_gib, setup_console, truncate_after
from lorafit.train.memory import find_batch_size, oom_error
from lorafit.train.objectives.sft import LossModule, reference_loss
from lorafit.train.optim import build_optimizer, build_scheduler
from lorafit.train.plan import Position, plan_steps
from lorafit.train.run_files import (
    check_output_dir,
    prepare_output_dir,
    push_adapter,
    save_adapter,
    write_run_files,
    write_summary,
)
from lorafit.train.signals import Interrupted, StopSignals
from lorafit.train.state import Run

log = logging.getLogger("lorafit")


def train(cfg: Config) -> Path:
    """Train an adapter into cfg.train.output_dir and return that directory."""

    d = dist.setup(cpu_collectives=offload_requested())
    try:
        return _train(cfg, d)
    finally:
        dist.cleanup(d)


def _train(cfg: Config, d: dist.Dist) -> Path:

    t0 = time.perf_counter()
    t = cfg.train
    if d.main:
        setup_console()
    run_dir = Path(t.output_dir)
    check_output_dir(cfg, run_dir)
    sharding = fsdp.settings(cfg, d)  # before anything loads: FSDP's config errors come first

    # -- load: tokenizer, then data (its errors come before the model loads), then the model --
    source = _resolve_on_rank0_first(d, lambda: resolve_model(cfg))
    tokenizer = load_tokenizer(cfg, source)
    r = Run(cfg, d, run_dir, tokenizer, prepare_data(cfg, tokenizer), dtype=compute_dtype(cfg), fsdp=sharding)
    r.model = _load_model(r, source)

    # -- setup: batch plan, loss path, wrapping (DDP or FSDP), optimizer, schedule, resume, run files --
    fast, why = loss_path(cfg, r.model, fsdp=r.fsdp is not None)
    r.plan = plan_steps(cfg, r.data, d, find_batch_size(r, LossModule(r.model, None, r.dtype)))
    lines = [f"loss: {'fused kernels' if fast else 'reference PyTorch'} ({why})", *_wrap(r, fast)]
    r.optimizer = build_optimizer(r.model, t)  # after sharding: FSDP replaces the parameters
    r.scheduler = build_scheduler(r.optimizer, t, r.plan.total_steps)
    if t.fp16 and d.device.type == "cuda":
        r.scaler = torch.amp.GradScaler("cuda")  # fp16's 5-bit exponent underflows small gradients unscaled
    prepare_output_dir(r)
    resumed = _maybe_resume(r)
    _open_log(r, resumed, lines)

    # -- loop --
    try:
        with StopSignals() as signals:
            _loop(r, signals)
    finally:
        r.tlog.close()

    # -- save --
    whole = fsdp.adapter_state(r.model, keep=d.main) if r.fsdp else None  # gathered by every rank
    peaks = dist.per_rank(d, memory_gib(d.device))
    if d.main:
        save_adapter(r.model, run_dir, whole)
        write_summary(r, time.perf_counter() - t0, peaks)
    dist.barrier(d)
    if t.push_to_hub and d.main:
        push_adapter(run_dir, t.push_to_hub)
    return run_dir


def _load_model(r: Run, source):
    """The base with LoRA on top, in train mode. Under FSDP each rank loads on its CPU, and fsdp.wrap moves
    only the rank's shard to its device."""
    from transformers import set_seed


    if r.fsdp and r.fsdp.activation_checkpointing:
        r.cfg.model.gradient_checkpointing = True
    set_seed(r.cfg.train.seed)  # LoRA init and dropout
    base = load_base_model(r.cfg, torch.device("cpu") if r.fsdp else r.d.device, source)
    if r.fsdp and r.fsdp.rank0_loads:
        fsdp.sync_from_rank0(base, r.d)
    model = apply_lora(base, r.cfg)
    model.train()
    return model


def _wrap(r: Run, fast) -> list[str]:
    """Set r.ddp: the loss module under DDP (bare on one process), or FSDP's sharded root; returns log lines."""

    if not r.fsdp:
        r.ddp = dist.wrap_ddp(LossModule(r.model, fast, r.dtype), r.d)
        return []
    r.ddp, lines = fsdp.wrap(LossModule(r.model, None, r.dtype), r.model, r.d, r.fsdp, r.dtype)
    if r.cfg.train.preview_steps:
        lines.append("fsdp: previews off (generation would need every rank in step)")
    return lines


def _open_log(r: Run, resumed: bool, lines: list[str]) -> None:
    """Rank 0 writes the run files and logs; the other ranks stay quiet."""

    if not r.d.main:
        r.tlog = NullLog()
        return
    t = r.cfg.train
    write_run_files(r)
    r.tlog = TrainLog(r.run_dir, t.report_to, r.plan.total_steps, t.logging_steps, r.d.device, r.cfg.to_dict(),
                      purge_step=r.pos.step + 1 if resumed else None)
    trainable, total = parameter_counts(r.model)
    r.tlog.info(f"model: {describe_model(r.model.get_base_model())}; LoRA r={r.cfg.lora.lora_r} trains "
                f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    for line in lines:
        r.tlog.info(line)
    r.tlog.info(r.plan.describe(r.d))


def _resolve_on_rank0_first(d: dist.Dist, fn):
    """Rank 0 first, so a first-use conversion (the built-in model) happens once, not once per rank."""
    if d.main:
        out = fn()
    dist.barrier(d)
    return out if d.main else fn()


def _maybe_resume(r: Run) -> bool:
    """Restore the newest good checkpoint when resuming; cut logs back to it either way."""

    found = ckpt.latest_good(r.run_dir) if r.cfg.train.resume else None
    if r.cfg.train.resume and found is None and r.d.main:
        log.warning("no usable checkpoint in %s; starting from step 0", r.run_dir)
    if found is not None:
        path, state = found
        ckpt.restore(path, r.model, r.optimizer, r.scheduler, r.scaler)
        r.pos = Position.from_state(state)
        r.scheduler = build_scheduler(r.optimizer, r.cfg.train, r.plan.total_steps, step=r.pos.step)
        if r.d.main:
            log.info("resuming from %s (step %d, epoch %d)", path, r.pos.step, r.pos.epoch)
            r.plan.check_resume(state, r.d)
    if r.d.main:
        truncate_after(r.run_dir, r.pos.step)
    dist.barrier(r.d)
    return found is not None


def _loop(r: Run, signals: StopSignals) -> None:

    cfg, d, p, pos = r.cfg, r.d, r.plan, r.pos
    delay = float(os.environ.get("LORAFIT_TEST_STEP_DELAY", "0"))  # test hook: room to inject a fault mid-run
    if pos.step == 0 and r.data.val and cfg.train.eval_strategy != "no":
        _validate(r)  # the baseline: the curve starts at the base's own validation loss
    while pos.step < p.total_steps:
        batches = make_batches(r.data.train, p.micro_batch, packing=cfg.data.packing,
                               max_seq_length=cfg.data.max_seq_length, pad_token_id=r.tokenizer.pad_token_id,
                               seed=cfg.train.seed, epoch=pos.epoch, group_by_length=cfg.data.group_by_length,
                               rank=d.rank, world_size=d.world_size)
        start = pos.micro_in_epoch // d.world_size
        for i in range(start, len(batches), p.accumulation):
            group = batches[i: i + p.accumulation]
            _optimizer_step(r, group)
            time.sleep(delay)
            pos.micro_in_epoch += len(group) * d.world_size
            stop = _after_step(r, signals, epoch_end=i + p.accumulation >= len(batches))
            if stop or pos.step >= p.total_steps:
                return
        pos.epoch, pos.micro_in_epoch = pos.epoch + 1, 0


def _optimizer_step(r: Run, group: list[dict[str, torch.Tensor]]) -> None:
    d, t = r.d, r.cfg.train
    started = time.perf_counter()
    counts = [float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group)),
              float(sum(int(b["attention_mask"].sum()) for b in group))]
    n_global, tokens = dist.all_reduce_sum(d, counts)
    autocast = torch.autocast(d.device.type, dtype=r.dtype, enabled=r.dtype != torch.float32)
    ce_total = torch.zeros((), dtype=torch.float64, device=d.device)
    try:
        for j, batch in enumerate(group):
            batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
            sync = j == len(group) - 1 or not d.enabled  # all-reduce gradients once, on the last micro-step
            with dist.grad_sync(r.ddp, sync):
                with autocast:
                    ce_sum, _ = r.ddp(batch)
                loss = ce_sum * (d.world_size / max(n_global, 1.0))
                (r.scaler.scale(loss) if r.scaler else loss).backward()
            ce_total += ce_sum.detach().double()
    except torch.OutOfMemoryError:
        raise oom_error(r) from None
    loss = dist.all_reduce_sum(d, [ce_total.item()])[0] / max(n_global, 1.0)
    if r.scaler:
        r.scaler.unscale_(r.optimizer)
    params = [q for q in r.model.parameters() if q.requires_grad]  # FSDP: sharded, and the norm is global
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf")))
    lr = r.scheduler.get_last_lr()[0]
    # With a GradScaler an overflow is its business (it skips the step and lowers the scale).
    finite = math.isfinite(loss) and (r.scaler is not None or math.isfinite(grad_norm))
    if finite:
        if r.scaler:
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.scheduler.step()
    r.pos.step += 1
    r.pos.tokens += int(tokens)
    r.pos.samples += sum(_samples(b) for b in group) * d.world_size
    rec = {"step": r.pos.step, "epoch": round(r.pos.epoch + r.pos.micro_in_epoch / max(r.plan.epoch_micro, 1), 4),
           "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
           "step_time": time.perf_counter() - started}
    if not finite:
        _non_finite(r, rec)
    r.tlog.step(rec)


def _samples(batch: dict[str, torch.Tensor]) -> int:
    if "doc_ids" in batch:
        return int(batch["doc_ids"].amax(dim=1).sum())
    return int(batch["input_ids"].shape[0])


def _non_finite(r: Run, rec: dict[str, Any]) -> None:
    what = "loss" if not math.isfinite(rec["loss"]) else "gradient norm"
    good = [p.name for p in ckpt.list_checkpoints(r.run_dir)]
    if r.cfg.train.nan_policy == "skip":
        r.pos.skipped += 1
        rec["skipped"] = True
        r.tlog.info(f"step {rec['step']}: non-finite {what} ({rec['loss']}); update skipped (nan_policy skip)")
        return
    r.tlog.close()
    raise UserError(f"non-finite {what} at step {rec['step']} (loss {rec['loss']}, grad norm {rec['grad_norm']}); "
                    f"training stopped. The last good checkpoint stays intact: {good[-1] if good else 'none yet'}",
                    fix="lower learning_rate, keep max_grad_norm > 0, prefer bf16 over fp16, check the data, or "
                        "set --nan_policy skip; then continue with --resume")


def _after_step(r: Run, signals: StopSignals, epoch_end: bool) -> bool:
    """Validation, early stopping, previews, checkpoints and stop signals after a step; True means stop."""
    t, step = r.cfg.train, r.pos.step
    last = step >= r.plan.total_steps
    eval_every = t.eval_steps or max(1, r.plan.total_steps // 10)  # ~10 points on a run of any length
    stop = False
    if r.data.val and ((t.eval_strategy == "steps" and (step % eval_every == 0 or last))
                       or (t.eval_strategy == "epoch" and (epoch_end or last))):
        stop = _validate(r)
    if t.preview_steps and step % t.preview_steps == 0 and r.d.main and not r.fsdp:
        _previews(r)
    if (t.save_strategy == "steps" and step % t.save_steps == 0) or (t.save_strategy == "epoch" and epoch_end):
        _save_checkpoint(r)
    if dist.any_rank(r.d, signals.signum is not None):
        path = _save_checkpoint(r)
        raise Interrupted(signals.signum or signal.SIGTERM, step, path)  # ranks the signal missed
    return stop


def _validate(r: Run) -> bool:
    """Validation loss over all ranks' shards (sums all-reduced); True when early stopping says stop."""

    cfg, d = r.cfg, r.d
    if r.val_batches is None:
        shard = r.data.val[d.rank:: d.world_size]  # disjoint shards: no example counted twice
        r.val_batches = make_batches(shard, cfg.train.per_device_eval_batch_size, packing=cfg.data.packing,
                                     max_seq_length=cfg.data.max_seq_length, pad_token_id=r.tokenizer.pad_token_id,
                                     seed=cfg.train.seed, epoch=0, shuffle=False) if shard else []
    # FSDP: through the sharded root, whose forward gathers the embeddings and head; it runs the reference loss
    loss_fn = r.ddp if r.fsdp else (lambda b: reference_loss(r.model, b, r.dtype))
    r.model.eval()
    ce, n = 0.0, 0.0
    with torch.no_grad(), torch.autocast(d.device.type, dtype=r.dtype, enabled=r.dtype != torch.float32):
        for batch in r.val_batches:
            s, k = loss_fn({k: v.to(d.device) for k, v in batch.items()})
            ce, n = ce + float(s), n + float(k)
    r.model.train()
    ce, n = dist.all_reduce_sum(d, [ce, n])
    loss = ce / max(n, 1.0)
    r.tlog.validation(r.pos.step, loss, int(n))
    return r.pos.record_validation(loss, cfg.train.early_stopping_patience, r.tlog)


def _previews(r: Run) -> None:
    """Greedy answers to the preview prompts, to the console and previews.jsonl."""

    gen = dataclasses.replace(r.cfg.generate, temperature=0.0)
    r.model.eval()
    try:
        for messages in _preview_messages(r):
            result = generate_text(r.model, r.tokenizer, r.data.template, messages, gen, seed=r.cfg.train.seed)
            r.tlog.preview(r.pos.step, messages[-1]["content"], result.text)
    finally:
        r.model.train()


def _preview_messages(r: Run) -> list[list[dict]]:
    if r.cfg.train.preview_prompts:
        return [[{"role": "user", "content": p}] for p in r.cfg.train.preview_prompts]
    pool = r.data.val or r.data.train  # default: the first two held-out prompts
    out = []
    for ex in pool[:2]:
        msgs = list(ex.messages)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if msgs:
            out.append(msgs)
    return out


def _save_checkpoint(r: Run) -> Path:
    """Rank 0 writes; every rank learns whether it worked, so all stop together on a failed write."""

    path = error = None
    whole = None  # FSDP: the adapter and optimizer state, gathered whole by every rank, kept by rank 0
    if r.fsdp:
        whole = fsdp.adapter_state(r.model, r.d.main), fsdp.optimizer_state(r.optimizer, r.d.main)
    if r.d.main:
        try:
            path = ckpt.save_checkpoint(r.run_dir, r.model, r.optimizer, r.scheduler, r.scaler,
                                        r.pos.to_state(r.plan, r.d), r.cfg.train.save_total_limit, whole)
            r.tlog.info(f"step {r.pos.step}: checkpoint saved to {path}")
        except UserError as e:
            error = e
    path, message = dist.broadcast(r.d, (path, str(error) if error else None))
    if message is not None:
        r.tlog.close()
        raise error or UserError(message)
    return path
