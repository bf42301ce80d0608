"""Flag parsing: override values stay intact, and chat's PROMPT never swallows a flag's value."""
from lorafit.cli import _split_prompt, parse_overrides


def test_override_values_keep_dashes_and_bare_flags_are_true():
    got = parse_overrides(["--model=/tmp/pytest-of-root/x", "--max-steps", "3", "--packing"])
    assert got == {"model": "/tmp/pytest-of-root/x", "max_steps": "3", "packing": "true"}


def test_chat_prompt_is_split_from_flag_values():
    flags = ("--demo", "--base")
    assert _split_prompt(["--adapter_path", "D", "--temperature", "0", "Hi there"], flags) == (
        ["--adapter_path", "D", "--temperature", "0"], "Hi there")
    assert _split_prompt(["--adapter_path", "D", "--temperature", "0"], flags) == (
        ["--adapter_path", "D", "--temperature", "0"], None)
    assert _split_prompt(["--base", "Hi", "--adapter_path", "D"], flags) == (["--base", "--adapter_path", "D"], "Hi")


def test_chat_parser_leaves_override_values_to_the_config(monkeypatch, tmp_path):
    import lorafit.infer.chat
    from lorafit import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_config", lambda path, overrides: seen.setdefault("overrides", overrides))
    monkeypatch.setattr(lorafit.infer.chat, "chat",
                        lambda run_dir, cfg, prompt, demo, use_adapter: seen.update(prompt=prompt))
    assert cli.cmd_chat(["--adapter_path", str(tmp_path), "--temperature", "0", "What is 2 + 2?"]) == 0
    assert seen == {"overrides": {"temperature": "0"}, "prompt": "What is 2 + 2?"}
