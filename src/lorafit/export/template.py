"""The training prompt template, carried into the GGUF file (Jinja, for llama.cpp) and into an Ollama
Modelfile (Go template syntax, for `ollama create`).

lorafit's plain templates (alpaca, instruction, guanaco, raw; rendered in Python by data/templates.py) get a
Jinja and a Go twin built from the same pieces. For Jinja templates (chatml, the model's own) the Go template
is not translated from source; it is read off rendered conversations: render the Jinja with placeholder
messages, cut out each role's prefix and suffix, rebuild the conversation from those pieces and check it
renders the same. A template that does not decompose this way (e.g. Llama 2's system prompt inside the first
[INST]) gets a plain `{{ .Prompt }}` template and a warning instead of a wrong one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafit.data.templates import PLAIN_PARTS, PLAIN_STOPS, render_jinja


@dataclass
class ChatFormat:
    """The training format in the two template languages, and where replies end."""

    jinja: str | None
    go: str | None
    system: str | None
    stops: list[str]
    warning: str | None = None


def chat_format(template: dict[str, Any] | None, tokenizer: Any) -> ChatFormat:
    """From a run's template.json (None: the tokenizer's own chat template)."""
    template = dict(template or {})
    eos = template.get("eos_token") or getattr(tokenizer, "eos_token", None) or ""
    system = template.get("system_prompt")
    stops = [template.get("end_of_turn") or "", eos]
    name = template.get("name")

    if name in PLAIN_PARTS:
        parts = PLAIN_PARTS[name]
        stops = [s.strip() for s in PLAIN_STOPS[name]] + stops
        return ChatFormat(_with_default_system(plain_jinja(name, parts), system), plain_go(name, parts, eos),
                          system, _unique(stops))
    jinja = template.get("chat_template") or _tokenizer_template(tokenizer)
    if not jinja:
        return ChatFormat(None, None, system, _unique(stops))
    turns = split_turns(jinja, eos)
    if turns is None:
        return ChatFormat(_with_default_system(jinja, system), None, system, _unique(stops),
                          "the chat template does not split into per-role turns; the Modelfile uses a plain "
                          "template: edit its TEMPLATE to match the training format")
    stops = [turns.parts["assistant"][1].strip(), turns.parts["user"][0].strip()] + stops
    return ChatFormat(_with_default_system(jinja, system), go_template(turns), system or turns.default_system,
                      _unique(stops))


def _tokenizer_template(tokenizer: Any) -> str | None:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # some tokenizers hold several named templates
        source = source.get("default") or next(iter(source.values()), None)
    return source or None


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(s for s in items if s))


def _lit(text: str) -> str:
    """A Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _plain_pieces(name: str, parts: tuple) -> tuple[str, str, str, str, str, str]:
    """(turn separator, text before / after a user turn, reply header, reply prefix, text after the system turn)."""
    sep, user_fmt, _input_fmt, header, reply_prefix = parts
    before, after = user_fmt.split("{c}")
    return sep, before, after, header, reply_prefix, "\n" if name == "raw" else "\n\n"


def plain_jinja(name: str, parts: tuple) -> str:
    """Jinja twin of data.templates' plain renderer: system text, user turns (a separator before every turn
    after the first reply), reply header, reply prefix, reply and EOS; the header again as generation prompt."""
    sep, before, after, header, reply_prefix, system_end = _plain_pieces(name, parts)
    return ("{% set ns = namespace(replied=false) %}{% for m in messages %}"
            f"{{% if m['role'] == 'system' %}}{{{{ m['content'] + {_lit(system_end)} }}}}"
            f"{{% elif m['role'] == 'user' %}}{{% if ns.replied %}}{{{{ {_lit(sep)} }}}}{{% endif %}}"
            f"{{{{ {_lit(before)} + m['content'] + {_lit(after)} }}}}"
            f"{{% else %}}{{{{ {_lit(header + reply_prefix)} + m['content'] + eos_token }}}}"
            "{% set ns.replied = true %}{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {_lit(header)} }}}}{{% endif %}}")


def plain_go(name: str, parts: tuple, eos: str) -> str:
    """The same for Ollama: Go templates keep a variable across `range` iterations when assigned with `=`."""
    sep, before, after, header, reply_prefix, system_end = _plain_pieces(name, parts)
    return ("{{ $replied := false }}" + _GO_RANGE +
            f'{{{{ if eq .Role "system" }}}}{{{{ .Content }}}}{_go_text(system_end)}'
            f'{{{{ else if eq .Role "user" }}}}{{{{ if $replied }}}}{_go_text(sep)}{{{{ end }}}}'
            f"{_go_text(before)}{{{{ .Content }}}}{_go_text(after)}"
            f'{{{{ else if eq .Role "assistant" }}}}{_go_text(header + reply_prefix)}{{{{ .Content }}}}'
            f"{{{{ if not $last }}}}{_go_text(eos)}{{{{ end }}}}"
            "{{ $replied = true }}{{ end }}" + _go_generation(header) + "{{ end }}")


