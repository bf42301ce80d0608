"""`lorafit serve` as a hostile web page or client meets it: Host / Origin / content type / API key checks, CORS,
malformed and lying requests, a 64-request burst, prefill and response_format, a bounded SIGTERM.

One server (tiny model) with --api_key, --cors_origins and a 2 s --timeout serves the module; the last test stops it.
"""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import subprocess_env

KEY = "s3cret-key"
APP = "http://app.example:3000"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
USER = [{"role": "user", "content": "What is the sum of 3 and 4?"}]


class Server:
    """`python -m lorafit serve` in a child process; host and port read from what it prints."""

    def __init__(self, run_dir: Path, log: Path, *extra: str):
        self.run_dir, self.log, self._out = run_dir, log, log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", "--adapter_path", str(run_dir),
                                      "--port", "0", *extra], stdout=self._out, stderr=subprocess.STDOUT,
                                     env=subprocess_env())
        deadline = time.monotonic() + 180  # a loaded 2-core CI box takes ~60 s to import torch + transformers
        while not (m := re.search(r"serving '[^']+' at http://([\d.]+):(\d+)", log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        self.host, self.port = m.group(1), int(m.group(2))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, llama_run):
    root = tmp_path_factory.mktemp("serve-guard")
    srv = Server(llama_run, root / "server.log", "--api_key", KEY, "--cors_origins", APP, "--timeout", "2")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()
    srv._out.close()


def request(srv, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None,
            timeout: float = 60):
    """(status, headers, parsed JSON or None)."""
    if isinstance(body, dict):
        body = json.dumps(body)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    conn.request(method, path, body=body, headers=AUTH if headers is None else headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), (json.loads(raw) if raw else None)


CHAT = {"messages": USER, "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("headers,status,code", [
    ({**AUTH, "Host": "evil.example"}, 403, "host_not_allowed"),            # DNS rebinding
    ({**AUTH, "Host": "127.0.0.1.evil.example:80"}, 403, "host_not_allowed"),
    ({**AUTH, "Origin": "http://evil.example"}, 403, "origin_not_allowed"),  # a page the user happens to open
    ({**AUTH, "Origin": "null"}, 403, "origin_not_allowed"),
    ({**AUTH, "Content-Type": "text/plain"}, 415, "unsupported_media_type"),  # a CORS "simple request"
    ({"Content-Type": "application/json"}, 401, "invalid_api_key"),
    ({**AUTH, "Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
], ids=["host", "host-suffix", "origin", "origin-null", "text-plain", "no-key", "wrong-key"])
def test_foreign_requests_are_refused(guarded, headers, status, code):
    got, _, body = request(guarded, "POST", "/v1/chat/completions", CHAT, headers)
    assert (got, body["error"]["code"]) == (status, code), body


def test_own_names_listed_origins_and_the_key_pass(guarded):
    for host in ("localhost", f"127.0.0.1:{guarded.port}", "LOCALHOST:1"):
        assert request(guarded, "POST", "/v1/chat/completions", CHAT, {**AUTH, "Host": host})[0] == 200
    status, headers, _ = request(guarded, "POST", "/v1/chat/completions", CHAT, {**AUTH, "Origin": APP})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == APP
    own = f"http://127.0.0.1:{guarded.port}"  # the chat page's own fetches
    assert request(guarded, "GET", "/health", None, {"Origin": own})[0] == 200  # no key needed outside /v1


def test_preflight_and_other_methods(guarded):
    status, headers, _ = request(guarded, "OPTIONS", "/v1/chat/completions", None,
                                 {"Origin": APP, "Access-Control-Request-Method": "POST"})
    assert status == 204 and "Authorization" in headers["Access-Control-Allow-Headers"]
    for method in ("OPTIONS", "PUT", "DELETE", "PATCH"):
        status, headers, body = request(guarded, method, "/v1/chat/completions", "{}")
        assert status == 405 and headers["Content-Type"] == "application/json", (method, body)
        assert body["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("raw", [
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',        # lone surrogate
    b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",              # past the recursion limit
    b'{"messages": ' + b"[" * 80 + b"]" * 80 + b"}",                  # past MAX_DEPTH
    b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}",          # past Python's digit limit
    b'{"messages": [], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "a\\u0000b"}]}',
    b'{"messages": "\xff"}',
], ids=["surrogate", "deep", "depth-limit", "huge-int", "nan", "nul", "not-utf8"])
def test_malformed_bodies_are_400(guarded, raw):
    status, _, body = request(guarded, "POST", "/v1/chat/completions", raw)
    assert status == 400 and body["error"]["code"] == "invalid_json", body


