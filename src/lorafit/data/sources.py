"""Read raw records: the built-in demo set, local JSON/JSONL/CSV/Parquet files or folders, hub datasets.

Every record comes back as a `Record`: the dict itself plus where it came from (`file:line`,
`file record N`, `hub-id row N`), so an error later on can point at the exact record.
Local files are parsed here rather than through `datasets` because its errors name neither
the file nor the line; hub ids (and `datasets` folders) go through `datasets.load_dataset`.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.data.demo import demo_records
from lorafit.errors import DataError, path_problem
from lorafit.hub import looks_like_hub_id
from lorafit.parsing import BadInput, check_value, json_loads

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class Record:
    data: dict[str, Any]
    where: str
    """Human-readable location: 'train.jsonl:12', 'data.csv row 7', 'yahma/alpaca-cleaned row 3'."""


def load_records(source: str, split: str = "train", demo_size: int = 1200) -> list[Record]:
    """All records of `source`: 'demo', a local file or folder, or a hub dataset id; each checked by check_records."""
    return check_records(_load(source, split, demo_size))


def check_records(records: list[Record]) -> list[Record]:
    """Refuse values no later stage can use (NUL bytes, lone surrogates, absurd nesting), naming the record,
    whatever the source (a hub dataset or a Parquet file can hold them as well as JSON)."""
    for r in records:
        problem = check_value(r.data)
        if problem:
            raise DataError(f"record at {r.where}: {problem}",
                            fix="clean that record (or drop it) and run again")
    return records


def _load(source: str, split: str, demo_size: int) -> list[Record]:
    path = Path(source).expanduser()
    if (source == "demo" or path.is_file()) and split != "train":
        # One file (or the demo set) is one split; reading it whole under another name would hide the mistake.
        what = "the built-in demo set" if source == "demo" else f"'{source}' is one file that"
        raise DataError(f"dataset_split '{split}' applies to hub datasets and to folders of split files; "
                        f"{what} has no splits",
                        fix="pass that split's own file as dataset (e.g. --dataset validation.jsonl), "
                            "or leave dataset_split at train")
    if source == "demo":

        return [Record(r, f"demo record {i}") for i, r in enumerate(demo_records(demo_size))]
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        return read_folder(path, split)
    if looks_like_hub_id(source) and Path(source).suffix not in SUFFIXES and not path.exists() \
            and not path.is_symlink():
        return load_hub(source, split)
    raise DataError(f"dataset '{source}' {path_problem(path)}",
                    fix="pass an existing file or folder (json, jsonl, csv, parquet), a hub id (org/name), or `demo`")


def read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".json", ".jsonl", ".csv"):
        raise DataError(f"'{path}' has an unsupported extension '{suffix}'",
                        fix="use a .json, .jsonl, .csv or .parquet file")
    text = _read_utf8(path)
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    return _read_json(path, text)


def read_folder(path: Path, split: str = "train") -> list[Record]:
    """A `save_to_disk` folder, or every data file under `path` (only the split's files when names tell)."""
    if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _load_from_disk(path, split)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"folder '{path}' holds no .json, .jsonl, .csv or .parquet files",
                        fix="point `dataset` at a data file, or a folder of them")
    in_split = [p for p in files if split in p.relative_to(path).as_posix()]
    if not in_split and split != "train":  # a folder without split names is all train, as one file is
        shown = ", ".join(p.relative_to(path).as_posix() for p in files[:6])
        raise DataError(f"folder '{path}' has no file for dataset_split '{split}' (its files: {shown})",
                        fix="set dataset_split to a word in one of those names, or leave it at train")
    records: list[Record] = []
    for f in in_split or files:
        records.extend(read_file(f))
    return records


def load_hub(name: str, split: str = "train", revision: str | None = None) -> list[Record]:
    """A dataset through `datasets.load_dataset`: a hub id, or a local folder standing in for one."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"could not load dataset '{name}' (split '{split}'): {_first_line(e)}",
                        fix="check the hub id, the split name and the network, or pass a local file") from None
    except Exception as e:  # noqa: BLE001  datasets raises many types of its own (DatasetNotFoundError, ...)
        raise DataError(f"could not load dataset '{name}' (split '{split}'): {type(e).__name__}: {_first_line(e)}",
                        fix="check the hub id and the split name, or pass a local file") from None
    return [Record(dict(row), f"{name} row {i}") for i, row in enumerate(ds)]


def _load_from_disk(path: Path, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001  a broken folder fails in arrow, json or fsspec code
        raise DataError(f"could not read the saved dataset in '{path}': {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"saved dataset '{path}' has no split '{split}' (it has {', '.join(ds)})",
                            fix="set dataset_split to one of those")
        ds = ds[split]
    return [Record(dict(row), f"{path} row {i}") for i, row in enumerate(ds)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    utf16 = _utf16(raw)
    if utf16:
        raise DataError(f"'{path}' is {utf16} text, not UTF-8",
                        fix=f"re-encode the file, e.g. `iconv -f UTF-16 -t UTF-8 {path.name} > fixed{path.suffix}`")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"'{path}:{line}' is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})",
                        fix=f"re-encode the file, e.g. "
                            f"`iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`") from None
    return text.removeprefix("\ufeff")  # a byte-order mark some editors write


def _utf16(raw: bytes) -> str | None:
    """'UTF-16' when the bytes are UTF-16 (a byte-order mark, or ASCII with every other byte NUL), else None.

    Windows tools (PowerShell's `>`, Notepad's "Unicode") write UTF-16; read as UTF-8 it fails at byte 0
    or 1 and latin1, the usual advice, would turn it into text full of NULs."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = raw[:4096]
    if len(head) >= 8 and (head[1::2].count(0) > 0.9 * len(head[1::2]) or head[0::2].count(0) > 0.9 * len(head[0::2])):
        return "UTF-16 (no byte-order mark)"
    return None


