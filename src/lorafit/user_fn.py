"""A user's Python function named as `path/to/file.py:name`: eval's `--metrics` and GRPO's `--reward_funcs`.

    fn = load_callable("metrics.py:keyword_hit", "metric")
    scores = call_per_example(fn, "metric 'metrics.py:keyword_hit'", predictions, references)

Every way this can go wrong is the user's to fix (a missing file, a syntax error, a name that is not
there, a function that returns the wrong shape), so each ends as one UserError naming the file and
the fix, never a traceback.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from lorafit.errors import UserError

SPEC_FORM = "path/to/file.py:function_name"


def is_callable_spec(spec: str) -> bool:
    """True when `spec` looks like `file.py:name` (a Python file and a name), not a built-in metric's name."""
    path, sep, name = str(spec).rpartition(":")
    return bool(sep and name and path.endswith(".py"))


def load_callable(spec: str, what: str) -> Callable:
    """The function `name` from the Python file in `spec` ('file.py:name'); `what` names its use in errors."""
    if not is_callable_spec(spec):
        raise UserError(f"{what} '{spec}' is not of the form {SPEC_FORM}",
                        fix=f"name a Python file and a function in it, e.g. my_{what}.py:score")
    path_text, _, name = str(spec).rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"{what} '{spec}': file '{path}' does not exist", fix="check the path (relative to here)")
    module = _import_file(path, spec, what)
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UserError(f"{what} '{spec}': '{path}' defines no '{name}'",
                        fix=f"use one of: {', '.join(public)}" if public else f"define def {name}(...) in {path}")
    if not callable(fn):
        raise UserError(f"{what} '{spec}': '{name}' in '{path}' is a {type(fn).__name__}, not a function",
                        fix=f"make '{name}' a function")
    return fn


def call_per_example(fn: Callable, label: str, *columns: Sequence) -> list[float]:
    """fn(*columns), checked to return one finite number per row (a list, tuple or 1-D array)."""
    n = len(columns[0]) if columns else 0
    try:
        out = fn(*[list(c) for c in columns])
    except Exception as e:  # noqa: BLE001  the user's code: any failure is theirs to fix
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise UserError(f"{label} raised {type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})",
                        fix="fix the function; it is called with lists of equal length") from None
    if hasattr(out, "tolist"):  # numpy arrays and torch tensors
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise UserError(f"{label} returned a {type(out).__name__}, not a list of {n} numbers",
                        fix="return one float per example, in order")
    if len(out) != n:
        raise UserError(f"{label} returned {len(out)} values for {n} examples", fix="return one float per example")
    values = []
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise UserError(f"{label} returned {v!r} for example {i}, not a finite number",
                            fix="return one float per example (e.g. 1.0 / 0.0)")
        values.append(float(v))
    return values


def _import_file(path: Path, spec: str, what: str):
    # A name of our own per file (not the file's stem), so two files called metrics.py do not collide in sys.modules.
    # Registered in sys.modules because dataclasses and pickle look a class's module up there.
    key = "lorafit_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    loader_spec = importlib.util.spec_from_file_location(key, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"{what} '{spec}': '{path}' cannot be imported as Python", fix="use a .py file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[key] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001  SyntaxError, a missing import, anything its top level raises
        sys.modules.pop(key, None)
        raise UserError(f"{what} '{spec}': importing '{path}' failed: {type(e).__name__}: {e}",
                        fix=f"run `python {path}` to see the error, and fix it") from None
    return module
