"""The OpenAI wire format of `lorafit serve`: request validation and response bodies (no HTTP here).

A request is checked field by field against OpenAI's schema for /v1/chat/completions and
/v1/completions; a mistake raises ApiError, which the server answers with OpenAI's error body,
{"error": {"message", "type", "param", "code"}}, status 400 (404 for an unknown model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from lorafit.config.schema import GenerateArgs

ROLES = ("system", "developer", "user", "assistant")


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
    prefill: bool = False
    """Chat: the last message is the assistant's, to be continued (not answered)."""
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


def json_type(value: Any) -> str:
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
        raise ApiError(f"Invalid type for '{param or key}': expected {words}, but got {json_type(value)} instead.",
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


def check_model(body: dict, model_id: str) -> None:
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
                   f"but got {json_type(content)} instead.", param=param, code="invalid_type")


def parse_chat(body: dict, model_id: str, defaults: GenerateArgs) -> GenRequest:
    """Validate a /v1/chat/completions body."""
    check_model(body, model_id)
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
            raise ApiError(f"Invalid type for '{where}': expected an object, but got {json_type(m)} instead.",
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
    _response_format(body)
    req = _sampling(body, defaults, ("max_tokens", "max_completion_tokens"))
    req.messages = messages
    req.prefill = messages[-1]["role"] == "assistant" and bool(messages[-1]["content"])
    return req


def _response_format(body: dict) -> None:
    """Only free text: a JSON mode the model is not constrained to would be a promise this server breaks."""
    fmt = _field(body, "response_format", "object")
    if fmt is None:
        return
    kind = fmt.get("type")
    _require(kind == "text", "response_format",
             f"response_format type {kind!r} is not supported: this server does not constrain output to JSON; "
             "ask for JSON in the prompt and send response_format {\"type\": \"text\"} or none.", code=UNSUPPORTED)


def parse_completion(body: dict, model_id: str, defaults: GenerateArgs) -> GenRequest:
    """Validate a /v1/completions body."""
    check_model(body, model_id)
    if "prompt" not in body:
        raise ApiError("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(f"Invalid type for 'prompt': expected a string (one prompt per request), but got "
                       f"{json_type(prompt)} instead.", param="prompt", code="invalid_type")
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
                       f"Please shorten the prompt or lower max_tokens.", param="max_tokens" if room >= 1 else param,
                       code="context_length_exceeded")
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
