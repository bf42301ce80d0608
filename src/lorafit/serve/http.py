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
{"error": {"message", "type", "param", "code"}}, with status 400 (404 for an unknown model or URL);
the request checks and the response bodies live in serve_api.py, the HTTP side here.
"""
from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from lorafit.config.schema import Config, GenerateArgs
from lorafit.data.templates import encode_prompt
from lorafit.errors import DataError, UserError
from lorafit.infer.generate import load_session, stream_from_prompt, stream_text
from lorafit.serve.openai import (
    ApiError,
    GenRequest,
    chat_body,
    chat_chunk,
    check_model,
    completion_body,
    fit_context,
    json_type,
    parse_chat,
    parse_completion,
    usage,
)

MAX_BODY = 8 * 1024 * 1024
"""Largest request body in bytes (a full 32k-token context is ~150 KB of text)."""
PAGE = Path(__file__).parent / "static" / "chat.html"
# Everything the page loads comes from this server: the browser refuses anything else.
PAGE_CSP = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:"


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
                check_model({"model": path[len("/v1/models/"):]}, app.model_id)
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
            raise ApiError(f"The request body must be a JSON object, got {json_type(body)}.", code="invalid_json")
        return body

    # -- generation -------------------------------------------------------------------------------------------

    def _chat(self, req: GenRequest) -> None:

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
