"""Sources and formats: files, folders, hub path (through a local folder), detection, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_cfg, shared_file

from lorafit.data.encode import load_conversations
from lorafit.data.formats import detect_format, to_conversations
from lorafit.data.sources import Record, load_hub, load_records
from lorafit.errors import DataError

ROWS = [{"instruction": "Name a color.", "input": "", "output": "Blue"},
        {"instruction": "Double it.", "input": "21", "output": "42"}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _convs(path, **data):
    return load_conversations(make_cfg(str(path), **data))


def test_json_jsonl_csv_parquet_and_folder_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    _jsonl(tmp_path / "b.jsonl", ROWS)
    (tmp_path / "c.csv").write_text('instruction,input,output\nName a color.,,Blue\nDouble it.,21,42\n',
                                    encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    expected = _convs(tmp_path / "a.json")
    assert expected == ([[{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue"}],
                         [{"role": "user", "content": "Double it.", "input": "21"},
                          {"role": "assistant", "content": "42"}]], "alpaca")
    for name in ("b.jsonl", "c.csv", "d.parquet"):
        assert _convs(tmp_path / name) == expected, name
    convs, fmt = _convs(tmp_path)
    assert fmt == "alpaca" and len(convs) == 8


def test_folder_prefers_the_split_files(tmp_path):
    _jsonl(tmp_path / "train.jsonl", ROWS)
    _jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert len(_convs(tmp_path)[0]) == 2
    assert len(_convs(tmp_path, dataset_split="test")[0]) == 1


def test_split_of_one_file_or_a_folder_without_it_is_a_user_error(tmp_path, capsys):
    """--dataset_split names a hub split or a folder's split file; on one file it was silently ignored."""
    from lorafit.cli import main

    (tmp_path / "one").mkdir()
    one = _jsonl(tmp_path / "one" / "data.jsonl", ROWS)
    assert len(_convs(one, dataset_split="train")[0]) == 2
    for source in (str(one), "demo"):
        with pytest.raises(DataError, match="dataset_split 'validation' applies to hub datasets"):
            _convs(source, dataset_split="validation")
    with pytest.raises(DataError, match="no file for dataset_split 'validation'.*data.jsonl"):
        _convs(one.parent, dataset_split="validation")
    assert len(_convs(one.parent)[0]) == 2  # a folder without split names is all train
    assert main(["data", str(one), "--dataset_split", "validation"]) == 2
    err = capsys.readouterr().err
    assert "dataset_split" in err and "Traceback" not in err


def test_hub_path_through_datasets_with_a_local_folder(tmp_path, monkeypatch):
    """The hub is unreachable here: a local folder goes through the same `datasets.load_dataset` call."""
    import datasets

    folder = tmp_path / "alpaca-cleaned"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ROWS)
    records = load_hub(str(folder), "train")
    assert [r.data["output"] for r in records] == ["Blue", "42"] and "row 1" in records[1].where

    real = datasets.load_dataset
    calls = []

    def fake_hub(name, *args, **kwargs):
        calls.append(name)
        return real(str(folder) if name == "yahma/alpaca-cleaned" else name, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    convs, fmt = load_conversations(make_cfg("yahma/alpaca-cleaned"))
    assert calls == ["yahma/alpaca-cleaned"] and fmt == "alpaca" and len(convs) == 2
    with pytest.raises(DataError, match="could not load dataset"):
        load_hub(str(folder), "validation")


def _records(rows: list[dict]) -> list[Record]:
    return [Record(r, f"mem record {i}") for i, r in enumerate(rows)]


def test_detects_every_format():
    cases = {
        "alpaca": [{"instruction": "a", "input": "", "output": "b"}],
        "instruction": [{"instruction": "a", "response": "b"}],
        "prompt_completion": [{"prompt": "a", "completion": "b"}],
        "messages": [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
        "guanaco": [{"text": "### Human: a### Assistant: b"}],
        "text": [{"text": "just some text"}],
        "oasst": [{"message_id": "1", "parent_id": None, "role": "prompter", "text": "a"}],
    }
    for fmt, rows in cases.items():
        assert detect_format(_records(rows)) == fmt
    with pytest.raises(DataError, match="cannot tell"):
        detect_format(_records([{"question": "a", "answer": "b"}]))


def test_guanaco_multi_turn_and_messages_roles():
    text = "### Human: Hi there### Assistant: Hello!### Human: 2+2?### Assistant: 4"
    (conv,) = to_conversations(_records([{"text": text}]), "guanaco")
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    assert conv[1]["content"] == "Hello!" and conv[3]["content"] == "4"
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                  {"from": "human", "value": "unanswered"}]}
    (conv,) = to_conversations(_records([sharegpt]), "messages")
    assert conv == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_oasst_follows_best_ranked_replies():
    rows = [
        {"message_id": "r", "parent_id": None, "role": "prompter", "text": "Question?"},
        {"message_id": "a1", "parent_id": "r", "role": "assistant", "text": "worse", "rank": 1},
        {"message_id": "a0", "parent_id": "r", "role": "assistant", "text": "best", "rank": 0},
        {"message_id": "f", "parent_id": "a0", "role": "prompter", "text": "Follow-up?"},
        {"message_id": "g", "parent_id": "f", "role": "assistant", "text": "Answer.", "rank": None},
        {"message_id": "lone", "parent_id": None, "role": "prompter", "text": "Nobody answered"},
    ]
    (conv,) = to_conversations(_records(rows), "oasst")
    assert [m["content"] for m in conv] == ["Question?", "best", "Follow-up?", "Answer."]
    nested = {"prompt": {"role": "prompter", "text": "Q", "replies": [
        {"role": "assistant", "text": "B", "rank": 1}, {"role": "assistant", "text": "A", "rank": 0}]}}
    assert to_conversations(_records([nested]), "oasst") == [[{"role": "user", "content": "Q"},
                                                               {"role": "assistant", "content": "A"}]]