def _with_default_system(jinja: str, system: str | None) -> str:
    """Training put `system` first when a conversation had no system message; make it the default here too."""
    if not system:
        return jinja
    baked = ("{% if messages and messages[0]['role'] != 'system' %}{% set messages = "
             f"[{{'role': 'system', 'content': {_lit(system)}}}] + messages %}}{{% endif %}}" + jinja)
    try:
        render(baked, [{"role": "user", "content": "hi"}], True)
        return baked
    except Exception:  # noqa: BLE001  the template refuses a system role; keep it as it is
        return jinja


def render(jinja: str, messages: list[dict[str, str]], add_generation_prompt: bool,
           bos: str = "", eos: str = "") -> str:
    """Render the way transformers' `apply_chat_template` does."""
    return render_jinja(jinja, messages, add_generation_prompt, bos=bos, eos=eos)


@dataclass
class Turns:
    """Text around each role's content, read off rendered conversations."""

    parts: dict[str, tuple[str, str]] = field(default_factory=dict)
    generation: str = ""
    default_system: str | None = None


_U, _A, _U2, _S = "\x02USER\x03", "\x02ASSISTANT\x03", "\x02USER2\x03", "\x02SYSTEM\x03"


def split_turns(jinja: str, eos: str) -> Turns | None:
    """Role prefixes/suffixes of a chat template, or None when the template is not a plain per-turn one."""
    try:
        def r(msgs, gen=False):
            return render(jinja, msgs, gen, eos=eos)

        u, a, u2, s = ({"role": "user", "content": _U}, {"role": "assistant", "content": _A},
                       {"role": "user", "content": _U2}, {"role": "system", "content": _S})
        conv, single, pair, with_sys = r([u, a, u2]), r([u]), r([u, a]), r([s, u])
        generation = r([u], True)[len(single):] if r([u], True).startswith(single) else ""
        user_suffix = conv[conv.index(_U2) + len(_U2):]
        assistant_suffix = pair[pair.index(_A) + len(_A):]
        mid1 = conv[conv.index(_U) + len(_U):conv.index(_A)]
        mid2 = conv[conv.index(_A) + len(_A):conv.index(_U2)]
        assistant_prefix = mid1[len(user_suffix):]
        user_prefix = mid2[len(assistant_suffix):]
        head = single[:single.index(_U)][:len(single[:single.index(_U)]) - len(user_prefix)]
        sys_mid = with_sys[with_sys.index(_S) + len(_S):with_sys.index(_U)]
        system_suffix = sys_mid[:len(sys_mid) - len(user_prefix)]
        system_prefix = with_sys[:with_sys.index(_S)]
    except Exception:  # noqa: BLE001  a template that raises on these conversations or lacks a role
        return None
    turns = Turns({"system": (system_prefix, system_suffix), "user": (user_prefix, user_suffix),
                       "assistant": (assistant_prefix, assistant_suffix)}, generation)
    if head and head.startswith(system_prefix) and head.endswith(system_suffix):  # a default system message
        turns.default_system = head[len(system_prefix):len(head) - len(system_suffix)]
    elif head:
        return None
    probe = [s, u, a, u2, a, u2]
    rebuilt = "".join(turns.parts[m["role"]][0] + m["content"] + turns.parts[m["role"]][1] for m in probe)
    return turns if rebuilt + generation == r(probe, True) else None


def _go_text(text: str) -> str:
    """Literal text inside a Go template in a Modelfile's triple quotes."""
    return text.replace("{{", '{{ "{{" }}').replace('"""', '\\"\\"\\"')


def go_template(turns: Turns) -> str:
    """Ollama's Go template over `.Messages` that renders exactly what the Jinja template does."""
    branches = []
    for i, (role, (prefix, suffix)) in enumerate(turns.parts.items()):
        keyword = "if" if i == 0 else "else if"
        end = f"{{{{ if not $last }}}}{_go_text(suffix)}{{{{ end }}}}" if role == "assistant" else _go_text(suffix)
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_text(prefix)}{{{{ .Content }}}}{end}')
    return _GO_RANGE + "".join(branches) + "{{ end }}" + _go_generation(turns.generation) + "{{ end }}"


# Ollama's idiom for "this is the last message": a conversation that ends on an assistant message is a reply to
# continue (prefill), so that message stays open and no new assistant turn starts.
_GO_RANGE = "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"


def _go_generation(text: str) -> str:
    return f'{{{{ if and $last (ne .Role "assistant") }}}}{_go_text(text)}{{{{ end }}}}' if text else ""


def modelfile(gguf_name: str, fmt: ChatFormat, params: dict[str, Any]) -> str:
    """Text of an Ollama Modelfile for `gguf_name`, which lies beside it."""
    own = gguf_name.removesuffix(".gguf") + ".Modelfile"
    lines = [f"# Written by `lorafit export`. Use: ollama create NAME -f {own}", f"FROM ./{gguf_name}"]
    go = fmt.go or "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
    lines.append(f'TEMPLATE """{go}"""')
    if fmt.system:
        lines.append(f'SYSTEM """{fmt.system}"""')
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in fmt.stops]
    lines += [f"PARAMETER {key} {value}" for key, value in params.items()]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