def test_response_format_and_n_refused_prefill_continued(guarded):
    json_mode = {**CHAT, "response_format": {"type": "json_object"}}
    status, _, body = request(guarded, "POST", "/v1/chat/completions", json_mode)
    assert (status, body["error"]["param"]) == (400, "response_format")
    assert request(guarded, "POST", "/v1/chat/completions", {**CHAT, "n": 2})[0] == 400
    assert request(guarded, "POST", "/v1/chat/completions", {**CHAT, "response_format": {"type": "text"}})[0] == 200
    from transformers import AutoTokenizer

    from lorafit.data.templates import Template, render_prompt
    from lorafit.run_dir import load_run_config

    tokenizer = AutoTokenizer.from_pretrained(load_run_config(guarded.run_dir).model.model)
    prefill = "the answer is"
    messages = [*USER, {"role": "assistant", "content": prefill}]
    chat = {"messages": messages, "max_tokens": 4, "temperature": 0}
    _, _, got = request(guarded, "POST", "/v1/chat/completions", chat)
    _, _, plain = request(guarded, "POST", "/v1/chat/completions", {**chat, "messages": USER})
    # The continuation of the prefilled reply is the raw completion of the rendered prompt + prefill.
    prompt = render_prompt(Template.load(guarded.run_dir), messages, tokenizer, continue_last=True)
    assert prompt.endswith("assistant\n" + prefill)
    _, _, raw = request(guarded, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert got["choices"][0]["message"]["content"] == raw["choices"][0]["text"]
    assert got["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # the prefill was not dropped


def _send_raw(srv, data: bytes, wait: float) -> bytes:
    with socket.create_connection((srv.host, srv.port), timeout=wait) as s:
        s.sendall(data)
        try:
            return s.recv(65536)
        except TimeoutError:
            return b""


def test_lying_and_slow_clients_are_answered_in_bounded_time(guarded):
    head = f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n" \
           "Content-Type: application/json\r\n"
    t0 = time.monotonic()
    assert b" 400 " in _send_raw(guarded, (head + "Content-Length: -1\r\n\r\n").encode(), 10).split(b"\r\n")[0]
    assert b" 408 " in _send_raw(guarded, (head + "Content-Length: 100\r\n\r\n{\"pro").encode(), 10).split(b"\r\n")[0]
    assert b" 411 " in _send_raw(guarded, (head + "\r\n").encode(), 10).split(b"\r\n")[0]
    assert time.monotonic() - t0 < 8  # the 2 s --timeout, not forever


def test_a_burst_of_64_requests_is_queued_not_reset(guarded):
    barrier, results = threading.Barrier(64), []

    def one() -> None:
        barrier.wait()
        try:
            results.append(request(guarded, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 2},
                                   timeout=300)[0])
        except OSError as e:  # ConnectionResetError, refused: what a backlog of 5 gave
            results.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [200] * 64, results


def test_sigterm_with_a_half_sent_request_stops_within_the_bound(guarded):
    """Runs last."""
    s = socket.create_connection((guarded.host, guarded.port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 500\r\n\r\n{")
    time.sleep(0.3)
    t0 = time.monotonic()
    guarded.proc.send_signal(signal.SIGTERM)
    assert guarded.proc.wait(timeout=20) == 0
    assert time.monotonic() - t0 < 15
    s.close()
    log = guarded.log.read_text()
    assert "Traceback" not in log, log
