"""The data pipeline: sources, formats, templates, masking, batching, demo data, report.

Names are re-exported lazily: `import lorafit.data` loads nothing else (the CLI stays fast).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Template": "templates", "resolve_template": "templates", "render_prompt": "templates",
    "encode_prompt": "templates", "TEMPLATES": "templates",
    "Example": "tokenize", "PreparedData": "tokenize", "prepare_data": "tokenize",
    "load_conversations": "tokenize", "encode_conversation": "tokenize", "split_conversations": "tokenize",
    "make_batches": "batching", "packed_attention_mask": "batching", "padding_share": "batching",
    "plan_batches": "batching",
    "demo_records": "demo",
    "data_command": "report", "data_report": "report",
    "load_records": "sources", "detect_format": "formats", "FORMATS": "formats",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorafit.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"lorafit.data.{module}"), name)
