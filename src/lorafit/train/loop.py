"""`lorafit train`: fine-tune a LoRA (or QLoRA) adapter, top to bottom: load -> setup -> loop -> save.

A step is its records (data/batching.py): `per_device_train_batch_size x gradient_accumulation_steps x ranks`
items of the epoch's list, each rank computing its share in padding-free passes of up to
`plan.tokens_per_pass` tokens. The loss of one optimizer step is the sum of token cross-entropies over every
labelled token of every pass on every rank, divided by the number of those tokens (counted on the host before
any pass runs), so how the step is cut into passes and ranks does not change the gradient. Each pass
contributes `ce_sum * world_size / n_tokens_global` to the backward pass; DDP's gradient average (or FSDP's
reduce-scatter average, fsdp.py) divides the world_size back out.

Host syncs: none inside a pass on the fused path (its segment plan and label positions are computed on the
CPU batch); the step's loss sums stay on the device and are read back once, with the gradient norm, at the
step's end (the non-finite check needs both before the optimizer steps).

Data position: checkpoints store the epoch and the items of it consumed; the epoch's step list depends on
the global batch only, so they resume on any number of ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from lorafit.config.schema import Config
from lorafit.data.batching import Pass, epoch_steps, make_passes, step_passes
from lorafit.data.pipeline import prepare_data
from lorafit.data.records import last_reply
from lorafit.errors import UserError
from lorafit.infer.generate import generate_text
from lorafit.model.arch import fused_path_choice
from lorafit.model.load import compute_dtype, describe_model, load_base_model, load_tokenizer, resolve_model
from lorafit.model.lora import apply_lora, parameter_counts
from lorafit.train import checkpoint as ckpt
from lorafit.train import fsdp
from lorafit.train import parallel as dist
from lorafit.train.fast import check_fp8, loss_path
from lorafit.train.fsdp import offload_requested, one_process_group
from lorafit.train.graphs import PassGraphs, graph_choice
from lorafit.train.log import NullLog, TrainLog, memory_gib, setup_console, truncate_after
from lorafit.train.memory import find_pass_budget, measured_budget, oom_error, pass_budget
from lorafit.train.objectives import build_objective
from lorafit.train.objectives.base import LossModule
from lorafit.train.optim import build_optimizer, build_scheduler
from lorafit.train.plan import Position, plan_steps
from lorafit.train.run_files import (
    check_output_dir,
    prepare_output_dir,
    push_adapter,
    save_adapter,
    save_run_config,
    write_run_files,
    write_summary,
)
from lorafit.train.signals import Interrupted, StopSignals
from lorafit.train.state import TrainState

log = logging.getLogger("lorafit")


def train(cfg: Config) -> Path:
    """Train an adapter into cfg.train.output_dir and return that directory."""

    d = dist.setup(cpu_collectives=offload_requested(cfg), group_of_one=one_process_group(cfg))
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
    data = prepare_data(cfg, tokenizer)
    r = TrainState(cfg, d, run_dir, tokenizer, data, build_objective(cfg), dtype=compute_dtype(cfg), fsdp=sharding)
    r.model = _load_model(r, source)

    # -- setup: batch plan, loss path, wrapping (DDP or FSDP), optimizer, schedule, resume, run files --
    fast, why = loss_path(r.model, r.fused, r.fused_why, cfg.model.gradient_checkpointing,
                          offload_activations=cfg.model.offload_activations, fp8_base=cfg.model.fp8_base)
    if cfg.model.fp8_base != "off":
        check_fp8(fast is not None, why, d.device)
    budget = find_pass_budget(r, LossModule(r.model, r.objective, fast, r.dtype), pass_budget(r, fast is not None))
    r.plan = plan_steps(cfg, r.data, d, budget)
    r.fast = fast
    lines = [f"loss: {'fused kernels' if fast else 'reference PyTorch'} ({why})", *_wrap(r, fast)]
    r.optimizer = build_optimizer(r.model, t)  # after sharding: FSDP replaces the parameters
    r.scheduler = build_scheduler(r.optimizer, t, r.plan.total_steps)
    if t.fp16 and d.device.type == "cuda":
        r.scaler = torch.amp.GradScaler("cuda")  # fp16's 5-bit exponent underflows small gradients unscaled
    graphed, why = graph_choice(cfg, fast, r.objective, d)
    if graphed:
        r.graphs = PassGraphs(fast, [q for q in r.model.parameters() if q.requires_grad], cfg.data.max_seq_length,
                              r.dtype, d.device, r.scaler)
    if fast is not None:
        lines.append(f"cuda graphs: {why}")
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


def _load_model(r: TrainState, source):
    """The base with LoRA on top, in train mode. Under FSDP, fsdp.load_base says where each rank loads it, and
    fsdp.wrap keeps only the rank's shard on its device."""
    from transformers import set_seed  # heavy: transformers loads on first use

    if r.fsdp and r.fsdp.activation_checkpointing:
        r.cfg.model.gradient_checkpointing = True
    set_seed(r.cfg.train.seed)  # LoRA init and dropout
    base = fsdp.load_base(r.cfg, r.d, r.fsdp, r.dtype, source) if r.fsdp else load_base_model(r.cfg, r.d.device, source)
    r.fused, r.fused_why = fused_path_choice(r.cfg, base.config.model_type, fsdp=r.fsdp is not None,
                                             cuda=r.d.device.type == "cuda")
    model = apply_lora(base, r.cfg, fused=r.fused)
    model.train()
    return model


