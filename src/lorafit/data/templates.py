"""Prompt templates: how a conversation becomes text, for training and for every later use.

The template a run trained with is stored in its run directory (template.json) and is the
one eval, chat, merge and serving use: a model tuned on `Instruction:/Response:` text and
then prompted through its ChatML template answers badly without any error to show for it.

Plain templates (alpaca, instruction, guanaco, raw) are built here as segments, so which
characters belong to a reply is known exactly; the generation prompt ends right before the
reply (e.g. at "Response:"), and the reply starts with its separating space, so the prompt's
tokens are the same whether tokenized alone (chat) or followed by the reply (training).
Jinja templates (chatml, model) are rendered by `tokenizer.apply_chat_template`; reply spans
come from rendering growing prefixes of the conversation.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lorafit.errors import DataError
from lorafit.run_dir import TEMPLATE_FILE, write_json_atomic

TEMPLATES = ("alpaca", "instruction", "guanaco", "chatml", "model", "raw")
PLAIN = ("alpaca", "instruction", "guanaco", "raw")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# (text before a user turn after the first, user turn, input line, reply header, reply prefix)
PLAIN_PARTS = {
    "alpaca": ("\n", "Instruction: {c}\n", "Input: {i}\n", "Response:", " "),
    "instruction": ("\n\n", "### Instruction:\n{c}\n\n", "### Input:\n{i}\n\n", "### Response:\n", ""),
    "guanaco": ("", "### Human: {c}", None, "### Assistant:", " "),
    "raw": ("", "{c}\n", None, "", ""),
}
PLAIN_STOPS = {"alpaca": ["\nInstruction:"], "instruction": ["### Instruction:"], "guanaco": ["### Human:"], "raw": []}

Segments = list[tuple[str, bool]]
"""Rendered text in pieces, each marked True when it belongs to an assistant reply (trained)."""


def merged_content(message: dict) -> str:
    """A user turn's content with its Alpaca `input` appended (templates without an Input line)."""
    extra = message.get("input")
    return f"{message['content']}\n\n{extra}" if extra else message["content"]


