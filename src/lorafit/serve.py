"""`lorafit serve`: an OpenAI-compatible HTTP API and a chat page over one run.

    GET  /                      chat page (static/chat.html: no external assets, streams from the API below)
    GET  /health                {"status": "ok", "model": ID, "context_length": N, "defaults": {...}}
    GET  /v1/models[/ID]        the one model, named after the run directory
    POST /v1/chat/completions   messages through the run's template (template.json), as in training
    POST /v1/completions        raw text continued without a template

Both POST endpoints stream as server-sent events with `"stream": true`; `model` may be left out, and
`top_k` / `repetition_penalty` extend OpenAI's sampling fields. The standard library
is enough: ThreadingHTTPServer gives each connection a thread and generate.GENERATION_LOCK
runs generations one after another (one model, one KV cache), so a slow stream delays the next
request but never mixes with it. Mistakes in a request answer OpenAI's error body,
{"error": {"message", "type", "param", "code"}}, with status 400 (404 for an unknown model or URL).
"""
from __future__ import annotations

import json
import math
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lorafit.config import Config, GenerateArgs
from lorafit.errors import UserError

MAX_BODY = 8 * 1024 * 1024
"""Largest request body in bytes (a full 32k-token context is ~150 KB of text)."""
ROLES = ("system", "developer", "user", "assistant")
PAGE = Path(__file__).parent / "static" / "chat.html"
# Everything the page loads comes from this server: the browser refuses anything else.
PAGE_CSP = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:"


class ApiError(Exception):
    """A request the client must fix; answered with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    """A validated request to either POST endpoint."""

    gen: GenerateArgs
    seed: int | None
    stop: list[str]
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] | None = None
    """Chat: role/content dicts, content flattened to text."""
    prompt: str | None = None
    """Completions: the raw text to continue."""
    echo: bool = False


# -- request validation -------------------------------------------------------------------------------------

_KINDS = {
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "integer": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "boolean": ("a boolean", lambda v: isinstance(v, bool)),
    "string": ("a string", lambda v: isinstance(v, str)),
    "array": ("an array", lambda v: isinstance(v, list)),
    "object": ("an object", lambda v: isinstance(v, dict)),
}


def _json_type(value: Any) -> str:
    for name, (_, ok) in _KINDS.items():
        if ok(value):
            return name
    return "null" if value is None else type(value).__name__


def _field(body: dict, key: str, kind: str, param: str | None = None) -> Any:
    """body[key] when present and of `kind`; None when absent or null; otherwise a 400 naming the field."""
    value = body.get(key)
    if value is None:
        return None
    words, ok = _KINDS[kind]
    if not ok(value):
        raise ApiError(f"Invalid type for '{param or key}': expected {words}, but got {_json_type(value)} instead.",
                       param=param or key, code="invalid_type")
    return value


UNSUPPORTED = "unsupported_parameter"


def _require(ok: bool, key: str, message: str, code: str = "invalid_value") -> None:
    if not ok:
        raise ApiError(message, param=key, code=code)


def _sampling(body: dict, defaults: GenerateArgs, max_keys: tuple[str, ...]) -> GenRequest:
    """Sampling fields shared by both endpoints; absent fields keep the run's `generate` settings."""
    gen = replace(defaults)
    if (t := _field(body, "temperature", "number")) is not None:
        _require(0 <= t <= 2, "temperature", f"'temperature' must be between 0 and 2, got {t}.")
        gen.temperature = float(t)
    if (p := _field(body, "top_p", "number")) is not None:
        _require(0 <= p <= 1, "top_p", f"'top_p' must be between 0 and 1, got {p}.")
        gen.top_p = float(p) or 1e-9  # 0 keeps only the likeliest token, as OpenAI's API does
    if (k := _field(body, "top_k", "integer")) is not None:
        _require(k >= 0, "top_k", f"'top_k' must be >= 0 (0: off), got {k}.")
        gen.top_k = k
    if (r := _field(body, "repetition_penalty", "number")) is not None:
        _require(r > 0, "repetition_penalty", f"'repetition_penalty' must be > 0, got {r}.")
        gen.repetition_penalty = float(r)
    given = False
    for key in max_keys:
        if (m := _field(body, key, "integer")) is not None:
            _require(m >= 1, key, f"'{key}' must be at least 1, got {m}.")
            gen.max_new_tokens, given = m, True
    seed = _field(body, "seed", "integer")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        ok = isinstance(stop, list) and all(isinstance(s, str) for s in stop)
        _require(ok, "stop", "'stop' must be a string or an array of strings.")
        _require(len(stop) <= 4, "stop", f"'stop' holds {len(stop)} sequences; at most 4 are allowed.")
        _require(all(stop), "stop", "'stop' sequences must not be empty.")
    n = _field(body, "n", "integer")
    _require(n in (None, 1), "n", "Only n=1 is supported: send one request per answer.", code=UNSUPPORTED)
    for key in ("presence_penalty", "frequency_penalty"):
        value = _field(body, key, "number")
        _require(not value, key, f"'{key}' is not supported; use 'repetition_penalty' (e.g. 1.1) instead.",
                 code=UNSUPPORTED)
    _require(not body.get("logprobs"), "logprobs", "'logprobs' is not supported by this server.", code=UNSUPPORTED)
    stream = bool(_field(body, "stream", "boolean"))
    options = _field(body, "stream_options", "object") or {}
    include_usage = bool(_field(options, "include_usage", "boolean", param="stream_options.include_usage"))
    return GenRequest(gen=gen, seed=seed, stop=list(stop or []), max_tokens_given=given, stream=stream,
                      include_usage=include_usage)


