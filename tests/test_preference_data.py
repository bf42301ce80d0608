"""Preference data: the pair shapes public datasets use, hub ids through a local stand-in, truncation,
the report, and pair batches (two documents per row, reply tokens labelled)."""
from __future__ import annotations

import pytest
from helpers import REPO, make_cfg, write_jsonl

from lorafit.data.pairs import load_preference_records
from lorafit.data.preference import CHOSEN, REJECTED, collate_preference, prepare_preference
from lorafit.data.records import IGNORE_INDEX
from lorafit.errors import DataError

HH_CHOSEN = "\n\nHuman: what is an apple?\n\nAssistant: a fruit\n\nHuman: and a banana?\n\nAssistant: also a fruit"
HH_REJECTED = "\n\nHuman: what is an apple?\n\nAssistant: a fruit\n\nHuman: and a banana?\n\nAssistant: no idea"
ULTRA = {"chosen": [{"role": "user", "content": "sort the number"}, {"role": "assistant", "content": "done"}],
         "rejected": [{"role": "user", "content": "sort the number"}, {"role": "assistant", "content": "no"}],
         "score_chosen": 8.0, "score_rejected": 3.0}
ORCA = {"system": "be brief", "input": "add the number", "chosen": "42", "rejected": "forty", "status": "tie"}


def _load(tmp_path, records, kto=False, **column_map):
    return load_preference_records(str(write_jsonl(tmp_path / "d.jsonl", records)), "train", column_map, kto)


def test_pair_shapes(tmp_path):
    (s,) = _load(tmp_path, [{"prompt": "hello", "chosen": "world", "rejected": "apple"}])
    assert s.prompt == [{"role": "user", "content": "hello"}] and s.replies == ("world", "apple")
    (u,) = _load(tmp_path, [ULTRA])
    assert u.prompt == [{"role": "user", "content": "sort the number"}] and u.replies == ("done", "no")
    (h,) = _load(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    assert [m["role"] for m in h.prompt] == ["user", "assistant", "user"] and h.prompt[-1]["content"] == "and a banana?"
    assert h.replies == ("also a fruit", "no idea")
    (h2,) = _load(tmp_path, [{"chosen": HH_CHOSEN.lstrip(), "rejected": HH_REJECTED.lstrip()}])
    assert h2.prompt == h.prompt  # a text that starts at 'Human:' without the blank line
    (o,) = _load(tmp_path, [ORCA])
    assert o.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add the number"}]
    (m,) = _load(tmp_path, [{"question": "q", "good": "a", "bad": "b"}], good="chosen", bad="rejected")
    assert m.replies == ("a", "b")


def test_kto_records_and_pairs_as_kto(tmp_path):
    recs = _load(tmp_path, [{"prompt": "q", "completion": "a", "label": True},
                            {"prompt": "q", "completion": "b", "label": "false"}], kto=True)
    assert [(r.replies, r.label) for r in recs] == [(("a",), True), (("b",), False)]
    unpaired = _load(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}], kto=True)
    assert [(r.replies, r.label) for r in unpaired] == [(("a",), True), (("b",), False)]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, "has no 'rejected'"),
    ({"chosen": "plain text a", "rejected": "plain text b"}, "no shared prefix ending at an 'Assistant:' turn"),
    ({"chosen": ULTRA["chosen"], "rejected": [{"role": "user", "content": "other"},
                                              {"role": "assistant", "content": "x"}]}, "do not share the turns"),
    ({"prompt": "q", "chosen": ULTRA["chosen"], "rejected": "text"}, "both be text or both message lists"),
])
def test_bad_pairs_name_the_record(tmp_path, record, message):
    with pytest.raises(DataError, match=message) as e:
        _load(tmp_path, [record])
    assert "d.jsonl:1" in str(e.value)


def test_hub_ids_through_a_local_stand_in(tmp_path, monkeypatch):
    import datasets

    folders = {}
    for name, rows in {"trl-lib/ultrafeedback_binarized": [ULTRA] * 3,
                       "Anthropic/hh-rlhf": [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}] * 3,
                       "argilla/distilabel-intel-orca-dpo-pairs": [ORCA] * 3}.items():
        folder = tmp_path / name.replace("/", "__")
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", rows)
        folders[name] = str(folder)
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: real(folders.get(name, name), *a, **k))
    for name in folders:
        recs = load_preference_records(name, "train", {}, False)
        assert len(recs) == 3 and all(len(r.replies) == 2 and r.prompt[-1]["role"] == "user" for r in recs), name