@dataclass
class Template:
    name: str
    """alpaca | instruction | guanaco | chatml | model | raw"""
    chat_template: str | None = None
    """Jinja source for chatml/model (the tokenizer's own, copied so later runs use exactly it)."""
    system_prompt: str | None = None
    """System message put first when a conversation has none."""
    eos_token: str | None = None
    """The tokenizer's EOS text; plain templates append it after every reply so EOS is trained."""
    end_of_turn: str | None = None
    """Text a Jinja template puts after a reply (e.g. '<|im_end|>'); generation stops on it."""

    def render(self, messages: list[dict], tokenizer: Any, add_generation_prompt: bool) -> str:
        messages = self._with_system(messages)
        if self.name in PLAIN:
            return "".join(text for text, _ in self._plain_segments(messages, add_generation_prompt))
        return self._render_jinja(messages, tokenizer, add_generation_prompt)

    def segments(self, messages: list[dict], tokenizer: Any) -> Segments:
        """The whole conversation as text pieces, replies (and their end-of-turn/EOS) marked trained."""
        messages = self._with_system(messages)
        if self.name in PLAIN:
            return self._plain_segments(messages, False)
        return self._jinja_segments(messages, tokenizer)

    @property
    def add_special_tokens(self) -> bool:
        """Jinja templates write BOS themselves; plain text lets the tokenizer add it (Llama does)."""
        return self.name in PLAIN

    @property
    def stop_strings(self) -> list[str]:
        stops = list(PLAIN_STOPS.get(self.name, [])) + [self.end_of_turn or "", self.eos_token or ""]
        if self.name == "chatml":
            stops.insert(0, "<|im_end|>")
        return list(dict.fromkeys(s for s in stops if s))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Template:
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or d["name"] not in TEMPLATES:
            raise DataError(f"not a lorafit template: {str(d)[:80]!r}", fix="train again to write template.json")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, run_dir: Path) -> None:

        write_json_atomic(Path(run_dir) / TEMPLATE_FILE, self.to_dict())

    @classmethod
    def load(cls, run_dir: Path) -> Template:


        path = Path(run_dir) / TEMPLATE_FILE
        if not path.is_file():
            raise DataError(f"'{run_dir}' holds no {TEMPLATE_FILE}, so the prompt format it trained on is unknown",
                            fix="pass the output_dir of a `lorafit train` run (or train again)")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(f"'{path}' is not a valid template file: {e}", fix="train again") from None

    # -- helpers ------------------------------------------------------------------------------

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system_prompt}] + list(messages)
        return list(messages)

    def _plain_segments(self, messages: list[dict], add_generation_prompt: bool) -> Segments:
        sep, user_fmt, input_fmt, header, reply_prefix = PLAIN_PARTS[self.name]
        eos = self.eos_token or ""
        segs: Segments = []
        for m in messages:
            if m["role"] == "system":
                segs.append((m["content"] + ("\n" if self.name == "raw" else "\n\n"), False))
            elif m["role"] == "user":
                lead = sep if any(t for _, t in segs) else ""
                if input_fmt is None:
                    text = user_fmt.format(c=merged_content(m))
                else:
                    text = user_fmt.format(c=m["content"]) + (input_fmt.format(i=m["input"]) if m.get("input") else "")
                segs.append((lead + text, False))
            else:
                if header:
                    segs.append((header, False))
                segs.append((reply_prefix + m["content"] + eos, True))
        if add_generation_prompt and header:
            segs.append((header, False))
        return segs

    def _render_jinja(self, messages: list[dict], tokenizer: Any, add_generation_prompt: bool) -> str:
        msgs = [{"role": m["role"], "content": merged_content(m)} for m in messages]
        if tokenizer is None:
            return _render_without_tokenizer(self.chat_template or CHATML, msgs, add_generation_prompt, self)
        try:
            text = tokenizer.apply_chat_template(msgs, chat_template=self.chat_template or CHATML, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001  jinja's raise_exception, a template rejecting a role order, ...
            raise DataError(f"the {self.name} chat template cannot render this conversation: {e}",
                            fix="use another template (e.g. --template chatml) or fix the roles' order") from None
        return text

    def _jinja_segments(self, messages: list[dict], tokenizer: Any) -> Segments:
        full = self._render_jinja(messages, tokenizer, False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            span = self._reply_span(messages, i, full, cursor, tokenizer)
            if span is not None:
                spans.append(span)
                cursor = span[1]
        segs: Segments = []
        pos = 0
        for start, end in spans:
            segs += [(full[pos:start], False), (full[start:end], True)]
            pos = end
        segs.append((full[pos:], False))
        return [s for s in segs if s[0]]

    def _reply_span(self, messages: list[dict], i: int, full: str, cursor: int, tokenizer: Any):
        """Characters of reply i (with its end-of-turn text) in `full`, from prefix renders."""
        try:
            before = self._render_jinja(messages[:i], tokenizer, True) if i else ""
        except DataError:
            before = ""
        upto = self._render_jinja(messages[: i + 1], tokenizer, False)
        if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            end = len(upto.rstrip())  # keep '<|im_end|>' trained, not the newline after it
            return (len(before), end) if end > len(before) else None
        # Templates that rewrite earlier turns (date stamps, stripped thinking): find the reply itself.
        content = messages[i]["content"]
        start = full.find(content, cursor) if content else -1
        if start < 0:
            return None
        end = start + len(content)
        if self.end_of_turn and full.startswith(self.end_of_turn, end):
            end += len(self.end_of_turn)
        return start, end


def _render_without_tokenizer(source: str, messages: list[dict], add_generation_prompt: bool, t: Template) -> str:
    return render_jinja(source, messages, add_generation_prompt, eos=t.eos_token or "")


def render_jinja(source: str, messages: list[dict], add_generation_prompt: bool, bos: str = "", eos: str = "") -> str:
    """Render a chat template the way transformers' `apply_chat_template` does: sandboxed (a template file
    from a hub repo is code we do not trust), trim_blocks and lstrip_blocks, `raise_exception` available."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=bos, eos_token=eos)


def resolve_template(name: str, tokenizer: Any, data_format: str, system_prompt: str | None = None) -> Template:
    """The template to train with. 'auto': raw for raw text, else the tokenizer's own chat template when it
    has one, else alpaca for instruction-like data, guanaco for guanaco text, chatml for conversations."""
    if name == "auto":
        if data_format == "text":
            name = "raw"
        elif _tokenizer_template(tokenizer):
            name = "model"
        elif data_format == "guanaco":
            name = "guanaco"
        elif data_format in ("alpaca", "instruction", "prompt_completion"):
            name = "alpaca"
        else:
            name = "chatml"
    if name not in TEMPLATES:
        raise DataError(f"unknown template '{name}'", fix=f"use auto or one of: {', '.join(TEMPLATES)}")
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    t = Template(name=name, system_prompt=system_prompt, eos_token=eos)
    if name == "chatml":
        t.chat_template, t.end_of_turn = CHATML, "<|im_end|>"
    elif name == "model":
        source = _tokenizer_template(tokenizer)
        if not source:
            raise DataError("template 'model' asks for the tokenizer's chat template, but it has none",
                            fix="use --template chatml (or alpaca / instruction)")
        t.chat_template = source
        t.end_of_turn = _detect_end_of_turn(t, tokenizer)
    return t


def _tokenizer_template(tokenizer: Any) -> str | None:
    source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(source, dict):  # some tokenizers hold several named templates
        source = source.get("default") or next(iter(source.values()), None)
    return source or None


def _detect_end_of_turn(t: Template, tokenizer: Any) -> str | None:
    """What the template writes right after a reply, e.g. '<|im_end|>' or '<|eot_id|>'."""
    marker = "\u2063lorafit-reply\u2063"
    try:
        text = t._render_jinja([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                               tokenizer, False)
    except DataError:
        return None
    after = text[text.rfind(marker) + len(marker):].strip() if marker in text else ""
    return after.split()[0] if after else None


def render_prompt(template: Template, messages: list[dict], tokenizer: Any, continue_last: bool = False) -> str:
    """The generation prompt for chat, eval and serving: the conversation so far plus the reply header.

    A trailing assistant message is dropped, or with `continue_last` (an API client's prefill) kept as the
    start of the reply, which the model then continues."""
    prefill = ""
    if messages and messages[-1]["role"] == "assistant":
        prefill = messages[-1]["content"] if continue_last else ""
        messages = messages[:-1]
    return template.render(messages, tokenizer, add_generation_prompt=True) + prefill


def encode_prompt(template: Template, messages: list[dict], tokenizer: Any, continue_last: bool = False) -> list[int]:
    """Token ids of `render_prompt`, tokenized exactly as training tokenized the same text."""
    text = render_prompt(template, messages, tokenizer, continue_last)
    return list(tokenizer(text, add_special_tokens=template.add_special_tokens)["input_ids"])
