"""`lorafit serve` end to end: a real server process, the official openai client, raw HTTP for malformed
requests, and the chat page in headless Chromium (driven over DevTools on a pipe: no pip package needed).

One server process serves the whole module (starting Python + torch + transformers costs most of the time);
the last test stops it with SIGINT.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
JSON = {"Content-Type": "application/json"}


def make_run_dir(root: Path, model_dir: Path) -> Path:
    """What `lorafit train` leaves behind, built by hand: adapter, config.yaml, template.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.config.schema import Config
    from lorafit.data.templates import resolve_template
    from lorafit.run_dir import save_config

    run = root / "tiny-run"
    run.mkdir()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # Random (not zero) B so the adapter changes the answers.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run)
    cfg = Config()
    cfg.model.model = str(model_dir)
    cfg.data.template = "chatml"
    save_config(run, cfg)
    resolve_template("chatml", AutoTokenizer.from_pretrained(model_dir), "messages").save(run)
    return run


class Server:
    """`python -m lorafit serve` in a child process; the URL is read from what it prints."""

    def __init__(self, run_dir: Path, log: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
        self.run_dir, self.log = run_dir, log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafit", "serve", "--adapter_path", str(run_dir), "--port", "0"],
            stdout=self._out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while not (m := re.search(r"serving '([^']+)' at (http://\S+)", log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        self.model, self.url = m.group(1), m.group(2)
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def raw(self, method: str, path: str, body: bytes | str | dict | None = None) -> tuple[int, dict]:
        """One HTTP request with whatever body; (status, parsed JSON)."""
        if isinstance(body, dict):
            body = json.dumps(body)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request(method, path, body=body, headers=JSON)
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())
        conn.close()
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve")
    srv = Server(make_run_dir(root, tiny_model_dir("llama")), root / "server.log")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()
    srv._out.close()


@pytest.fixture
def client(server):
    assert server.proc.poll() is None, "the server has stopped (test_ctrl_c_stops_cleanly runs last)"
    return server.client()


def chat(client, model, messages, **kw):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


USER = [{"role": "user", "content": "What is the sum of 3 and 4?"}]


# -- the API through the openai client -------------------------------------------------------------------------

def test_binds_loopback_and_lists_the_run(server, client):
    assert server.host == "127.0.0.1"
    assert [m.id for m in client.models.list()] == ["tiny-run"]
    assert client.models.retrieve("tiny-run").owned_by == "lorafit"
    assert server.raw("GET", "/health") == (200, {
        "status": "ok", "model": "tiny-run", "context_length": 512, "template": "chatml",
        "defaults": {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_new_tokens": 256, "repetition_penalty": 1.0}})


def test_chat_matches_in_process_generation_with_the_run_template(server, client):
    """The server answers exactly what generate.py answers for the run's template, with usage counts."""
    from lorafit.config.schema import GenerateArgs
    from lorafit.data.templates import encode_prompt
    from lorafit.infer.generate import generate_text, load_session
    from lorafit.run_dir import load_run_config

    s = load_session(server.run_dir, load_run_config(server.run_dir))
    tok, template = s.tokenizer, s.template
    want = generate_text(s.model, tok, template, USER, GenerateArgs(temperature=0, max_new_tokens=12))

    got = chat(client, "tiny-run", USER, max_tokens=12)
    assert got.object == "chat.completion" and got.model == "tiny-run"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(encode_prompt(template, USER, tok)) == want.prompt_tokens
    assert got.usage.completion_tokens == want.completion_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_chat_stream_equals_non_stream(client):
    full = chat(client, "tiny-run", USER, max_tokens=16)
    chunks = list(chat(client, "tiny-run", USER, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it streamed, token by token


def test_completions_stream_and_not(client):
    prompt = "the apple and the banana"
    full = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=10, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 10 and full.usage.prompt_tokens > 0
    parts = list(client.completions.create(model="tiny-run", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason
    echoed = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + full.choices[0].text


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny-run", messages=USER, temperature=1.0, top_p=1.0, seed=seed,
                                              max_tokens=16, extra_body={"top_k": 0, "repetition_penalty": 1.0})
    a, b, c = sample(123), sample(123), sample(7)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content


def test_stop_sequences_cut_the_answer(client):
    full = chat(client, "tiny-run", USER, max_tokens=24).choices[0].message.content
    assert len(full) > 8, full
    stop = full[5:8]
    want = full[: full.find(stop)]
    got = chat(client, "tiny-run", USER, max_tokens=24, stop=[stop, "never-appears"])
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (want, "stop")
    streamed = chat(client, "tiny-run", USER, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want


def test_concurrent_requests_do_not_mix(client):
    prompts = [[{"role": "user", "content": f"Convert {n} kilometers to meters."}] for n in (1, 22, 333, 4444)]
    want = [chat(client, "tiny-run", p, max_tokens=12).choices[0].message.content for p in prompts]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        if i % 2:
            stream = chat(client, "tiny-run", prompts[i], max_tokens=12, stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            got[i] = chat(client, "tiny-run", prompts[i], max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(i) for i in range(len(prompts))] == want


# -- errors ---------------------------------------------------------------------------------------------------

LONG = "hello world " * 400  # ~800 tokens; the tiny model holds 512

BAD_REQUESTS = [
    ("invalid-json", "/v1/chat/completions", b'{"messages": [', 400, None, "invalid_json"),
    ("empty-body", "/v1/chat/completions", b"", 400, None, "invalid_json"),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("missing-messages", "/v1/chat/completions", {"model": "tiny-run"}, 400, "messages", "missing_required_parameter"),
    ("messages-not-a-list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("no-messages", "/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("content-number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "invalid_type"),
    ("missing-content", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400,
     "messages[0].content", "missing_required_parameter"),
    ("temperature-string", "/v1/chat/completions", {"messages": USER, "temperature": "hot"}, 400,
     "temperature", "invalid_type"),
    ("temperature-range", "/v1/chat/completions", {"messages": USER, "temperature": 5}, 400,
     "temperature", "invalid_value"),
    ("max-tokens-zero", "/v1/chat/completions", {"messages": USER, "max_tokens": 0}, 400,
     "max_tokens", "invalid_value"),
    ("max-tokens-float", "/v1/chat/completions", {"messages": USER, "max_tokens": 1.5}, 400, "max_tokens",
     "invalid_type"),
    ("seed-bool", "/v1/chat/completions", {"messages": USER, "seed": True}, 400, "seed", "invalid_type"),
    ("five-stops", "/v1/chat/completions", {"messages": USER, "stop": list("abcde")}, 400, "stop", "invalid_value"),
    ("stop-number", "/v1/chat/completions", {"messages": USER, "stop": 3}, 400, "stop", "invalid_value"),
    ("n-2", "/v1/chat/completions", {"messages": USER, "n": 2}, 400, "n", "unsupported_parameter"),
    ("stream-string", "/v1/chat/completions", {"messages": USER, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("unknown-model", "/v1/chat/completions", {"model": "gpt-5", "messages": USER}, 404, "model", "model_not_found"),
    ("chat-too-long", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages", "context_length_exceeded"),
    ("reply-too-long", "/v1/chat/completions", {"messages": USER, "max_tokens": 600}, 400,
     "max_tokens", "context_length_exceeded"),
    ("missing-prompt", "/v1/completions", {"model": "tiny-run"}, 400, "prompt", "missing_required_parameter"),
    ("prompt-number", "/v1/completions", {"prompt": 42}, 400, "prompt", "invalid_type"),
    ("prompt-too-long", "/v1/completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("unknown-url", "/v1/embeddings", {"input": "x"}, 404, None, "unknown_url"),
]


@pytest.mark.parametrize("path,body,status,param,code", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_error_bodies(server, client, path, body, status, param, code):
    got_status, got = server.raw("POST", path, body)
    assert got_status == status, got
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert (got["error"]["param"], got["error"]["code"]) == (param, code)
    assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]


def test_errors_through_the_openai_client(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=USER)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-run", messages=[{"role": "user", "content": LONG}], stream=True)
    assert e.value.code == "context_length_exceeded"
    assert server.raw("GET", "/v1/chat/completions")[0] == 405
    assert server.raw("GET", "/v1/models/nope")[0] == 404


def test_connection_survives_an_error(server, client):
    """Keep-alive: after a rejected request the connection stays usable, or is closed when the body went unread."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body="{bad json", headers=JSON)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 400 and not resp.will_close
    conn.request("POST", "/nowhere", body='{"x": 1}', headers=JSON)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 404 and resp.will_close  # its body was never read: closing beats misreading it
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "the", "max_tokens": 2}), headers=JSON)
    assert conn.getresponse().status == 200


def test_a_client_leaving_mid_stream_frees_the_server(server, client):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": USER, "stream": True, "max_tokens": 400}),
                 headers=JSON)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    assert resp.read1(64).startswith(b"data: ")
    conn.sock.close()  # mid-answer
    conn.close()
    assert chat(client, "tiny-run", USER, max_tokens=4).choices[0].finish_reason == "length"


# -- the chat page ----------------------------------------------------------------------------------------------

def test_page_is_self_contained(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", "/")
    resp = conn.getresponse()
    html = resp.read().decode()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/html")
    assert "default-src 'self'" in resp.getheader("Content-Security-Policy")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", html)


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe): JSON messages ending in
    NUL, commands on the child's fd 3, replies and events on its fd 4. Standard library only."""

    def __init__(self, profile: Path):
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        hi_r, hi_w = (os.dup2(fd, 100 + i, inheritable=False) for i, fd in enumerate((cmd_r, res_w)))
        os.close(cmd_r), os.close(res_w)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        # bash (dash takes single-digit fds only) moves the pipe ends to fds 3 and 4, where Chromium expects them.
        self.proc = subprocess.Popen(["/bin/bash", "-c", f'exec "$0" "$@" 3<&{hi_r} 4>&{hi_w} {hi_r}<&- {hi_w}>&-',
                                      CHROMIUM, *flags], pass_fds=(hi_r, hi_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(hi_r), os.close(hi_w)
        self.buf, self.next_id, self.events = b"", 0, []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Network", "Log"):
            self.send(f"{domain}.enable", session=self.session)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buf:
                import select

                if not select.select([self.res_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self.res_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") != self.next_id:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            else:
                return reply["result"]

    def page(self, method: str, params: dict | None = None):
        return self.send(method, params, session=self.session)

    def js(self, expression: str):
        r = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {expression}")
            time.sleep(0.05)
        return value

    def type(self, text: str) -> None:
        self.page("Input.insertText", {"text": text})
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "text": "\r"})

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.cmd_w), os.close(self.res_r)


LAST_ANSWER = "document.querySelector('#log .msg.assistant:last-child')"


def test_chat_page_streams_answers_in_chromium(server, client, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium")
    browser = Chromium(tmp_path / "profile")
    try:
        browser.page("Page.navigate", {"url": server.url + "/"})
        browser.wait_for("document.body && document.body.dataset.ready === 'true'")
        assert browser.js("document.getElementById('model').textContent") == "tiny-run"
        browser.js("document.getElementById('temperature').value = '0';"
                   "document.getElementById('max-tokens').value = '12'")
        history = []
        for question in ("What is the sum of 3 and 4?", "And of 5 and 6?"):
            browser.js("document.getElementById('prompt').focus()")
            browser.type(question)
            state = browser.wait_for(f"{LAST_ANSWER}?.dataset.state !== 'streaming' && {LAST_ANSWER}?.dataset.state")
            answer = browser.js(f"{LAST_ANSWER}.querySelector('.text').textContent")
            meta = browser.js(f"{LAST_ANSWER}.querySelector('.meta').textContent")
            assert state == "done", meta
            history.append({"role": "user", "content": question})
            want = chat(client, "tiny-run", history, max_tokens=12).choices[0].message.content
            assert answer == want
            history.append({"role": "assistant", "content": answer})
        requests = [e["params"]["request"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        assert requests and all(r["url"].startswith(server.url + "/") for r in requests), requests  # nothing external
        asked = [json.loads(r["postData"]) for r in requests if r["url"].endswith("/v1/chat/completions")]
        assert len(asked) == 2 and all(a["stream"] and a["model"] == "tiny-run" for a in asked)
        assert asked[1]["messages"] == history[:3]  # the page sends the conversation so far
        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert not errors, errors
    finally:
        browser.close()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# -- stopping ---------------------------------------------------------------------------------------------------

def test_ctrl_c_stops_cleanly(server):
    """Runs last: SIGINT (Ctrl-C) mid-stream ends that stream at its next token, then the server, with exit code 0."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": USER, "stream": True, "max_tokens": 480}),
                 headers=JSON)
    resp = conn.getresponse()
    assert resp.read1(64).startswith(b"data: ")
    server.proc.send_signal(signal.SIGINT)
    try:
        rest = resp.read()
    except http.client.IncompleteRead as e:  # the process may exit before the stream's closing chunk
        rest = e.partial
    assert server.proc.wait(timeout=30) == 0
    assert b"[DONE]" not in rest  # cut short, not run to its end
    log = server.log.read_text()
    assert "stopped" in log and "Traceback" not in log and "terminate called" not in log, log
