"""User-facing errors: one clear message, exit code 2, no traceback.

Anything raised as `UserError` is a mistake the user can fix (bad config, bad data, a
missing file). Every other exception is a bug in lorafit or a library and keeps its traceback.
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


class UserError(Exception):
    """A mistake the user can fix. `str(err)` is the whole message shown to them."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if not fix else f"{message}\n  fix: {fix}")


class ConfigError(UserError):
    """A config field has a wrong name, type, value or combination."""


class DataError(UserError):
    """A dataset cannot be read, parsed or trained on."""


def path_problem(path: Path, want: str = "file") -> str | None:
    """Why `path` is not a readable regular file (want='file') or folder (want='dir'), in words; None when it is.

    "does not exist" for a FIFO, a socket or a folder given as a file sends the user looking in the wrong place."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        return f"is a broken symbolic link (to '{os.readlink(p)}')"
    if not p.exists():
        return "does not exist"
    mode = p.stat().st_mode
    if want == "file" and stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if want == "dir" and not stat.S_ISDIR(mode):
        return "is a file, not a folder"
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"is {kind}, not a regular file"
    if not os.access(p, os.R_OK):
        return "is not readable (permission denied)"
    return None


@contextmanager
def reading_files(what: str, path: Path | str, fix: str | None = None):
    """Turn the ways a library fails on damaged files (a truncated safetensors, a .gguf that is not GGUF, a
    config.json cut short) into one UserError naming them; any other exception keeps its traceback."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, EOFError, UnicodeError) as e:
        raise UserError(f"could not load the {what} from '{path}': {_first_line(e)}",
                        fix=fix or "the files look damaged or incomplete (a copy or download cut short?): "
                                   "copy or download them again") from None
    except SafetensorError as e:
        raise UserError(f"could not load the {what} from '{path}': a safetensors file is damaged ({_first_line(e)})",
                        fix=fix or "copy or download the files again") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
