"""Hostile inputs before any model loads: each class of bad dataset, recipe, run config or path is one clear
UserError (DataError / ConfigError) naming the place, never a traceback, a hang or a silent acceptance."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lorafit.config.load import build_config, load_yaml
from lorafit.data.formats import to_conversations
from lorafit.data.sources import Record, load_records
from lorafit.errors import ConfigError, DataError, UserError
from lorafit.parsing import MAX_DEPTH, BadInput, json_loads, yaml_load

OK = {"instruction": "a", "output": "b"}
DEEP = "[" * 100_000 + "]" * 100_000


# -- data: values no later stage can use, in every reader --------------------------------------------------

@pytest.mark.parametrize("name,content,expected", [
    ("deep.json", DEEP, "nesting is deeper"),
    ("deep.jsonl", '{"instruction": ' + DEEP + ', "output": "x"}\n', "deep.jsonl:1.*nesting is deeper"),
    ("nested.jsonl", '{"instruction": "a", "output": "b", "x": ' + "[" * 70 + "]" * 70 + "}\n", "nests deeper"),
    ("surrogate.jsonl", '{"instruction": "\\ud800", "output": "x"}\n', r"surrogate.jsonl:1.*lone surrogate"),
    ("surrogate.json", '[{"instruction": "a", "output": "b\\udfff"}]', "lone surrogate"),
    ("huge.jsonl", '{"instruction": ' + "7" * 5000 + ', "output": "x"}\n', "number too long"),
    ("nan.jsonl", '{"instruction": "a", "output": NaN}\n', "NaN"),
    ("inf.json", '[{"instruction": "a", "output": -Infinity}]', "Infinity"),
    ("nul.jsonl", '{"instruction": "a\\u0000b", "output": "x"}\n', r"nul.jsonl:1.*instruction holds a NUL"),
    ("nul.csv", "instruction,output\na\x00b,x\n", r"nul.csv row 2.*NUL"),
    ("quote.csv", 'instruction,output\n"What is 2+2,4\nSay hi,hello\n', r"quote.csv:2.*not closed"),
    ("merged.csv", 'instruction,output\n"What is 2+2,4\nSay hi,hello",\n', r"row 2 \(line 2\) spans several lines"),
    ("short.csv", 'instruction,output,input\n"What is 2+2,4\nSay hi"\n', r"row 2 \(line 2\) spans several lines"),
    ("bad-quote.csv", 'instruction,output\n"a"b,c\n', r"bad-quote.csv:2"),
])
def test_bad_values_are_data_errors_naming_the_place(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(DataError, match=expected):
        load_records(str(path))


def test_a_legal_multiline_csv_cell_still_reads(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('instruction,output\n"two\nlines",x\nplain,"with ""quotes"""\n', encoding="utf-8")
    assert [r.data for r in load_records(str(path))] == [{"instruction": "two\nlines", "output": "x"},
                                                         {"instruction": "plain", "output": 'with "quotes"'}]


def test_hub_and_parquet_records_are_checked_too():
    from lorafit.data.sources import check_records

    with pytest.raises(DataError, match=r"org/x row 1: .*messages\[0\].content holds a NUL"):
        check_records([Record(OK, "org/x row 0"),
                       Record({"messages": [{"role": "user", "content": "\x00"}]}, "org/x row 1")])


def test_missing_values_are_not_text():
    with pytest.raises(DataError, match="field 'output' of the record at r1 is null"):
        to_conversations([Record({"instruction": "a", "output": None}, "r1")], "alpaca")
    with pytest.raises(DataError, match="field 'output' .* is nan"):  # a Parquet/pandas NaN cell
        to_conversations([Record({"instruction": "a", "output": float("nan")}, "r1")], "alpaca")
    conv = to_conversations([Record({"instruction": "a", "input": float("nan"), "output": "b"}, "r1")], "alpaca")
    assert "input" not in conv[0][0]  # an optional missing cell is empty, not the text 'nan'


