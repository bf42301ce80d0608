"""What every stage of the data pipeline shares: the conversation type, the label that trains nothing, and
reading a text field with a message that names the record."""
from __future__ import annotations

import math
from typing import Any

from lorafit.errors import DataError

IGNORE_INDEX = -100
"""The label of a token that is not trained (prompt tokens, padding): cross-entropy's ignore_index."""

Conversation = list[dict[str, str]]


def text_field_of(data: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    """A text field of a record: str (numbers are turned into text), '' when optional and absent."""
    if name not in data or data[name] is None:
        if not required:
            return ""
        if name in data:
            raise DataError(f"field '{name}' of the record at {where} is null",
                            fix=f"give '{name}' a text value in that record, or remove the record")
        fields = ", ".join(sorted(map(str, data))) or "none"
        raise DataError(f"record at {where} has no field '{name}' (its fields: {fields})",
                        fix=f"add '{name}' to every record, or map a field onto it: --column_map FIELD={name}")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"field '{name}' of the record at {where} must be text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # a NaN cell of pandas/Parquet, not the text 'nan'
        if not required:
            return ""
        raise DataError(f"field '{name}' of the record at {where} is {value} (a missing value), not text",
                        fix="fill or drop records with missing values")
    return str(value)


def last_reply(conv: Conversation) -> int:
    """Index of the last assistant turn, -1 when there is none."""
    return max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=-1)
