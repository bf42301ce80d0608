"""What names a Hugging Face hub repository (models and datasets alike)."""
from __future__ import annotations

import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    """`org/name` (dots allowed: `Qwen/Qwen2.5-0.5B`), not a relative path such as `./x/y` or `~/x`."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~", "/"))
