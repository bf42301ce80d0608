"""The data a run trains on, by method: conversations for SFT (encode.py), preference records for DPO, ORPO
and KTO (preference.py), prompts for GRPO (prompts.py). Training, `lorafit data` and `lorafit eval` all come
through here."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafit.data.encode import PreparedData
from lorafit.data.encode import prepare_data as prepare_conversations
from lorafit.data.preference import PREFERENCE_METHODS, prepare_preference
from lorafit.data.prompts import prepare_prompts

if TYPE_CHECKING:
    from lorafit.config.schema import Config


def is_preference(cfg: Config) -> bool:
    return cfg.train.method in PREFERENCE_METHODS


def prepare_data(cfg: Config, tokenizer: Any) -> PreparedData:
    """Load, check, split and tokenize `cfg.data.dataset` as `cfg.train.method` reads it."""
    if cfg.train.method == "grpo":
        return prepare_prompts(cfg, tokenizer)
    return prepare_preference(cfg, tokenizer) if is_preference(cfg) else prepare_conversations(cfg, tokenizer)

