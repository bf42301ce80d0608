"""prepare_data, the report, `lorafit data` end to end, and the built-in demo set."""
from __future__ import annotations

import json
import re

import pytest
from helpers import make_cfg, shared_file

from lorafit.cli import main
from lorafit.data.check import data_report
from lorafit.data.demo import FAMILIES, demo_records
from lorafit.data.encode import prepare_data
from lorafit.data.report import percentiles
from lorafit.errors import DataError

REPORT_KEYS = {"records", "format", "template", "length_percentiles", "truncated_share", "trained_token_share",
               "no_trained_token_records", "duplicates", "steps_per_epoch", "example", "fingerprint"}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _prompts(examples):
    return [json.dumps(e.messages[0]) for e in examples]


def test_split_is_the_same_every_time_and_follows_the_seed(tok):
    cfg = make_cfg("demo", demo_size=100, val_size=0.1)
    a, b = prepare_data(cfg, tok), prepare_data(cfg, tok)
    assert len(a.val) == 10 and len(a.train) == 90
    assert _prompts(a.val) == _prompts(b.val) and a.fingerprint == b.fingerprint
    cfg.train.seed = 7
    c = prepare_data(cfg, tok)
    assert _prompts(c.val) != _prompts(a.val) and c.fingerprint != a.fingerprint
    assert not set(_prompts(a.val)) & set(_prompts(a.train))


def test_val_count_cap_and_no_shuffle(tok):
    p = prepare_data(make_cfg("demo", demo_size=60, val_size=7, max_examples=40), tok)
    assert len(p.val) == 7 and len(p.train) == 33
    ordered = prepare_data(make_cfg("demo", demo_size=30, val_size=0, shuffle=False), tok)
    assert [e.messages[0]["content"] for e in ordered.train] == [r["instruction"] for r in demo_records(30)]
    with pytest.raises(DataError, match="val_size"):
        prepare_data(make_cfg("demo", demo_size=10, val_size=10), tok)


def test_dedup_counts_and_drops_duplicates(tmp_path, tok):
    rows = [{"instruction": f"Say {i % 4}.", "output": str(i % 4)} for i in range(10)]
    path = _write(tmp_path / "d.jsonl", rows)
    kept = prepare_data(make_cfg(str(path), val_size=0), tok)
    assert kept.report["duplicates"] == 6 and len(kept.train) == 10
    deduped = prepare_data(make_cfg(str(path), val_size=0, dedup=True), tok)
    assert deduped.report["duplicates"] == 6 and len(deduped.train) == 4