def test_truncation_keeps_prompt_tail_and_reply_head_and_reports(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    long_prompt = " ".join(f"apple {i}" for i in range(60)) + " banana end"
    rows = [{"prompt": long_prompt, "chosen": "the " * 40, "rejected": "a"},
            {"prompt": "hello", "chosen": "same", "rejected": "same"},
            {"prompt": "world", "chosen": "", "rejected": "x"}]
    cfg = make_cfg(str(write_jsonl(tmp_path / "p.jsonl", rows)), max_seq_length=48, val_size=0, template="chatml")
    cfg.train.method = "dpo"
    data = prepare_preference(cfg, tok)
    first = next(e for e in data.train if e.messages[-1]["content"].startswith("the"))
    assert all(len(first.prompt_ids) + len(r) <= 48 for r in first.replies)
    assert tok.decode(first.prompt_ids).endswith("banana end<|im_end|>\n<|im_start|>assistant\n")  # the tail kept
    assert tok.decode(first.replies[0]).startswith("the the")  # the head kept
    r = data.report
    assert r["prompts_cut"] == 1 and r["replies_cut"] == 1 and r["identical_pairs"] == 1 and r["empty_replies"] == 1
    assert r["train_examples"] == 3 and len(r["fingerprint"]) == 64


def test_pair_batch_is_two_documents_per_row_with_reply_labels(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rows = [{"prompt": f"hello {i}", "chosen": "apple the", "rejected": "banana"} for i in range(3)]
    cfg = make_cfg(str(write_jsonl(tmp_path / "p.jsonl", rows)), max_seq_length=64, val_size=0, template="chatml")
    cfg.train.method = "dpo"
    data = prepare_preference(cfg, tok)
    batch = collate_preference(data.train)
    assert batch["input_ids"].shape[0] == 1 and batch["seq_kind"].tolist() == [CHOSEN, REJECTED] * 3
    start = 0
    for k, e in enumerate(data.train[i] for i in batch["seq_example"][::2].tolist()):
        n_p, n_c, n_r = len(e.prompt_ids), len(e.replies[0]), len(e.replies[1])
        row = slice(start, start + 2 * n_p + n_c + n_r)
        doc = batch["doc_ids"][0, row]
        assert doc[: n_p + n_c].eq(2 * k + 1).all() and doc[n_p + n_c:].eq(2 * k + 2).all()
        assert batch["position_ids"][0, start + n_p + n_c] == 0  # positions restart with the rejected sequence
        labelled = batch["labels"][0, row] != IGNORE_INDEX
        assert int(labelled.sum()) == n_c + n_r  # reply tokens only (end-of-turn included)
        assert batch["labels"][0, start + n_p: start + n_p + n_c].tolist() == e.replies[0]
        start = row.stop


def test_conciseness_pairs_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("conciseness_pairs", REPO / "scripts" / "conciseness_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    long_a, long_b = "word " * 150, "word " * 120
    msgs = [{"message_id": "p", "parent_id": None, "role": "prompter", "text": "q", "lang": "en"},
            {"message_id": "a", "parent_id": "p", "role": "assistant", "text": long_a, "rank": 0},
            {"message_id": "b", "parent_id": "p", "role": "assistant", "text": "short answer", "rank": 2},
            {"message_id": "c", "parent_id": "p", "role": "assistant", "text": long_b, "rank": 1},
            {"message_id": "q", "parent_id": None, "role": "prompter", "text": "only short", "lang": "en"},
            {"message_id": "d", "parent_id": "q", "role": "assistant", "text": "fine", "rank": 0}]
    assert mod.conciseness_pairs(msgs, 100, "en") == [{"prompt": "q", "chosen": "short answer", "rejected": long_b}]


def test_data_command_reports_pairs_and_completions(tmp_path, tiny_tokenizer_dir, capsys):
    from lorafit.data.check import data_command

    rows = [{"prompt": f"q {i}", "chosen": "same" if i == 0 else "apple", "rejected": "same" if i == 0 else "b"}
            for i in range(6)]
    for method in ("dpo", "kto"):
        cfg = make_cfg(str(write_jsonl(tmp_path / "p.jsonl", rows)), val_size=0)
        cfg.model.model = str(tiny_tokenizer_dir)
        cfg.train.method = method
        assert data_command(cfg) == 0
        out = capsys.readouterr().out
        assert ("desirable / undesirable" in out) == (method == "kto")
        assert ("1 pairs have identical chosen and rejected" in out) == (method == "dpo")