def _wrap(r: TrainState, fast) -> list[str]:
    """Set r.ddp: the loss module under DDP (bare on one process), or FSDP's sharded root; returns log lines."""

    if not r.fsdp:
        r.ddp = dist.wrap_ddp(LossModule(r.model, r.objective, fast, r.dtype), r.d)
        return []
    r.ddp, lines = fsdp.wrap(LossModule(r.model, r.objective, None, r.dtype), r.model, r.d, r.fsdp, r.dtype)
    if r.cfg.train.preview_steps:
        lines.append("fsdp: previews off (generation would need every rank in step)")
    return lines


def _open_log(r: TrainState, resumed: bool, lines: list[str]) -> None:
    """Rank 0 writes the run files and logs; the other ranks stay quiet."""

    if not r.d.main:
        r.tlog = NullLog()
        return
    t = r.cfg.train
    write_run_files(r, resumed)
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


def _maybe_resume(r: TrainState) -> bool:
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


def _loop(r: TrainState, signals: StopSignals) -> None:

    cfg, d, p, pos = r.cfg, r.d, r.plan, r.pos
    lengths = [r.objective.pass_tokens(e, cfg.data.max_seq_length) for e in r.data.train]
    clip = max(lengths, default=1)  # pass_tokens has applied max_seq_length already
    if pos.step == 0 and r.data.val and cfg.train.eval_strategy != "no":
        _validate(r)  # the baseline: the curve starts at the base's own validation loss
    first = pos.step
    while pos.step < p.total_steps:
        steps = epoch_steps(lengths, p.global_batch, packing=cfg.data.packing, max_seq_length=cfg.data.max_seq_length,
                            seed=cfg.train.seed, epoch=pos.epoch, group_by_length=cfg.data.group_by_length)
        for k in range(_resume_index(steps, pos.items_in_epoch), len(steps)):
            passes = step_passes(steps[k], lengths, clip, p.tokens_per_pass, d.rank, d.world_size)
            _optimizer_step(r, passes, [i for item in steps[k] for i in item])
            if pos.step == first + 1 and d.main:  # a resumed run has started: its settings become the run's
                save_run_config(r)
            pos.items_in_epoch += len(steps[k])
            stop = _after_step(r, signals, epoch_end=k == len(steps) - 1)
            if stop or pos.step >= p.total_steps:
                return
        pos.epoch, pos.items_in_epoch = pos.epoch + 1, 0


def _resume_index(steps: list, items: int) -> int:
    """The first step that starts at or after `items` consumed (exact when the global batch is unchanged)."""
    done = 0
    for k, step in enumerate(steps):
        if done >= items:
            return k
        done += len(step)
    return len(steps)


def _host_batches(r: TrainState, passes: list[Pass]) -> list[dict[str, torch.Tensor]]:
    """The step's passes as CPU tensors (pinned on CUDA, so copies overlap), with the fused path's plan."""
    out = []
    for p in passes:
        b = r.objective.collate(r.data.train, p.records, r.cfg.data.max_seq_length)
        if r.graphs is not None:      # PassGraphs pads it to its bucket and pins that
            out.append(b)
            continue
        if r.fast is not None:
            b = r.fast.host_plan(b)
        if r.d.device.type == "cuda":
            b = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        out.append(b)
    return out