def _as_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"record at {where} is a {type(value).__name__}, not an object with named fields",
                        fix='each record must look like {"instruction": ..., "output": ...} or {"messages": [...]}')
    return value


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            value = json_loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON at {where}: {e.msg} (column {e.colno})",
                            fix="fix or remove that line; each line must be one JSON object") from None
        except BadInput as e:
            raise DataError(f"record at {where}: {e}", fix="fix or remove that line") from None
        records.append(Record(_as_dict(value, where), where))
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    """A JSON list of objects (or an object holding one list); JSON lines saved as .json also pass."""
    if not text.strip():
        return []
    try:
        value = json_loads(text)
    except BadInput as e:
        raise DataError(f"'{path}': {e}", fix="fix that value in the file") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return _read_jsonl(path, text)
        raise DataError(f"malformed JSON at {path}:{e.lineno}: {e.msg} (column {e.colno})",
                        fix="fix the file (a JSON list of objects), or save it as JSON lines (.jsonl)") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        one_list = len(lists) == 1 and all(isinstance(x, dict) for x in lists[0])
        value = lists[0] if one_list else [value]  # {"data": [...]} / {"train": [...]}, or one record
    if not isinstance(value, list):
        raise DataError(f"'{path}' holds a JSON {type(value).__name__}, not a list of records",
                        fix="write a JSON list of objects, or JSON lines (.jsonl)")
    return [Record(_as_dict(v, f"{path} record {i}"), f"{path} record {i}") for i, v in enumerate(value)]


def _read_csv(path: Path, text: str) -> list[Record]:
    """Strict CSV: a quote left open is an error at the line where its row starts, not a silent merge of
    every row up to the next quote into one cell (the lenient reader's behaviour)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"malformed CSV at {path}:{start}: {e} (a quote opened in the row starting on line {start} "
                        "is not closed)" if "end of data" in str(e) else f"malformed CSV at {path}:{start}: {e}",
                        fix='close the quote, or double a quote inside a quoted cell ("")') from None
    if not rows:
        return []
    columns = rows[0][1]
    records = []
    for line, cells in rows[1:]:
        if not cells:
            continue  # a blank line
        where = f"{path} row {len(records) + 2}"
        if len(cells) > len(columns):
            raise DataError(f"'{path}' row {len(records) + 2} (line {line}) has more cells than the header's "
                            f"{len(columns)} columns", fix="quote cells that hold commas")
        if _merged_rows(cells, len(columns)):
            raise DataError(f"'{path}' row {len(records) + 2} (line {line}) spans several lines that look like rows "
                            f"of their own ({len(cells)} of {len(columns)} cells): a quote is probably not closed "
                            "where it should be", fix="check the quotes on that line")
        # A missing trailing cell is empty text, as spreadsheets write it.
        records.append(Record(dict(zip(columns, cells + [""] * (len(columns) - len(cells)), strict=True)), where))
    return records


def _merged_rows(cells: list[str], n_columns: int) -> bool:
    """A row a stray quote glued together: a multi-line cell and too few cells, or a cell whose later lines
    have as many commas as a whole row. A real multi-line cell (an answer with line breaks) has neither."""
    multi = [c for c in cells if "\n" in c]
    if not multi:
        return False
    if len(cells) < n_columns:
        return True
    return n_columns > 1 and any(line.count(",") >= n_columns - 1 for c in multi for line in c.splitlines()[1:])


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001  pyarrow raises ArrowInvalid, OSError, ... on a damaged file
        raise DataError(f"could not read Parquet file '{path}': {_first_line(e)}") from None
    return [Record(r, f"{path} row {i}") for i, r in enumerate(rows)]


def csv_columns(records: list[Record]) -> list[str] | None:
    """The header of a CSV source (all its records share one), else None."""
    if records and " row " in records[0].where and records[0].where.split(" row ")[0].lower().endswith(".csv"):
        return list(records[0].data)
    return None
