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
import os
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
from lorafit.parsing import BadInput, json_loads
from lorafit.serve.access import Access
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
MAX_CONNECTIONS = 128
"""Connections served at once (a thread each, mostly waiting for the generation lock); more wait in the
listen backlog, of the same size, instead of being reset (the standard library's backlog is 5)."""
SHUTDOWN_GRACE = 10.0
"""Seconds Ctrl-C / SIGTERM waits for answers to reach their next token and end, before exiting anyway."""
PAGE = Path(__file__).parent / "static" / "chat.html"
# Everything the page loads comes from this server: the browser refuses anything else.
PAGE_CSP = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:"


# -- the server ---------------------------------------------------------------------------------------------

class App:
    """The loaded run and what every request needs from it."""

    def __init__(self, session, defaults: GenerateArgs, access: Access | None = None, timeout: float = 30.0):
        self.session = session
        self.access = access or Access()
        self.timeout = timeout
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

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: self.busy == 0, timeout=timeout)

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
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], app: App):
        self.app = app
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        self.slots.acquire()  # at the limit, the accept loop waits and new connections queue in the backlog
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

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

    def setup(self) -> None:
        self.timeout = self.server.app.timeout  # a client that stops sending mid-request is dropped after this
        super().setup()

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _not_allowed(self) -> None:
        self.close_connection = True  # any body stays unread; HEAD answers must not carry one either
        self._route(self.command)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def _route(self, method: str) -> None:
        app = self.server.app
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._consumed = method not in ("POST", "PUT", "PATCH")  # an unread body would be parsed as the next request
        self._cors = {}
        try:
            if self._refused(method, path):
                return
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
                req = parse_chat(self._body(), app.model_id, app.defaults)
                with app.answering():  # only generation counts: a half-sent body must not hold up Ctrl-C
                    self._chat(req)
            elif method == "POST" and path == "/v1/completions":
                req = parse_completion(self._body(), app.model_id, app.defaults)
                with app.answering():
                    self._completion(req)
            elif path in ("/v1/chat/completions", "/v1/completions", "/health", "/v1/models", "/") or \
                    method not in ("GET", "POST"):
                raise ApiError(f"Method {method} is not allowed on {path}.", status=405, code="method_not_allowed")
            else:
                raise ApiError(f"Invalid URL ({method} {path}).", status=404, code="unknown_url")
        except ApiError as e:
            self.close_connection = self.close_connection or not self._consumed
            self._json(e.status, e.body())
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 -- a bug: log it, answer 500, keep serving
            traceback.print_exc()
            self._json(500, ApiError(f"Internal error: {type(e).__name__}: {e}", kind="server_error",
                                     status=500).body())

    def _refused(self, method: str, path: str) -> bool:
        """Host, Origin, CORS preflight, API key and content type (access.py); True when answered here."""
        access, origin = self.server.app.access, self.headers.get("Origin")
        if not access.host_ok(self.headers.get("Host")):
            raise ApiError(f"Host '{self.headers.get('Host')}' is not allowed (a DNS-rebinding page would send one "
                           "like it); start the server with --allowed_hosts NAME to accept it.", status=403,
                           code="host_not_allowed")
        if not access.origin_ok(origin):
            raise ApiError(f"Requests from pages at {origin} are not allowed; start the server with --cors_origins "
                           f"{origin} to allow them.", status=403, code="origin_not_allowed")
        self._cors = access.cors_headers(origin)
        if method == "OPTIONS" and self._cors:  # a CORS preflight from a listed origin
            self._send(204, b"", "text/plain", {})
            return True
        if path.startswith("/v1") and method in ("GET", "POST") and \
                not access.authorized(self.headers.get("Authorization")):
            raise ApiError("Missing or wrong API key: send 'Authorization: Bearer KEY' with the key given to "
                           "--api_key (or LORAFIT_API_KEY).", status=401, kind="invalid_request_error",
                           code="invalid_api_key")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if method == "POST" and content_type != "application/json":
            raise ApiError(f"Content-Type must be application/json, got '{content_type or 'none'}' (with curl: "
                           "-H 'Content-Type: application/json').", status=415, code="unsupported_media_type")
        return False

    def _body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError("Chunked request bodies are not supported; send a Content-Length.", status=411,
                           code="length_required")
        given = self.headers.get("Content-Length")
        if given is None:
            raise ApiError("A POST needs a Content-Length header.", status=411, code="length_required")
        try:
            length = int(given)
        except ValueError:
            raise ApiError("The Content-Length header is not a number.", code="invalid_request") from None
        if length < 0:  # rfile.read(-1) would wait for the client to close the connection
            raise ApiError(f"Content-Length {length} is negative.", code="invalid_request")
        if length > MAX_BODY:
            raise ApiError(f"Request body of {length} bytes is over the {MAX_BODY}-byte limit.", status=413,
                           code="request_too_large")
        try:
            raw = self.rfile.read(length) if length else b""
        except TimeoutError:
            raise ApiError(f"The request body did not arrive within {self.timeout:g} s.", status=408,
                           code="request_timeout") from None
        if len(raw) < length:
            raise ApiError(f"The body ended after {len(raw)} of the {length} bytes of its Content-Length.",
                           code="invalid_request")
        self._consumed = True
        try:
            body = json_loads(raw)
        except (json.JSONDecodeError, BadInput) as e:
            raise ApiError(f"We could not parse the JSON body of your request ({e}). Send a JSON object with "
                           f"Content-Type: application/json.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(f"The request body must be a JSON object, got {json_type(body)}.", code="invalid_json")
        return body

    # -- generation -------------------------------------------------------------------------------------------

    def _chat(self, req: GenRequest) -> None:

        app, s = self.server.app, self.server.app.session
        try:
            n_prompt = len(encode_prompt(s.template, req.messages, s.tokenizer, continue_last=req.prefill))
        except DataError as e:  # a chat template that rejects this order of roles
            raise ApiError(e.message, param="messages", code="invalid_value") from None
        fit_context(req, n_prompt, app.context, "messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = stream_text(s.model, s.tokenizer, s.template, req.messages, req.gen, seed=req.seed, stop=req.stop,
                             continue_last=req.prefill)
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
        for key, value in {**getattr(self, "_cors", {}), **(headers or {})}.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(run_dir: Path, cfg: Config, host: str = "127.0.0.1", port: int = 8000, access: Access | None = None,
          timeout: float = 30.0) -> None:
    """Load the run, listen on host:port, answer until Ctrl-C (or SIGTERM)."""

    access = access or Access.build(host, None, None, None)
    print(f"loading {run_dir} ...", file=sys.stderr, flush=True)
    app = App(load_session(Path(run_dir), cfg), cfg.generate, access, timeout)
    server_cls = ApiServer6 if ":" in host else ApiServer
    try:
        server = server_cls((host, port), app)
    except (OSError, OverflowError) as e:
        raise UserError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}",
                        fix="pick another --port (0 lets the system choose a free one)") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_address[1]}"
    print(f"serving '{app.model_id}' at {url}  (chat page: {url}/, OpenAI API: {url}/v1; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and access.api_key is None:
        print(f"note: listening on {host}, reachable from other machines; the API has no key (--api_key)",
              file=sys.stderr, flush=True)
    # Ctrl-C even when started from a script with `&` (which ignores SIGINT); `kill` and container stops too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        app.stopping.set()  # streams end at their next token
        server.server_close()  # no new connections meanwhile
        # Exit once every answer has ended and freed its tensors: finalizing Python while a thread is still
        # in torch code aborts the process ("terminate called without an active exception"). Past the grace
        # period (a token that takes that long) os._exit skips finalization instead.
        if not app.wait_idle(SHUTDOWN_GRACE):
            print(f"stopped after {SHUTDOWN_GRACE:g} s with an answer still generating", flush=True)
            os._exit(0)
        print("stopped", flush=True)
    finally:
        server.server_close()