def test_report_numbers(tmp_path, tok):
    rows = [{"instruction": "Repeat: " + "la " * (5 * i), "output": "ok " * i} for i in range(1, 21)]
    path = _write(tmp_path / "r.jsonl", rows)
    report = data_report(make_cfg(str(path), max_seq_length=48, val_size=0), tok)
    assert set(report) >= REPORT_KEYS
    assert report["records"] == 20 and report["format"] == "alpaca" and report["template"] == "model"
    pct = report["length_percentiles"]
    assert pct["p50"] <= pct["p90"] <= pct["p95"] <= pct["p99"] <= pct["max"]
    assert 0 < report["truncated_share"] < 1 and report["truncated"] == round(report["truncated_share"] * 20)
    assert 0 < report["trained_token_share"] < 1
    assert report["no_trained_token_records"] > 0  # long prompts cut before the reply starts
    n = report["train_examples"]
    assert report["steps_per_epoch"] == -(-n // 4) and report["records_per_step"] == round(n / -(-n // 4), 2)
    assert {flag for _, flag in report["example"]} == {True, False}
    dropped = data_report(make_cfg(str(path), max_seq_length=48, val_size=0, truncation="drop"), tok)
    assert dropped["dropped"] == report["truncated"] and dropped["truncated"] == 0
    packed = data_report(make_cfg(str(path), max_seq_length=512, val_size=0, packing=True), tok)
    whole = data_report(make_cfg(str(path), max_seq_length=512, val_size=0), tok)
    assert whole["steps_per_epoch"] == 5 and packed["steps_per_epoch"] < 5  # rows of several records, 4 rows a step
    json.dumps(report)  # JSON-serializable as it is


def test_all_records_losing_their_trained_tokens_stops(tmp_path, tok):
    path = _write(tmp_path / "long.jsonl", [{"instruction": "word " * 300, "output": "x"}] * 3)
    with pytest.raises(DataError, match="no training example"):
        prepare_data(make_cfg(str(path), max_seq_length=16, val_size=0), tok)


def test_records_with_no_text_are_skipped_and_reported(tmp_path, tok, capsys, patched_tokenizer):
    """Blank instruction and blank output: nothing but end-of-text would train; left out, counted, located."""
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(6)]
    rows[2] = {"instruction": "", "input": "", "output": ""}
    rows[4] = {"instruction": "  ", "output": "\n"}
    path = _write(tmp_path / "blank.jsonl", rows)
    data = prepare_data(make_cfg(str(path), val_size=0), tok)
    assert len(data.train) == 4 and all(e.messages[0]["content"].strip() for e in data.train)
    assert data.report["empty_records"] == 2
    assert data.report["empty_record_examples"] == [f"{path}:3", f"{path}:5"]
    assert main(["data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 records have no text in any turn" in out and "blank.jsonl:3" in out
    rows[2] = {"instruction": "Say nothing.", "output": " "}  # an instruction with a blank reply: warned, kept
    assert main(["data", str(_write(tmp_path / "blank_reply.jsonl", rows))]) == 0
    assert "1 record has an empty reply" in capsys.readouterr().out
    only_blank = _write(tmp_path / "all_blank.jsonl", [{"instruction": "", "input": "", "output": ""}])
    assert main(["data", str(only_blank)]) == 2
    assert "all 1 records are empty" in capsys.readouterr().err


def test_percentiles():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}
    assert percentiles([]) == {}


# -- `lorafit data` ---------------------------------------------------------------------------------

@pytest.fixture
def patched_tokenizer(monkeypatch, tok):
    import lorafit.data.check

    monkeypatch.setattr(lorafit.data.check, "load_tokenizer", lambda cfg: tok)


def test_cli_data_json_and_human(capsys, patched_tokenizer):
    assert main(["data", "demo", "--demo_size", "60", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= REPORT_KEYS and report["records"] == 60 and report["format"] == "alpaca"
    assert main(["data", "demo", "--demo_size", "60"]) == 0
    out = capsys.readouterr().out
    assert "records" in out and "steps per epoch" in out and "trained" in out


def test_cli_data_without_a_split_for_a_test_file(capsys, patched_tokenizer):
    assert main(["data", "demo", "--demo_size", "60", "--val_size", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_examples"] == 6
    assert main(["data", "demo", "--demo_size", "60", "--val_size", "6", "--split", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["val_examples"] == 0 and report["train_examples"] == 60
    assert main(["data", "demo", "--demo_size", "60", "--split", "none"]) == 0
    out = capsys.readouterr().out
    assert "60 kept, no train/validation split" in out and "validation)" not in out


def test_cli_data_with_a_model_folder(capsys, request):
    try:
        model_dir = request.getfixturevalue("tiny_model_dir")("llama")
    except pytest.FixtureLookupError:
        pytest.skip("conftest provides no tiny_model_dir")
    path = shared_file("alpaca_en_demo.json")
    assert main(["data", str(path), "--model", str(model_dir), "--json", "--max_seq_length", "256"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 899 and report["format"] == "alpaca" and report["truncated_share"] > 0


def test_cli_bad_data_exits_2_without_traceback_or_files(tmp_path, capsys, monkeypatch):
    import lorafit.data.check

    def no_model(cfg):
        raise AssertionError("the tokenizer must not load for bad data")

    monkeypatch.setattr(lorafit.data.check, "load_tokenizer", no_model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\nnot json\n', encoding="utf-8")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = {"bad.jsonl": r"bad\.jsonl:2", "empty.json": "holds no records", "missing.csv": "does not exist"}
    for source, message in cases.items():
        assert main(["data", source]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err
    assert main(["data", "bad.jsonl", "--dataset_format", "yaml"]) == 2
    assert "dataset_format" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_shared_messages_file_report(tok):
    report = data_report(make_cfg(str(shared_file("messages_demo.jsonl")), max_seq_length=1024), tok)
    assert report["format"] == "messages" and report["records"] == 404 and report["trained_token_share"] > 0


# -- built-in demo data -----------------------------------------------------------------------------

def test_demo_is_deterministic_varied_and_short():
    a, b = demo_records(600), demo_records(600)
    assert a == b and a != demo_records(600, seed=1)
    assert 8 <= len(FAMILIES) <= 12 and {r["family"] for r in a} == set(FAMILIES)
    assert len({(r["instruction"], r["input"]) for r in a}) == 600
    for family in FAMILIES:
        rows = [r for r in a if r["family"] == family]
        assert len(rows) >= 30
        assert len({re.sub(r"\d+|'\w+'", "#", r["instruction"])[:25] for r in rows}) >= 2, family  # phrasings
    assert max(len(r["output"]) for r in a) <= 20


def test_demo_answers_are_right():
    days = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
    for r in demo_records(400):
        q, out = r["instruction"] + " " + r["input"], r["output"]
        if m := re.fullmatch(r"What is (\d+) \+ (\d+)\? ", q):
            assert int(out) == int(m[1]) + int(m[2])
        if m := re.search(r"If today is (\w+), what day of the week will it be in (\d+) days", q):
            assert out == days[(days.index(m[1]) + int(m[2])) % 7]
        if "ascending" in q or "smallest to largest" in q:
            nums = [int(x) for x in re.findall(r"\d+", q)]
            assert out == ", ".join(map(str, sorted(nums)))
        if m := re.search(r"'(\w+)' in capital letters", q):
            assert out == m[1].upper()
