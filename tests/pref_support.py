"""Preference data for the DPO/ORPO/KTO tests, built from words the tiny tokenizer knows."""
from __future__ import annotations

import json
from pathlib import Path

from test_train_support import WORDS


def pair_records(n: int = 24) -> list[dict]:
    """Pairs whose chosen reply is always 'apple ...' and rejected 'banana ...': one rule to learn."""
    return [{"prompt": f"{WORDS[i % 12]} {WORDS[(i * 5) % 12]} {i}",
             "chosen": "apple " + " ".join(WORDS[(i * k) % 12] for k in range(1, 3 + i % 3)),
             "rejected": "banana " + " ".join(WORDS[(i * k + 1) % 12] for k in range(1, 3 + i % 4))}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
