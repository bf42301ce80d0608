"""Parse text that lorafit did not write (datasets, recipes, run files, HTTP bodies) with bounded work.

Python's own parsers fail in ways a user cannot act on: `json.loads` raises RecursionError on ~1000
nested brackets and ValueError on an integer of over 4300 digits, accepts `NaN` (not JSON) and lone
surrogate escapes (`"\\ud800"`, which no tokenizer can encode), and yaml recurses the same way. Here
each of those becomes a `BadInput` whose message says what is wrong; callers add where (file:line,
record, request field) and turn it into their own error (DataError, ConfigError, a 400).
"""
from __future__ import annotations

import json
import re
from typing import Any

import yaml

MAX_DEPTH = 64
"""Deepest nesting of lists/objects accepted. Real records nest 3-4 deep (messages -> turn -> content parts);
beyond ~1000 Python's recursive code (json, yaml, copy, repr) overflows the stack."""

_SURROGATE = re.compile("[\ud800-\udfff]")


class BadInput(ValueError):
    """Input that cannot be used as it is; `str()` says why, without the place (the caller knows it)."""


def _no_constant(name: str) -> Any:
    raise BadInput(f"'{name}' is not a JSON value (JSON has no NaN or Infinity)")


def json_loads(text: str | bytes) -> Any:
    """json.loads with NaN/Infinity refused and the nesting and size failures turned into BadInput.

    json.JSONDecodeError (with its line and column) is left for the caller, which knows the file."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise BadInput(f"nesting is deeper than Python can parse (limit {MAX_DEPTH} levels)") from None
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as e:
        raise BadInput(f"it is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    except BadInput:
        raise
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise BadInput(f"it holds a number too long to read ({str(e).split(';')[0]})") from None
    problem = check_value(value)
    if problem:
        raise BadInput(problem)
    return value


def yaml_load(text: str) -> Any:
    """yaml.safe_load with YAMLError, deep nesting and alias bombs turned into BadInput."""
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise BadInput(f"nesting is deeper than Python can parse (limit {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as e:
        raise BadInput(f"it is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except ValueError as e:  # an integer of over 4300 digits, a date out of range
        raise BadInput(f"it holds a value that cannot be read ({str(e).split(';')[0]})") from None
    problem = check_value(value)
    if problem:
        raise BadInput(problem)
    return value


def check_value(value: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """Why a parsed value cannot be used (too deep, a lone surrogate, a NUL byte), or None.

    Iterative, and each container is visited once: a YAML alias bomb (a list of 9 references to a list of
    9 references ...) is a few hundred objects, not 9**9 visits."""
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            problem = check_text(v)
            if problem:
                return f"{path or 'the value'} {problem}"
            continue
        if not isinstance(v, (dict, list, tuple)) or id(v) in seen:
            continue
        if depth >= max_depth:
            return f"{_short(path) or 'the value'} nests deeper than {max_depth} levels"
        seen.add(id(v))
        items = v.items() if isinstance(v, dict) else enumerate(v)
        for k, child in items:
            if isinstance(k, str) and check_text(k):
                return f"a field name under {path or 'the top level'} {check_text(k)}"
            child_path = (f"{path}.{k}" if path else str(k)) if isinstance(v, dict) else f"{path}[{k}]"
            stack.append((child, child_path, depth + 1))
    return None


def check_text(s: str) -> str | None:
    """Why a string is not text a tokenizer can take, or None."""
    if "\x00" in s:
        return f"holds a NUL byte (\\x00) at character {s.index(chr(0))}"
    m = _SURROGATE.search(s)
    if m:
        return f"holds a lone surrogate (\\u{ord(m.group()):04x}) at character {m.start()}, which is not a character"
    return None


def _short(path: str) -> str:
    return path if len(path) <= 60 else path[:40] + "..." + path[-12:]