def _optimizer_step(r: TrainState, passes: list[Pass], records: list[int]) -> None:
    """One optimizer step over the step's `records` (all ranks'), this rank computing `passes`."""
    d = r.d
    started = time.perf_counter()
    batches = r.objective.prepare(r, _host_batches(r, passes))  # GRPO: its rollouts, sampled and scored
    counted = [(b, p.counted) for b, p in zip(batches, passes, strict=True)]
    mine = [b for b, c in counted if c]
    if r.objective.rollout:  # units exist once the completions do: summed over ranks
        n_global, tokens = dist.all_reduce_sum(d, [float(sum(r.objective.units(b) for b in mine)),
                                                   float(sum(b["attention_mask"].sum() for b in mine))])
    else:
        # the step's units on all ranks, counted here: every rank knows the whole step, so no collective (whose
        # read-back would wait for the previous step's optimizer on the GPU)
        whole = r.objective.collate(r.data.train, records, r.cfg.data.max_seq_length) if d.enabled else None
        n_global = float(r.objective.units(whole) if whole is not None else sum(r.objective.units(b) for b in mine))
        tokens = whole["input_ids"].numel() if whole is not None else sum(b["input_ids"].numel() for b in mine)
    samples = len(records)
    autocast = torch.autocast(d.device.type, dtype=r.dtype, enabled=r.dtype != torch.float32)
    totals: dict[str, torch.Tensor] = {"loss": torch.zeros((), dtype=torch.float64, device=d.device)}
    base_bytes = torch.cuda.memory_allocated(d.device) if d.device.type == "cuda" and r.pos.step == 0 else 0
    try:
        for j, (batch, count) in enumerate(counted):
            weight = d.world_size / max(n_global, 1.0) if count else 0.0  # a stand-in pass adds nothing
            if r.graphs is not None:
                totals["loss"] += r.graphs.run(batch, weight).double()
                continue
            batch = {k: v.to(d.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            with dist.grad_sync(r.ddp, j == len(counted) - 1 or not d.enabled):  # all-reduce on the last pass
                with autocast:
                    loss_sum, metrics = r.ddp(batch)
                (r.scaler.scale(loss_sum * weight) if r.scaler else loss_sum * weight).backward()
            if count:
                for name, value in {"loss": loss_sum, **metrics}.items():
                    totals[name] = totals.get(name, 0.0) + value.detach().double()
    except torch.OutOfMemoryError:
        raise oom_error(r) from None
    if r.pos.step == 0:
        widest = max(b["input_ids"].numel() for b in batches)
        r.plan.tokens_per_pass = measured_budget(r, r.plan.tokens_per_pass, widest, base_bytes)
    _update(r, totals, n_global, int(tokens), int(samples), started)


def _update(r: TrainState, totals: dict[str, torch.Tensor], n_global: float, tokens: int, samples: int,
            started: float) -> None:
    """Clip, check, step; the step's sums and the gradient norm come back to the host in one read."""
    d, t = r.d, r.cfg.train
    if r.scaler:
        r.scaler.unscale_(r.optimizer)
    params = [q for q in r.model.parameters() if q.requires_grad]  # FSDP: sharded, and the norm is global
    norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor
    sums = torch.stack([v.to(d.device, torch.float64) for v in totals.values()] + [norm.double().to(d.device)])
    *values, grad_norm = sums.tolist()  # the step's one host sync (plus the all-reduce below on several ranks)
    values = dist.all_reduce_sum(d, values) if d.enabled else values
    means = {name: v / max(n_global, 1.0) for name, v in zip(totals, values, strict=True)}
    loss = means.pop("loss")
    lr = r.scheduler.get_last_lr()[0]
    # With a GradScaler an overflow is its business (it skips the step and lowers the scale).
    finite = math.isfinite(loss) and (r.scaler is not None or math.isfinite(grad_norm))
    if finite:
        if r.scaler:
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=r.graphs is None)  # a captured graph accumulates into these .grad
    r.scheduler.step()
    r.pos.step += 1
    r.pos.tokens += tokens
    r.pos.samples += samples
    rec = {"step": r.pos.step, "epoch": r.pos.epoch_fraction(r.plan), "loss": loss, "lr": lr, "grad_norm": grad_norm,
           "tokens": tokens, "step_time": time.perf_counter() - started, **means}
    if not finite:
        _non_finite(r, rec)
    r.tlog.step(rec)


def _non_finite(r: TrainState, rec: dict[str, Any]) -> None:
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


def _after_step(r: TrainState, signals: StopSignals, epoch_end: bool) -> bool:
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


def _validate(r: TrainState) -> bool:
    """Validation loss over all ranks' shards (sums all-reduced); True when early stopping says stop."""

    cfg, d = r.cfg, r.d
    if r.val_batches is None:
        r.val_batches = _val_passes(r)
    # FSDP: through the sharded root, whose forward gathers the embeddings and head; it runs the reference loss
    loss_fn = r.ddp if r.fsdp else LossModule(r.model, r.objective, None, r.dtype)
    r.model.eval()
    ce, n, sums = 0.0, 0.0, {}
    autocast = torch.autocast(d.device.type, dtype=r.dtype, enabled=r.dtype != torch.float32)
    with torch.no_grad(), autocast, r.tlog.phase("validation", len(r.val_batches)) as advance:
        for batch, counted in r.val_batches:
            loss_sum, metrics = loss_fn({k: v.to(d.device) for k, v in batch.items()})
            if counted:
                ce, n = ce + loss_sum.detach().double(), n + r.objective.units(batch)  # summed on the device
                sums = {k: sums.get(k, 0.0) + v.detach().double() for k, v in metrics.items()}
            advance()
    r.model.train()
    names = dist.broadcast(d, sorted(sums))  # rank 0's names: a rank with an empty shard has none
    ce, n, *values = dist.all_reduce_sum(d, [float(ce), float(n), *(float(sums.get(k, 0.0)) for k in names)])
    loss = ce / max(n, 1.0)
    r.tlog.validation(r.pos.step, loss, int(n), {k: v / max(n, 1.0) for k, v in zip(names, values, strict=True)})
    return r.pos.record_validation(loss, cfg.train.early_stopping_patience, r.tlog)


def _val_passes(r: TrainState) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's padding-free validation passes over its shard (disjoint shards: no example counted twice), as
    many as the busiest rank's (FSDP gathers weights in every forward): stand-ins, not counted, fill up."""
    d, msl = r.d, r.cfg.data.max_seq_length
    shards = [r.data.val[k:: d.world_size] for k in range(d.world_size)]
    plans = [make_passes(list(range(len(sh))), [r.objective.pass_tokens(e, msl) for e in sh], r.plan.tokens_per_pass)
             for sh in shards]
    mine = [(r.objective.collate(shards[d.rank], p, msl), True) for p in plans[d.rank]]
    stand_in = r.objective.collate(r.data.val, [0], msl)
    return mine + [(stand_in, False)] * (max(len(p) for p in plans) - len(mine))


def _previews(r: TrainState) -> None:
    """Greedy answers to the preview prompts, to the console and previews.jsonl."""

    gen = dataclasses.replace(r.cfg.generate, temperature=0.0)
    r.model.eval()
    try:
        for messages in _preview_messages(r):
            result = generate_text(r.model, r.tokenizer, r.data.template, messages, gen, seed=r.cfg.train.seed)
            r.tlog.preview(r.pos.step, messages[-1]["content"], result.text)
    finally:
        r.model.train()


def _preview_messages(r: TrainState) -> list[list[dict]]:
    if r.cfg.train.preview_prompts:
        return [[{"role": "user", "content": p}] for p in r.cfg.train.preview_prompts]
    pool = r.data.val or r.data.train  # default: the first two held-out prompts
    out = []
    for ex in pool[:2]:
        last = last_reply(ex.messages)
        msgs = ex.messages[:last] if last >= 0 else list(ex.messages)  # the conversation before its last reply
        if msgs:
            out.append(msgs)
    return out


def _save_checkpoint(r: TrainState) -> Path:
    """Rank 0 writes; every rank learns whether it worked, so all stop together on a failed write."""

    path = error = None
    whole = None  # FSDP: the adapter and optimizer state, gathered whole by every rank, kept by rank 0
    if r.fsdp:
        whole = fsdp.adapter_state(r.model, r.d.main), fsdp.optimizer_state(r.optimizer, r.d.main)
    if r.d.main:
        try:
            with r.tlog.phase("saving checkpoint"):
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
