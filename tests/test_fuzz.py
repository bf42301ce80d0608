"""Fuzzing the two doors hostile input comes through: dataset files and the HTTP API.

Data: files of random and of structured-but-nasty bytes (deep nesting, lone surrogates, NaN, huge integers, NUL,
byte-order marks, stray quotes) -> records and conversations, or a UserError; never another exception, never
longer than BOUND_S. HTTP: random bodies and headers against an in-process server over the tiny model -> a 2xx
or 4xx answer with a JSON body; never a 500, a reset or a hang. A fixed derandomized profile keeps CI repeatable
(about 20 s together on a 2-core box).
"""
from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.data.formats import detect_format, to_conversations
from lorafit.data.sources import load_records
from lorafit.errors import UserError

BOUND_S = 10.0
"""Longest any one input may take (the slowest seen is ~0.2 s; the margin is for a loaded CI box)."""
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

NASTY = ["[" * 3000, "]" * 10, '"\\ud800"', '"\\udfff\\ud800"', "1" * 4400, "NaN", "-Infinity", '"\\u0000"', "\x00",
         '"', '""', "\ufeff", "\r\n", ",", "{", "}", ":", "null", '{"messages": ', '"role": "user"',
         '"message_id": "a"', '"parent_id": "a"', '"instruction"', '"output"', "\\", "\u2028"]
KEYS = ["instruction", "input", "output", "messages", "role", "content", "text", "message_id", "parent_id", "prompt",
        "completion", "response"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from(["\ud800", "a\x00b", "x" * 50]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS), inner, max_size=4), max_leaves=10)
# JSON text where a value may be nested past the recursion limit (no strategy of objects reaches 1000 levels)
deep = st.sampled_from([70, 3000, 20000]).map(lambda n: "[" * n + "]" * n)


def _json_text(draw, value) -> str:
    text = json.dumps(value, allow_nan=True)
    if draw(st.booleans()) and text.endswith("}") and text != "{}":
        text = text[:-1] + ', "x": ' + draw(deep | st.sampled_from(NASTY[1:])) + "}"
    return text


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".json", ".jsonl", ".csv"]))
    kind = draw(st.sampled_from(["random", "pieces", "records"]))
    if kind == "random":
        raw = draw(st.binary(max_size=300))
    elif kind == "pieces":
        raw = "".join(draw(st.lists(st.sampled_from(NASTY) | st.text(max_size=8), max_size=30))).encode(
            "utf-8", "surrogatepass")
    else:
        rows = draw(st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=5), min_size=1, max_size=6))
        lines = [_json_text(draw, r) for r in rows]
        text = "\n".join(lines) if suffix != ".json" else "[" + ", ".join(lines) + "]"
        raw = text.encode("utf-8", "surrogatepass")
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe"]))
    return suffix, prefix + raw


@FUZZ
@given(data_files())
def test_data_loaders_end_in_records_or_a_user_error(case):
    suffix, raw = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(raw)
        t0 = time.monotonic()
        try:
            records = load_records(str(path))
            if records:
                to_conversations(records, detect_format(records))
        except UserError as e:
            assert e.message and "Traceback" not in str(e)
        assert time.monotonic() - t0 < BOUND_S


# -- HTTP --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(llama_run):
    """The real server classes on 127.0.0.1:0 in this process (loading the model once, in ~2 s)."""
    from lorafit.infer.generate import load_session
    from lorafit.run_dir import load_run_config
    from lorafit.serve.access import Access
    from lorafit.serve.http import ApiServer, App

    run = llama_run
    cfg = load_run_config(run, {"max_new_tokens": 2})
    server = ApiServer(("127.0.0.1", 0), App(load_session(run, cfg), cfg.generate, Access(), timeout=2.0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _small(body):
    """Valid-looking requests generate 2-4 tokens, not a context's worth (the fuzz is about parsing)."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 4:
                body[key] = 4
    return body


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 1]),
                                           "content": values}), max_size=3)
@st.composite
def chat_texts(draw) -> bytes:
    """A chat request whose text may carry a nested value, a lone surrogate, a NUL, NaN or a huge number."""
    body = _small(draw(st.fixed_dictionaries({"messages": messages}, optional={"max_tokens": st.integers(1, 8)})))
    return _json_text(draw, body).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.binary(max_size=200),
    chat_texts(),
    values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"messages": messages}, optional={
        "max_tokens": st.integers(-2, 10**6) | values, "temperature": values, "stop": values, "n": values,
        "stream": st.booleans() | values, "response_format": values, "seed": values, "top_p": values,
        "prompt": values}).map(lambda d: json.dumps(_small(d)).encode()),
    st.sampled_from(NASTY).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
odd_headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8", "",
                                     "multipart/form-data"]),
    "Host": st.sampled_from(["localhost", "127.0.0.1:1", "evil.example", "[::1]:80", ""]),
    "Origin": st.sampled_from(["http://localhost:8000", "http://evil.example", "null"]),
    "Transfer-Encoding": st.sampled_from(["chunked", "gzip"]),
    "Authorization": st.sampled_from(["Bearer x", "Basic y", ""]),
})
# Half the requests are well-formed HTTP, so that their bodies reach the JSON parser and the request checks.
headers = st.one_of(st.just({}), odd_headers).map(lambda h: {"Content-Type": "application/json", **h})


@FUZZ
@given(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/nowhere"]),
       st.sampled_from(["POST", "POST", "GET", "PUT", "OPTIONS"]), bodies, headers)
def test_http_answers_4xx_or_2xx_never_500_reset_or_hang(api, path, method, body, hdrs):
    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=BOUND_S)
    t0 = time.monotonic()
    try:
        conn.putrequest(method, path, skip_host="Host" in hdrs, skip_accept_encoding=True)
        for key, value in hdrs.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    assert time.monotonic() - t0 < BOUND_S
    assert 200 <= resp.status < 500, (resp.status, raw[:300])
    if resp.status >= 400:
        assert "error" in json.loads(raw), raw[:300]
