"""GRPO rollouts: sample a group of completions per prompt from the current policy.

Sampling is one batched `generate` call (KV cache, left-padded prompts, each prompt repeated
`num_generations` times) on the policy in eval mode: the merged-weight model of train/rollout_model.py, or
the LoRA model itself. transformers samples from the global torch RNG, so
the call runs inside `torch.random.fork_rng` seeded from (seed, step, rank): the completions of a step are
the same after a resume, and the dropout stream of training (saved in rng.pt) is left untouched.

Rows are laid out as transformers returns them: (N, P + L) = left-padded prompt (width P), then the
completion, padded after its end-of-text token; `completion_mask` (N, L) marks the completion tokens up to
and including that end-of-text, which the loss trains as TRL does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class Rollout:
    input_ids: torch.Tensor
    """(N, P + L) prompt and completion tokens, N = prompts x num_generations."""
    attention_mask: torch.Tensor
    """(N, P + L) 1 on real tokens (prompt and completion, end-of-text included)."""
    completion_mask: torch.Tensor
    """(N, L) 1 on the completion tokens that are trained."""
    prompt_width: int
    texts: list[str]
    """Completions as text (up to the end-of-text token, cut at the template's stop strings)."""


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed from (run seed, optimizer step, rank): no two steps or ranks sample alike."""
    return int(hashlib.sha256(f"lorafit-grpo:{seed}:{step}:{rank}".encode()).hexdigest()[:15], 16)


def sample(model, prompts: list[list[int]], *, num_generations: int, max_new_tokens: int, min_new_tokens: int,
           temperature: float, top_p: float, top_k: int, eos: set[int], pad_id: int, seed: int,
           decode, stops: list[str]) -> Rollout:
    """`num_generations` completions of every prompt (token ids), in one generate call."""
    device = next(p.device for p in model.parameters())
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding: every prompt ends where the completion starts
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    # Every setting spelled out, so nothing of the model's generation_config.json (a top_k of 50, a repetition
    # penalty) changes the distribution sampled from, which the loss's log-probs must match.
    config = GenerationConfig(do_sample=True, num_return_sequences=num_generations, max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=None, typical_p=1.0, repetition_penalty=1.0, eos_token_id=sorted(eos),
                              pad_token_id=pad_id, use_cache=True, disable_compile=True)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    completion = out[:, width:]  # (N, L)
    completion_mask = completion_mask_of(completion, eos)
    texts = []
    for row in range(completion.shape[0]):
        n = int(completion_mask[row].sum())
        tokens = completion[row, :n].tolist()
        text = decode([t for t in tokens if t not in eos])
        cut = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        texts.append(text[: min(cut)] if cut else text)
    prompt_mask = mask.to(device).repeat_interleave(num_generations, dim=0)
    return Rollout(out, torch.cat([prompt_mask, completion_mask], dim=1), completion_mask, width, texts)


def completion_mask_of(completion: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """(N, L) long: 1 up to and including each row's first end-of-text token, 0 after it."""
    is_eos = torch.isin(completion, torch.tensor(sorted(eos), device=completion.device))
    L = completion.shape[1]
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), L)  # (N,) index of the first end-of-text
    return (torch.arange(L, device=completion.device)[None, :] <= first[:, None]).long()