@pytest.mark.parametrize("data,expected", [
    ("\ufeff" + json.dumps(OK), "UTF-16"),
    (json.dumps(OK), r"UTF-16 \(no byte-order mark\)"),
])
def test_utf16_is_named_not_sent_to_latin1(tmp_path, data, expected):
    path = tmp_path / "w.jsonl"
    path.write_bytes(data.encode("utf-16-le"))
    with pytest.raises(DataError, match=expected) as e:
        load_records(str(path))
    assert "-f UTF-16" in e.value.fix and "latin1" not in e.value.fix


def test_paths_that_are_not_files_say_what_they_are(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match="is a FIFO"):
        load_records(str(fifo))
    with pytest.raises(DataError, match="broken symbolic link"):
        load_records(str(tmp_path / "link.jsonl"))
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_yaml(tmp_path)
    with pytest.raises(ConfigError, match="is a FIFO"):
        load_yaml(fifo)


def test_oasst_cycle_is_refused_quickly():
    """A repeated message_id made the walk loop forever (1.8 GB in 20 s)."""
    rows = [{"message_id": "a", "parent_id": None, "role": "prompter", "text": "q"},
            {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "r"},
            {"message_id": "a", "parent_id": "b", "role": "prompter", "text": "again"}]
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"record at r2 repeats message_id 'a' of the record at r0"):
        to_conversations([Record(r, f"r{i}") for i, r in enumerate(rows)], "oasst")
    assert time.monotonic() - t0 < 1


# -- parsing limits on their own -----------------------------------------------------------------------------

def test_parsing_limits():
    assert json_loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)  # just inside the limit
    for text in ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), '"\\ud800"', "NaN", "1" * 5000, DEEP):
        with pytest.raises(BadInput):
            json_loads(text)
    levels = zip("abcdefgh", "bcdefghi", strict=True)
    bomb = "a: &a [1]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in levels)
    t0 = time.monotonic()
    assert yaml_load(bomb)["a"] == [1]  # 9**8 references, each list visited once
    assert time.monotonic() - t0 < 2


# -- recipes and flags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,expected", [
    (os.urandom(64) + b"\xff", "not UTF-8"),
    (b"- lora_r\n- 8\n", "must hold a mapping"),
    (b"[" * 5000, "deeper than Python can parse"),
    (b"lora_r: [1\n", "not valid YAML"),
    (b"1: 2\n", "field named 1"),
    (b"lora_r: " + b"9" * 5000 + b"\n", "cannot be read"),
])
def test_broken_recipes_are_config_errors(tmp_path, content, expected):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        build_config(path)


def test_flat_model_field_is_not_a_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: org/some-model\nlora_r: 8\n")
    assert build_config(path).model.model == "org/some-model"
    path.write_text("model: {model: org/other, load_in_4bit: true}\n")
    cfg = build_config(path)
    assert cfg.model.model == "org/other" and cfg.model.load_in_4bit


@pytest.mark.parametrize("key,value,expected", [
    ("seed", "-1", "'seed' must be"), ("seed", str(2**32), "'seed' must be"),
    ("adam_beta1", "1.5", "'adam_beta1' must be in"), ("adam_beta2", "1", "'adam_beta2' must be in"),
    ("adam_epsilon", "-1", "'adam_epsilon' must be > 0"), ("adam_epsilon", "0", "'adam_epsilon' must be > 0"),
    ("weight_decay", "nan", "finite number"), ("learning_rate", "inf", "finite number"),
])
def test_ranges(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config(None, {key: value})


@pytest.mark.parametrize("content", [b"\x89PNG\x00\x01garbage\xff", b"- 1\n- 2\n", b"model: [unclosed\n"])
def test_damaged_run_config_is_one_message(tmp_path, content):
    from lorafit.run_dir import load_run_config

    (tmp_path / "config.yaml").write_bytes(content)
    with pytest.raises(UserError, match="run config") as e:
        load_run_config(tmp_path)
    assert "train the run again" in e.value.fix


def test_output_dir_that_is_a_file_or_virtual(tmp_path):
    from lorafit.train.checkpoint import check_disk_space
    from lorafit.train.run_files import check_output_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_dir(build_config(None, {"output_dir": str(tmp_path / "f")}), tmp_path / "f")
    with pytest.raises(UserError, match="virtual filesystem"):
        check_disk_space(Path("/proc/lorafit-run"), 1)
