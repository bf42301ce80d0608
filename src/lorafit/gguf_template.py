"""The training prompt template, carried into the GGUF file (Jinja, for llama.cpp) and into an Ollama
Modelfile (Go template syntax, for `ollama create`).

The Go template is not translated from Jinja source; it is read off rendered conversations: render the Jinja
with placeholder messages, cut out each role's prefix and suffix, rebuild the conversation from those pieces
and check it renders the same. A template that does not decompose this way (e.g. Llama 2's system prompt
inside the first [INST]) gets a plain `{{ .Prompt }}` template and a warning instead of a wrong one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Jinja twins of the lorafit templates that are not Jinja themselves (data/templates.py renders them in
# Python). Keep the strings in step with it: the exported model only answers well in its training format.
ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
NAMED_TEMPLATES = {
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
        "{% else %}{{ '" + ALPACA_HEADER + "\\n\\n' }}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
    ),
    "instruction": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
    ),
    "guanaco": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Human: ' + m['content'] + ' ### Assistant:' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "raw": "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
           "{% endfor %}",
}


def training_chat_template(template: dict[str, Any] | None, tokenizer: Any) -> str | None:
    """Jinja chat template of the training format: template.json's, a named one's twin, else the tokenizer's."""
    template = template or {}
    jinja = template.get("chat_template") or NAMED_TEMPLATES.get(template.get("name") or "")
    jinja = jinja or getattr(tokenizer, "chat_template", None)
    if not jinja or not isinstance(jinja, str):
        return None
    system = template.get("system_prompt")
    if system:  # training put this system message first; make it the default here too
        baked = ("{% if messages and messages[0]['role'] != 'system' %}{% set messages = "
                 f"[{{'role': 'system', 'content': {system!r}}}] + messages %}}{{% endif %}}" + jinja)
        try:
            render(baked, [{"role": "user", "content": "hi"}], True)
            jinja = baked
        except Exception:  # the template refuses a system role; keep it as it is
            pass
    return jinja


def render(jinja: str, messages: list[dict[str, str]], add_generation_prompt: bool,
           bos: str = "", eos: str = "") -> str:
    """Render the way transformers' `apply_chat_template` does (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(jinja).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos, eos_token=eos)


@dataclass
class Turns:
    """Text around each role's content, read off rendered conversations."""

    head: str = ""
    parts: dict[str, tuple[str, str]] = field(default_factory=dict)
    generation: str = ""
    default_system: str | None = None


_U, _A, _U2, _S = "\x02USER\x03", "\x02ASSISTANT\x03", "\x02USER2\x03", "\x02SYSTEM\x03"


def split_turns(jinja: str, eos: str) -> Turns | None:
    """Role prefixes/suffixes of a chat template, or None when the template is not a plain per-turn one."""
    try:
        r = lambda msgs, gen=False: render(jinja, msgs, gen, eos=eos)  # noqa: E731
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
    except Exception:  # a template that raises on these conversations or lacks a role
        return None
    turns = Turns("", {"system": (system_prefix, system_suffix), "user": (user_prefix, user_suffix),
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
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_text(prefix)}{{{{ .Content }}}}{_go_text(suffix)}')
    return "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + _go_text(turns.generation)


def modelfile(gguf_name: str, jinja: str | None, eos: str | None, system: str | None,
              params: dict[str, Any]) -> tuple[str, str | None]:
    """Text of an Ollama Modelfile for `gguf_name` (beside it), and a warning when the template is approximate."""
    lines = [f"# Written by `lorafit export`. Use: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    turns = split_turns(jinja, eos or "") if jinja else None
    warning = None
    if turns is not None:
        lines.append(f'TEMPLATE """{go_template(turns)}"""')
        system = system or turns.default_system
    else:
        lines.append('TEMPLATE """{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"""')
        if jinja:
            warning = ("the chat template does not split into per-role turns; the Modelfile uses a plain "
                       "template: edit its TEMPLATE to match the training format")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in _stops(turns, eos):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    for key, value in params.items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n", warning


def _stops(turns: Turns | None, eos: str | None) -> list[str]:
    """Where a reply ends: the assistant's closing text, the next user turn's opening, the EOS token."""
    stops = []
    if turns is not None:
        stops += [turns.parts["assistant"][1].strip(), turns.parts["user"][0].strip()]
    stops.append(eos or "")
    out = []
    for s in stops:
        if s and s not in out:
            out.append(s)
    return out


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
