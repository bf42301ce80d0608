"""Reward functions for GRPO: the user's own (`file.py:name`) and the built-ins, checked before training.

A reward function is called as TRL calls one, with keyword lists of equal length:

    fn(prompts=[...], completions=[...], **columns) -> one float per completion

`prompts` hold each record's prompt (a string, or a message list for multi-turn prompts), `completions` the
sampled replies as strings, and every other column of the dataset comes along under its own name (an
Alpaca record's `output`, a conversation's last reply, as `reference`). Several functions add up with
`reward_weights`.

Built-ins: `conciseness` (1 within `max_words` words, max_words / words beyond: the seed's "at most 100
words"), `length` (-1 per 100 characters), `exact_match[:column]` and `contains[:column]` (against the
`reference` column unless another is named), `regex:PATTERN` (1 when `re.search` finds the pattern).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lorafit.errors import UserError
from lorafit.user_fn import is_callable_spec, load_callable

RewardCall = Callable[..., Sequence[float]]


@dataclass
class Reward:
    name: str
    fn: RewardCall
    weight: float = 1.0


def build_rewards(specs: list[str], weights: list[float], max_words: int) -> list[Reward]:
    """Reward objects for `--reward_funcs` (built-in names or file.py:name) with their weights."""
    weights = list(weights) or [1.0] * len(specs)
    return [Reward(spec, _resolve(spec, max_words), float(w)) for spec, w in zip(specs, weights, strict=True)]


def _resolve(spec: str, max_words: int) -> RewardCall:
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):], re.DOTALL)
        except re.error as e:
            raise UserError(f"reward function '{spec}': the pattern is not a valid regular expression ({e})") from None
        return lambda completions, **_: [float(pattern.search(c) is not None) for c in completions]
    name, _, column = spec.partition(":")
    if name == "conciseness" and not column:
        return lambda completions, **_: [_conciseness(c, max_words) for c in completions]
    if name == "length" and not column:
        return lambda completions, **_: [-len(c) / 100 for c in completions]
    if name in ("exact_match", "contains"):
        return _reference_reward(name, column or "reference")
    if is_callable_spec(spec):
        return load_callable(spec, "reward function")
    raise UserError(f"unknown reward function '{spec}'",
                    fix="use conciseness, length, exact_match[:column], contains[:column], regex:PATTERN, "
                        "or path/to/file.py:function")


def _conciseness(text: str, max_words: int) -> float:
    words = len(text.split())
    return 1.0 if words <= max_words else max_words / words


def _reference_reward(kind: str, column: str) -> RewardCall:
    def reward(completions, **columns):
        if column not in columns:
            shown = ", ".join(sorted(k for k in columns if k != "prompts")) or "none"
            raise UserError(f"reward function '{kind}' compares with the column '{column}', which the dataset does "
                            f"not have (its columns: {shown})", fix=f"name one of those: --reward_funcs {kind}:COLUMN")
        refs = [str(r).strip() for r in columns[column]]
        if kind == "exact_match":
            return [float(c.strip() == r) for c, r in zip(completions, refs, strict=True)]
        return [float(bool(r) and r in c) for c, r in zip(completions, refs, strict=True)]

    reward.__name__ = kind
    return reward


def score(rewards: list[Reward], prompts: list[Any], completions: list[str], columns: dict[str, list[Any]],
          group: int) -> list[list[float]]:
    """Each reward's scores (one list per function) for completions in groups of `group` per prompt.

    A function that raises or returns the wrong thing is a UserError naming it and the prompt it failed on
    (found by calling it again one prompt group at a time)."""
    out = []
    for r in rewards:
        try:
            out.append(_checked(r, prompts, completions, columns))
        except UserError as e:
            raise UserError(f"{e.message}{_failing_prompt(r, prompts, completions, columns, group)}",
                            fix=e.fix) from None
    return out


def _checked(r: Reward, prompts, completions, columns) -> list[float]:
    try:
        values = r.fn(prompts=prompts, completions=completions, **columns)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  a user's function can raise anything
        raise UserError(f"reward function '{r.name}' raised {type(e).__name__}: {e}",
                        fix="fix the function; it is called as fn(prompts=[...], completions=[...], **columns)") \
            from None
    if hasattr(values, "tolist"):  # numpy arrays and torch tensors
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"a {type(values).__name__}" + (f" of {len(values)}" if isinstance(values, (list, tuple)) else "")
        raise UserError(f"reward function '{r.name}' returned {got} for {len(completions)} completions",
                        fix="return a list with one float per completion")
    floats = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"reward function '{r.name}' returned {v!r} among its rewards",
                            fix="return one finite float per completion")
        floats.append(float(v))
    return floats


def _failing_prompt(r: Reward, prompts, completions, columns, group: int) -> str:
    for start in range(0, len(completions), group):
        part = slice(start, start + group)
        try:
            _checked(r, prompts[part], completions[part], {k: v[part] for k, v in columns.items()})
        except UserError:
            return f" (on the prompt {str(prompts[start])[:120]!r})"
    return ""


def check_rewards(rewards: list[Reward], prompt: Any, columns: dict[str, Any]) -> None:
    """Call every reward once on a dummy batch of the first prompt (two completions), so a broken function
    stops the run before any model loads."""
    completions = ["", str(columns.get("reference", "") or "a sample completion")]
    score(rewards, [prompt, prompt], completions, {k: [v, v] for k, v in columns.items()}, group=2)
