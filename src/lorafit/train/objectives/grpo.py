"""GRPO (Shao et al. 2024, DeepSeekMath): reward-driven fine-tuning with group-normalized advantages.

Once per optimizer step `prepare` turns the step's prompts into rollouts (train/rollout.py): G =
num_generations completions per prompt sampled from the current LoRA policy, scored by the reward functions
(train/rewards.py), advantages (r - mean) / (std + 1e-4) within each prompt's group, and, when beta > 0,
the reference log-probs from the same model with the adapter off (peft's `disable_adapter()`: no second
copy). `loss` is TRL's clipped objective per completion token,

    -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * KL,   KL = exp(ref - logp) - (ref - logp) - 1

(the k3 estimator), with ratio = exp(logp - old_logp). Each rollout is used for one update (TRL's default
num_iterations 1), so the old policy is the current one: old_logp is logp detached, the ratio is 1 in value
and its gradient is the policy gradient A * d logp (the clip acts only when a batch brings `old_logp`).

Units, what the loop divides the step's loss sum by: completion tokens of the step on all ranks for dapo and
bnpo (TRL's bnpo divides per micro-batch; here micro-batches never change the result, so the two are one),
completions for grpo (each completion's mean over its tokens), completions x max_completion_length for
dr_grpo. Advantages are per prompt group, and a prompt's G completions are sampled on one rank, so no
statistic crosses ranks except the counts that turn logged sums into means (and scale_rewards batch).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from lorafit.config.schema import Config, beta_of
from lorafit.data.prompts import first_prompt
from lorafit.errors import DataError
from lorafit.infer.generate import decode, eos_token_ids
from lorafit.train import parallel as dist
from lorafit.train.objectives.base import Batch, Metrics
from lorafit.train.objectives.sft import decoder_and_head
from lorafit.train.rewards import Reward, build_rewards, check_rewards, score
from lorafit.train.rollout import rollout_seed, sample
from lorafit.train.rollout_model import rollout_policy

EPS = 1e-4
"""Added to the reward std before dividing (TRL's value): a group of equal rewards gets advantage 0, not NaN."""
PREVIEW_COMPLETIONS = 4


# -- the math -------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group: int, scale: str, batch_std: float | None = None):
    """(advantages (N,), std of each completion's group (N,)) for rewards (N,) laid out group after group.

    std is the unbiased one, as torch.std and TRL compute it. scale: group, batch (divide by `batch_std`), none."""
    grouped = rewards.view(-1, group)  # (N / G, G)
    std = grouped.std(dim=1, keepdim=True).expand_as(grouped)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (std + EPS)
    elif scale == "batch":
        adv = adv / (batch_std + EPS)
    return adv.reshape(-1), std.reshape(-1)


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, epsilon: float, beta: float):
    """(loss, kl, clipped) per completion token, each (N, L); advantages (N, 1)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped_term = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages
    loss = -torch.min(unclipped, clipped_term)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        loss = loss + beta * kl
    return loss, kl, clipped


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The loss summed over the batch's units (see the module docstring); mask (N, L) float."""
    if loss_type == "grpo":
        return ((loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()
    return (loss * mask).sum()


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """(N, L) log-probabilities of the completion tokens under `model` at `temperature` (0 where masked).

    The LM head runs on the trained completion tokens only (as the SFT reference loss does): with a 32k-49k
    vocabulary the full (N, P + L, V) float32 logits of a step would be the largest tensor in it.
    """
    L = completion_mask.shape[1]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False}
    targets = input_ids[:, -L:]  # (N, L)
    keep = completion_mask.bool()
    split = decoder_and_head(model)
    if split is None:
        logits = model(**inputs).logits[:, -L - 1:-1][keep]  # (n, V): position t predicts token t + 1
    else:
        decoder, head = split
        hidden = decoder(**inputs).last_hidden_state[:, -L - 1:-1]  # (N, L, C)
        logits = head(hidden[keep])  # (n, V), n trained completion tokens
    logp = -F.cross_entropy(logits.float() / temperature, targets[keep], reduction="none")
    out = torch.zeros(completion_mask.shape, dtype=logp.dtype, device=logp.device)
    return out.masked_scatter(keep, logp)


def count_units(completion_mask: torch.Tensor, loss_type: str, max_completion_length: int) -> int:
    if loss_type == "grpo":
        return int(completion_mask.shape[0])
    if loss_type == "dr_grpo":
        return int(completion_mask.shape[0]) * max_completion_length
    return int(completion_mask.sum())


# -- the objective --------------------------------------------------------------------------------

class GRPO:
    """Rollouts in `prepare`, the clipped policy-gradient loss in `loss`; units per `loss_type`."""

    name = "grpo"
    rollout = True

    def pass_tokens(self, example, max_seq_length: int) -> int:
        # what the loss pass computes: num_generations rows of the prompt and a completion at its longest
        return self.g.num_generations * (min(len(example.input_ids), max_seq_length) + self.g.max_completion_length)

    def collate(self, examples, records: list[int], max_seq_length: int) -> Batch:
        """The pass's prompts, one right-padded row each (the rollout left-pads them for generation)."""
        rows = [examples[i].input_ids[-max_seq_length:] for i in records]
        ids = torch.zeros(len(rows), max(len(x) for x in rows), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, row in enumerate(rows):
            ids[k, : len(row)] = torch.tensor(row)
            mask[k, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def __init__(self, cfg: Config):
        g = cfg.grpo
        self.rewards: list[Reward] = build_rewards(g.reward_funcs, g.reward_weights, g.max_words)
        row = first_prompt(cfg)
        check_rewards(self.rewards, row.prompt, row.columns)  # a broken reward stops here, before the model loads
        self.g, self.gen, self.seed = g, cfg.generate, cfg.train.seed
        self.beta = beta_of(cfg)
        self.preview_steps = cfg.train.preview_steps
        self.described = False
        self.rollout_path: tuple[str, str] | None = None
        """(MERGED or ADAPTER, why) of the last rollout: logged when it changes."""

    def units(self, batch: Batch) -> int:
        return count_units(batch["completion_mask"], self.g.loss_type, self.g.max_completion_length)

    def loss(self, model, batch: Batch, fast_loss, mask_dtype: torch.dtype) -> tuple[torch.Tensor, Metrics]:
        g = self.g
        logp = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                self.gen.temperature)
        mask = batch["completion_mask"].to(logp.dtype)
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()
        tok, kl, clipped = per_token_loss(logp, old, batch.get("ref_logp"), batch["advantages"][:, None].to(logp.dtype),
                                          g.epsilon, self.beta)
        metrics = {k.removeprefix("stat/"): v for k, v in batch.items() if k.startswith("stat/")}
        metrics["clip_ratio"] = (clipped * mask).sum() * batch["tok_scale"]
        if self.beta > 0:
            metrics["kl"] = (kl.detach() * mask).sum() * batch["tok_scale"]
        return aggregate(tok, mask, g.loss_type), metrics

    def prepare(self, r: Any, group: list[Batch]) -> list[Batch]:
        """The step's prompt passes -> rollout batches (one per pass, G rows per prompt). `r`: TrainState."""
        G, step = self.g.num_generations, r.pos.step + 1
        rows = [_prompt_rows(r.data, b) for b in group]  # per micro-batch: [(prompt ids, PromptRow)]
        flat = [x for part in rows for x in part]
        if not self.described:
            self.described = True
            r.tlog.info(f"grpo: {len(flat)} prompts x {G} completions of at most {self.g.max_completion_length} "
                        f"tokens a step per process, sampled in one generate call; loss {self.g.loss_type}, "
                        f"beta {self.beta}, rewards {', '.join(f'{w.weight:g} x {w.name}' for w in self.rewards)}")
        model, device = r.model, r.d.device
        autocast = torch.autocast(device.type, dtype=r.dtype, enabled=r.dtype != torch.float32)
        was_training = model.training
        model.eval()
        try:
            started = time.perf_counter()
            with autocast:
                roll = self._sample(r, model, [ids for ids, _ in flat], step)
            seconds = time.perf_counter() - started  # sample ends on the host (tolist), so the GPU is done too
            prompts = [row.prompt for _, row in flat for _ in range(G)]
            names = sorted({k for _, row in flat for k in row.columns})
            columns = {k: [row.columns.get(k) for _, row in flat for _ in range(G)] for k in names}
            per_fn = torch.tensor(score(self.rewards, prompts, roll.texts, columns, G), dtype=torch.float64)  # (F, N)
            weights = torch.tensor([rw.weight for rw in self.rewards], dtype=torch.float64)
            total = (weights[:, None] * per_fn).sum(dim=0)  # (N,)
            batches = self._batches(r, roll, rows, total, per_fn, autocast, seconds)
        finally:
            model.train(was_training)
        if self.preview_steps and step % self.preview_steps == 0:
            _previews(r.tlog, step, flat[0][1], roll.texts[:PREVIEW_COMPLETIONS], total, per_fn, self.rewards)
        return batches

    def _sample(self, r, model, prompts: list[list[int]], step: int):
        """The step's rollout, from merged weights where it can (train/rollout_model.py), else the adapter model.
        The merged model is dropped on return: the loss pass never holds it."""
        G, L = self.g.num_generations, self.g.max_completion_length
        policy, path, why = rollout_policy(model, self.g.rollout_weights, r.dtype, len(prompts) * G,
                                           max(len(p) for p in prompts) + L)
        if (path, why) != self.rollout_path:
            self.rollout_path = (path, why)
            r.tlog.info(f"grpo rollouts: {path} weights ({why})")
        return sample(policy, prompts, num_generations=G, max_new_tokens=L,
                      min_new_tokens=self.g.min_completion_length, temperature=self.gen.temperature,
                      top_p=self.gen.top_p, top_k=self.gen.top_k,
                      eos=eos_token_ids(model, r.tokenizer, r.data.template), pad_id=_pad_id(r.tokenizer),
                      seed=rollout_seed(self.seed, step, r.d.rank), decode=lambda t: decode(r.tokenizer, t),
                      stops=r.data.template.stop_strings)

    def _batches(self, r, roll, rows, total, per_fn, autocast, seconds: float) -> list[Batch]:
        """Split the rollout into the group's micro-batches, with advantages, reference log-probs and stats
        (`seconds`: the rollout's time, logged as rollout_s: every row carries it, so its mean is the time)."""
        g, G, d = self.g, self.g.num_generations, r.d
        lengths = roll.completion_mask.sum(dim=1).double().cpu()  # (N,)
        n, tokens = float(total.numel()), float(lengths.sum())
        batch_std = None
        if g.scale_rewards == "batch":
            s, s2, c = dist.all_reduce_sum(d, [float(total.sum()), float((total ** 2).sum()), n])
            batch_std = max(s2 / c - (s / c) ** 2, 0.0) ** 0.5 * (c / max(c - 1, 1)) ** 0.5
        adv, std = group_advantages(total, G, g.scale_rewards, batch_std)
        fn_std = [group_advantages(f, G, "none")[1] for f in per_fn]
        units = count_units(roll.completion_mask, g.loss_type, g.max_completion_length)
        u_all, n_all, t_all = dist.all_reduce_sum(d, [float(units), n, tokens])
        seq_scale, tok_scale = u_all / max(n_all, 1.0), u_all / max(t_all, 1.0)
        per_row = {"reward": total, "reward_std": std, "frac_reward_zero_std": (std == 0).double(),
                   "completion_length": lengths, "rollout_s": torch.full_like(total, seconds)}
        for rw, f, s in zip(self.rewards, per_fn, fn_std, strict=True):
            per_row[f"rewards/{rw.name}/mean"], per_row[f"rewards/{rw.name}/std"] = f, s
        out, start = [], 0
        for part in rows:
            sl = slice(start, start + len(part) * G)
            start = sl.stop
            b = _slice(roll, sl)
            b["advantages"] = adv[sl].float().to(d.device)
            b["tok_scale"] = torch.tensor(tok_scale, dtype=torch.float64, device=d.device)
            for name, values in per_row.items():
                b[f"stat/{name}"] = torch.tensor(float(values[sl].sum()) * seq_scale, dtype=torch.float64,
                                                 device=d.device)
            if self.beta > 0:
                with torch.no_grad(), autocast, r.model.disable_adapter():
                    b["ref_logp"] = completion_logps(r.model, b["input_ids"], b["attention_mask"],
                                                     b["completion_mask"], self.gen.temperature).detach()
            out.append(b)
        return out


def _slice(roll, sl: slice) -> Batch:
    """Rows `sl` of the rollout, without the columns that are padding in all of them."""
    P = roll.prompt_width
    prompt_mask, completion_mask = roll.attention_mask[sl, :P], roll.completion_mask[sl]
    first = int(prompt_mask.any(dim=0).int().argmax())  # leftmost column any prompt of the slice uses
    width = int(completion_mask.sum(dim=1).max())  # longest completion of the slice
    cols = slice(first, P + width)
    return {"input_ids": roll.input_ids[sl, cols], "attention_mask": roll.attention_mask[sl, cols],
            "completion_mask": completion_mask[:, :width]}


def _prompt_rows(data, batch: Batch) -> list[tuple[list[int], Any]]:
    """The (prompt ids, PromptRow) of each row of a prompt batch (right-padded, as `GRPO.collate` builds it)."""
    out = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        prompt = ids[mask.bool()].tolist()
        row = data.rows.get(tuple(prompt))
        if row is None:
            raise DataError("a prompt batch holds a prompt that is not in the prompt data",
                            fix="report this: --method grpo needs the batches of data/prompts.py")
        out.append((prompt, row))
    return out


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _previews(tlog, step: int, row, texts: list[str], total, per_fn, rewards: list[Reward]) -> None:
    """The first prompt's first completions and their rewards, to previews.jsonl and the console."""
    prompt = row.prompt if isinstance(row.prompt, str) else row.messages[-1]["content"]
    for i, text in enumerate(texts):
        tlog.preview(step, prompt, text, reward=round(float(total[i]), 6),
                     rewards={rw.name: round(float(per_fn[k, i]), 6) for k, rw in enumerate(rewards)})
