"""Property tests: random and broken records either load or raise lorafit's DataError, nothing else."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from helpers import make_cfg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.data.batching import epoch_steps, step_passes
from lorafit.data.encode import encode_many, load_conversations
from lorafit.data.formats import FORMATS, detect_format, to_conversations
from lorafit.data.sources import Record
from lorafit.data.templates import Template
from lorafit.errors import DataError

FIELDS = ["instruction", "input", "output", "response", "prompt", "completion", "text", "messages", "conversations",
          "message_id", "parent_id", "role", "rank", "system"]
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["role", "content", "from", "value", "text", "replies"]), inner, max_size=4), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot", 3]),
                                           "content": st.text(max_size=15) | st.none() | st.integers()}), max_size=4)
records = st.dictionaries(st.sampled_from(FIELDS), json_values | messages | st.text(max_size=30), max_size=5)
PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_file(name: str, content: bytes, **data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(content)
        try:
            return load_conversations(make_cfg(str(path), **data))
        except DataError:
            return None


@PROPS
@given(st.lists(records | json_values, max_size=6), st.sampled_from(["auto", *FORMATS]))
def test_random_jsonl_records_load_or_raise_data_error(rows, fmt):
    result = _load_file("r.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(), dataset_format=fmt)
    if result is not None:
        convs, _ = result
        assert convs and all(c and c[-1]["role"] == "assistant" for c in convs)
        assert all(isinstance(m["content"], str) for c in convs for m in c)


@PROPS
@given(st.binary(max_size=200), st.sampled_from(["x.json", "x.jsonl", "x.csv", "x.parquet"]))
def test_random_bytes_load_or_raise_data_error(content, name):
    _load_file(name, content)


@PROPS
@given(st.text(max_size=300), st.sampled_from(["x.json", "x.jsonl", "x.csv"]))
def test_random_text_load_or_raise_data_error(text, name):
    _load_file(name, text.encode("utf-8", "surrogatepass"))


@PROPS
@given(st.lists(records, min_size=1, max_size=6))
def test_detect_and_convert_in_memory(rows):
    recs = [Record(r, f"record {i}") for i, r in enumerate(rows)]
    try:
        fmt = detect_format(recs)
        convs = to_conversations(recs, fmt)
    except DataError:
        return
    assert all(m["role"] in ("system", "user", "assistant") for c in convs for m in c)


conversation = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(max_size=40)), min_size=1,
                        max_size=5).map(lambda turns: [{"role": r, "content": c} for r, c in turns]
                                        + [{"role": "assistant", "content": "end"}])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(conversation, min_size=1, max_size=4), st.sampled_from(["alpaca", "instruction", "guanaco", "chatml"]),
       st.integers(4, 64), st.booleans())
def test_labels_align_and_respect_max_length(tok, convs, name, max_len, train_on_inputs):
    t = Template(name, eos_token=tok.eos_token, end_of_turn="<|im_end|>" if name == "chatml" else None)
    if name == "chatml":
        from lorafit.data.templates import CHATML

        t.chat_template = CHATML
    for enc in encode_many(t, convs, tok, max_len, train_on_inputs, "truncate"):
        assert len(enc.input_ids) == len(enc.labels) <= max_len
        assert enc.labels[0] == -100
        assert all(label in (-100, tid) for tid, label in zip(enc.input_ids, enc.labels, strict=True))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(1, 5), st.booleans(), st.integers(1, 4),
       st.integers(0, 3))
def test_every_example_is_batched_once_per_epoch(lengths, batch_size, packing, world, seed):
    steps = epoch_steps(lengths, batch_size * world, packing=packing, max_seq_length=48, seed=seed, epoch=0)
    seen = []
    for step in steps:
        assert 1 <= len(step) <= batch_size * world
        if packing:
            assert all(sum(lengths[i] for i in row) <= 48 or len(row) == 1 for row in step)
        per_rank = [step_passes(step, lengths, 48, 64, r, world) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1
        seen += [i for passes in per_rank for p in passes if p.counted for i in p.records]
    assert sorted(seen) == list(range(len(lengths)))