def _check_model(body: dict, model_id: str) -> None:
    model = _field(body, "model", "string")
    if model is not None and model != model_id:
        raise ApiError(f"The model '{model}' does not exist; this server serves '{model_id}'.",
                       param="model", code="model_not_found", status=404)


def _text_content(content: Any, param: str) -> str:
    """A message's content: a string, or an array of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(f"'{param}' may only hold text parts ({{\"type\": \"text\", \"text\": ...}}).",
                               param=param, code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(f"Invalid type for '{param}': expected a string or an array of text parts, "
                   f"but got {_json_type(content)} instead.", param=param, code="invalid_type")


def parse_chat(body: dict, model_id: str, defaults: GenerateArgs) -> GenRequest:
    """Validate a /v1/chat/completions body."""
    _check_model(body, model_id)
    if "messages" not in body:
        raise ApiError("Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    raw = _field(body, "messages", "array")
    _require(bool(raw), "messages", "'messages' must hold at least one message.")
    tools = body.get("tools") or body.get("functions")
    _require(not tools, "tools", "Tool calling is not supported.", code=UNSUPPORTED)
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"Invalid type for '{where}': expected an object, but got {_json_type(m)} instead.",
                           param=where, code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(f"Invalid value for '{where}.role': {role!r}; use one of {', '.join(ROLES)}.",
                           param=f"{where}.role", code="invalid_value")
        if "content" not in m or (m["content"] is None and role != "assistant"):
            raise ApiError(f"Missing required parameter: '{where}.content'.", param=f"{where}.content",
                           code="missing_required_parameter")
        content = _text_content(m["content"] or "", f"{where}.content")
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    req = _sampling(body, defaults, ("max_tokens", "max_completion_tokens"))
    req.messages = messages
    return req


def parse_completion(body: dict, model_id: str, defaults: GenerateArgs) -> GenRequest:
    """Validate a /v1/completions body."""
    _check_model(body, model_id)
    if "prompt" not in body:
        raise ApiError("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(f"Invalid type for 'prompt': expected a string (one prompt per request), but got "
                       f"{_json_type(prompt)} instead.", param="prompt", code="invalid_type")
    _require(body.get("suffix") is None, "suffix", "'suffix' is not supported.", code=UNSUPPORTED)
    _require(body.get("best_of") in (None, 1), "best_of", "Only best_of=1 is supported.", code=UNSUPPORTED)
    req = _sampling(body, defaults, ("max_tokens",))
    req.prompt = prompt
    req.echo = bool(_field(body, "echo", "boolean"))
    return req


def fit_context(req: GenRequest, prompt_tokens: int, context: int | None, param: str) -> None:
    """Refuse a prompt the model cannot hold; shorten the default reply length to the room left.

    generate.py would otherwise keep the prompt's tail silently, fine for a REPL, wrong for an API.
    """
    if prompt_tokens == 0:
        raise ApiError(f"'{param}' is empty after tokenization.", param=param, code="invalid_value")
    if context is None:
        return
    room = context - prompt_tokens
    if room < 1 or (req.max_tokens_given and req.gen.max_new_tokens > room):
        n = req.gen.max_new_tokens
        asked = (f"{prompt_tokens + n} tokens ({prompt_tokens} in the prompt, {n} for the completion)" if room >= 1
                 else f"{prompt_tokens} tokens in the prompt")
        raise ApiError(f"This model's maximum context length is {context} tokens. However, you requested {asked}. "
                       f"Please shorten the prompt or lower max_tokens.", param=param, code="context_length_exceeded")
    req.gen.max_new_tokens = min(req.gen.max_new_tokens, room)


# -- response bodies ----------------------------------------------------------------------------------------

def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def chat_body(cid: str, created: int, model: str, result) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def chat_chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_body(cid: str, created: int, model: str, text: str, finish: str | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


# -- the server ---------------------------------------------------------------------------------------------

class App:
    """The loaded run and what every request needs from it."""

    def __init__(self, session, defaults: GenerateArgs):
        self.session = session
        self.defaults = defaults
        self.model_id = session.name
        self.created = int(time.time())
        self.context = _context_length(session.model, session.tokenizer)
        self.stopping = threading.Event()
        self.busy = 0  # POST requests being answered
        self.idle = threading.Condition()

    @contextmanager
    def answering(self):
        with self.idle:
            self.busy += 1
        try:
            yield
        finally:
            with self.idle:
                self.busy -= 1
                self.idle.notify_all()

    def wait_idle(self) -> None:
        with self.idle:
            self.idle.wait_for(lambda: self.busy == 0)

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lorafit"}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "context_length": self.context,
                "template": self.session.template.name, "defaults": asdict(self.defaults)}


def _context_length(model, tokenizer) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not n:
        n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**7 else None  # tokenizers without a limit say 1e30


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True  # an open stream must not keep Ctrl-C from exiting

    def __init__(self, address: tuple[str, int], app: App):
        self.app = app
        super().__init__(address, Handler)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error of ours
            super().handle_error(request, client_address)


class ApiServer6(ApiServer):
    address_family = socket.AF_INET6


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    disable_nagle_algorithm = True  # each SSE event leaves at once instead of waiting ~40 ms for an ACK
    server_version = "lorafit"
    server: ApiServer

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        with self.server.app.answering():
            self._route("POST")

    def _route(self, method: str) -> None:
        app = self.server.app
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._consumed = method != "POST"  # an unread body would be parsed as the next request
        try:
            if method == "POST" and app.stopping.is_set():
                raise ApiError("The server is shutting down.", status=503, kind="server_error", code="shutting_down")
            if method == "GET" and path in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_CSP})
            elif method == "GET" and path == "/health":
                self._json(200, app.health())
            elif method == "GET" and path == "/v1/models":
                self._json(200, {"object": "list", "data": [app.model_card()]})
            elif method == "GET" and path.startswith("/v1/models/"):
                _check_model({"model": path[len("/v1/models/"):]}, app.model_id)
                self._json(200, app.model_card())
            elif method == "POST" and path == "/v1/chat/completions":
                self._chat(parse_chat(self._body(), app.model_id, app.defaults))
            elif method == "POST" and path == "/v1/completions":
                self._completion(parse_completion(self._body(), app.model_id, app.defaults))
            elif path in ("/v1/chat/completions", "/v1/completions", "/health", "/v1/models"):
                raise ApiError(f"Method {method} is not allowed on {path}.", status=405, code="method_not_allowed")
            else:
                raise ApiError(f"Invalid URL ({method} {path}).", status=404, code="unknown_url")
        except ApiError as e:
            self.close_connection = self.close_connection or not self._consumed
            self._json(e.status, e.body())
        except ConnectionError:
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 -- a bug: log it, answer 500, keep serving
            traceback.print_exc()
            self._json(500, ApiError(f"Internal error: {type(e).__name__}: {e}", kind="server_error",
                                     status=500).body())

    def _body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError("Chunked request bodies are not supported; send a Content-Length.", status=411,
                           code="length_required")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError("The Content-Length header is not a number.", code="invalid_request") from None
        if length > MAX_BODY:
            self.close_connection = True  # the body stays unread
            raise ApiError(f"Request body of {length} bytes is over the {MAX_BODY}-byte limit.", status=413,
                           code="request_too_large")
        raw = self.rfile.read(length) if length else b""
        self._consumed = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"We could not parse the JSON body of your request ({e}). Send a JSON object with "
                           f"Content-Type: application/json.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(f"The request body must be a JSON object, got {_json_type(body)}.", code="invalid_json")
        return body

    # -- generation -------------------------------------------------------------------------------------------

    def _chat(self, req: GenRequest) -> None:
        from lorafit.data.templates import encode_prompt
        from lorafit.errors import DataError
        from lorafit.generate import stream_text

        app, s = self.server.app, self.server.app.session
        try:
            n_prompt = len(encode_prompt(s.template, req.messages, s.tokenizer))
        except DataError as e:  # a chat template that rejects this order of roles
            raise ApiError(e.message, param="messages", code="invalid_value") from None
        fit_context(req, n_prompt, app.context, "messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = stream_text(s.model, s.tokenizer, s.template, req.messages, req.gen, seed=req.seed, stop=req.stop)
        if not req.stream:
            self._json(200, chat_body(cid, created, app.model_id, self._finish(stream)))
            return
        self._stream(stream, req,
                     first=chat_chunk(cid, created, app.model_id, {"role": "assistant", "content": ""}),
                     delta=lambda text: chat_chunk(cid, created, app.model_id, {"content": text}),
                     last=lambda finish: chat_chunk(cid, created, app.model_id, {}, finish))

    def _completion(self, req: GenRequest) -> None:
        from lorafit.generate import stream_from_prompt

        app, s = self.server.app, self.server.app.session
        fit_context(req, len(s.tokenizer(req.prompt)["input_ids"]), app.context, "prompt")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = req.prompt if req.echo else ""
        stream = stream_from_prompt(s.model, s.tokenizer, req.prompt, req.gen, seed=req.seed, stop=req.stop)
        if not req.stream:
            result = self._finish(stream)
            self._json(200, {**completion_body(cid, created, app.model_id, echo + result.text, result.finish_reason),
                             "usage": usage(result)})
            return
        self._stream(stream, req,
                     first=completion_body(cid, created, app.model_id, echo, None) if echo else None,
                     delta=lambda text: completion_body(cid, created, app.model_id, text, None),
                     last=lambda finish: completion_body(cid, created, app.model_id, "", finish))

    def _deltas(self, stream):
        """The stream's text deltas, cut off at the next token when the server is stopping (Ctrl-C)."""
        for text in stream:
            if self.server.app.stopping.is_set():
                raise ApiError("The server is shutting down.", status=503, kind="server_error", code="shutting_down")
            yield text

    def _finish(self, stream):
        """Run a stream to its end (non-streamed answers go through the same token loop)."""
        try:
            for _ in self._deltas(stream):
                pass
        finally:
            stream.close()
        return stream.result

    def _stream(self, stream, req: GenRequest, first, delta, last) -> None:
        """Server-sent events: one `data: {chunk}` per text delta, the finish reason, usage if asked, [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        extra = {"usage": None} if req.include_usage else {}  # OpenAI marks every chunk but the last so
        try:
            if first is not None:
                self._event({**first, **extra})
            for text in self._deltas(stream):
                self._event({**delta(text), **extra})
            self._event({**last(stream.result.finish_reason), **extra})
            if req.include_usage:
                self._event({**last(None), "choices": [], "usage": usage(stream.result)})
            self._event("[DONE]")
        except ConnectionError:  # the client left: stop generating for it
            self.close_connection = True
            return
        except ApiError as e:
            self._event(e.body())
        except Exception as e:  # noqa: BLE001 -- headers are sent: report it in the stream, as OpenAI does
            traceback.print_exc()
            self._event(ApiError(f"Internal error: {type(e).__name__}: {e}", kind="server_error", status=500).body())
        finally:
            stream.close()  # releases the generation lock now, not at garbage collection
        self.wfile.write(b"0\r\n\r\n")

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _event(self, obj: dict | str) -> None:
        data = b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(run_dir: Path, cfg: Config, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the run, listen on host:port, answer until Ctrl-C (or SIGTERM)."""
    from lorafit.generate import load_session

    print(f"loading {run_dir} ...", file=sys.stderr, flush=True)
    app = App(load_session(Path(run_dir), cfg), cfg.generate)
    server_cls = ApiServer6 if ":" in host else ApiServer
    try:
        server = server_cls((host, port), app)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                        fix="pick another --port (0 lets the system choose a free one)") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_address[1]}"
    print(f"serving '{app.model_id}' at {url}  (chat page: {url}/, OpenAI API: {url}/v1; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}, reachable from other machines; the API has no authentication",
              file=sys.stderr, flush=True)
    # Ctrl-C even when started from a script with `&` (which ignores SIGINT); `kill` and container stops too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        app.stopping.set()  # streams end at their next token
        server.server_close()  # no new connections meanwhile
        # Exit only once every answer has ended and freed its tensors: finalizing Python while a thread is
        # still in torch code aborts the process ("terminate called without an active exception").
        # A second Ctrl-C does not wait.
        app.wait_idle()
        print("stopped", flush=True)
    finally:
        server.server_close()