@pytest.mark.parametrize("role", [[], {"a": 1}, "moderator"])
def test_oasst_role_that_is_not_a_known_string_is_a_data_error(role):
    """(found by the property test: a list role raised TypeError instead of naming the record)"""
    nested = {"prompt": {"role": role, "text": "Q", "replies": []}}
    with pytest.raises(DataError, match="record 0 has role"):
        to_conversations(_records([nested]), "oasst")


def test_column_map_and_format_override(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "answer": "a1"}])
    convs, fmt = _convs(path, column_map="question=prompt,answer=completion")
    assert fmt == "prompt_completion" and convs[0][1]["content"] == "a1"
    path = _jsonl(tmp_path / "t.jsonl", [{"body": "### Human: a### Assistant: b"}])
    assert _convs(path, dataset_text_field="body")[1] == "guanaco"
    assert _convs(path, dataset_text_field="body", dataset_format="text")[1] == "text"


# -- bad input: one clear DataError each ----------------------------------------------------------

def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        _convs(path)
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a",\n  "output": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3"):
        _convs(path)


def test_missing_field_names_field_and_record(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [ROWS[0], {"instruction": "no answer"}, ROWS[1]])
    with pytest.raises(DataError, match=r"m\.jsonl:2 has no field 'output'"):
        _convs(path, dataset_format="alpaca")


def test_csv_missing_column(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("instruction,input\nhello,\n", encoding="utf-8")
    with pytest.raises(DataError, match="CSV file .* has no column 'output'"):
        _convs(path, dataset_format="alpaca")


def test_non_utf8_text(tmp_path):
    path = tmp_path / "latin.jsonl"
    latin = '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + latin)
    with pytest.raises(DataError, match=r"latin\.jsonl:2' is not UTF-8") as err:
        _convs(path)
    assert "iconv" in err.value.fix


def test_unknown_format_missing_path_and_empty(tmp_path):
    path = _jsonl(tmp_path / "ok.jsonl", ROWS)
    with pytest.raises(DataError, match="unknown dataset format 'sharegpt'"):
        to_conversations(_records(ROWS), "sharegpt")
    with pytest.raises(DataError, match="does not exist"):
        _convs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        _convs("./no/such/dir")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no records"):
        _convs(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="holds no records"):
        _convs(tmp_path / "empty.json")
    assert _convs(path)[1] == "alpaca"


def test_record_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["a", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:1 is a list"):
        _convs(path)


def test_demo_source():
    convs, fmt = load_conversations(make_cfg("demo", demo_size=50))
    assert fmt == "alpaca" and len(convs) == 50
    assert len(load_records("demo", demo_size=20)) == 20


def test_shared_alpaca_and_messages_files():
    convs, fmt = _convs(shared_file("alpaca_en_demo.json"))
    assert fmt == "alpaca" and len(convs) == 899
    convs, fmt = _convs(shared_file("messages_demo.jsonl"))
    assert fmt == "messages" and len(convs) == 404 and all(c[-1]["role"] == "assistant" for c in convs)
