"""The `lorafit` command: one small function per subcommand, mapping flags onto the config.

Every config field is a flag of the same name (`--lora_r 8`, `--packing`, `--packing false`).
Mistakes the user can fix raise `UserError` and end here with one message and exit code 2;
anything else keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.console import quiet_libraries
from lorafit.errors import UserError

USAGE = """lorafit COMMAND [options]

commands:
  train     fine-tune a LoRA / QLoRA adapter           lorafit train --config configs/quickstart.yaml
  eval      base vs tuned: perplexity, ROUGE-L, BLEU   lorafit eval --adapter_path runs/quickstart
  chat      talk to the tuned model                     lorafit chat --adapter_path runs/quickstart "Hi"
  merge     merge the adapter into the base, verified   lorafit merge --adapter_path DIR --output_dir OUT
  export    write a GGUF file (llama.cpp, Ollama)       lorafit export --adapter_path DIR --output m.gguf
  serve     OpenAI-compatible API and chat page         lorafit serve --adapter_path DIR --port 8000
  data      check a dataset before training             lorafit data alpaca.json --model smollm2-135m
  doctor    what this machine can run                   lorafit doctor

Every config field is also a flag: `lorafit train --help` lists them. --verbose (any command) shows the
libraries' own warnings and progress bars (otherwise in the run's libraries.log)."""


def parse_overrides(rest: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` / bare `--flag` (true) pairs into a dict of raw values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or tok == "--":
            raise UserError(f"unexpected argument '{tok}'", fix="options take the form --field value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value = rest[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        out[key.replace("-", "_")] = value
    return out


def _split_prompt(argv: list[str], flags: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Take the positional PROMPT out of argv: a word after `--key` is that key's value, not the prompt."""
    rest, prompt, i = [], None, 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-") and tok not in flags and "=" not in tok and i + 1 < len(argv) \
                and not argv[i + 1].startswith("--"):
            rest += [tok, argv[i + 1]]
            i += 2
            continue
        if not tok.startswith("-") and prompt is None:
            prompt = tok
        else:
            rest.append(tok)
        i += 1
    return rest, prompt


def _fields_help() -> str:
    from lorafit.config.schema import _SECTION_OF, SECTIONS, Config, field_help

    lines = []
    defaults = Config()
    for section in SECTIONS:
        lines.append(f"\n{section}:")
        for key, owner in _SECTION_OF.items():
            if owner == section:
                lines.append(f"  --{key:<30} {field_help(key)} (default: {defaults.get(key)!r})")
    return "\n".join(lines)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"lorafit {prog}", description=description, epilog="config fields:" + _fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True,
    )


def _run_config(adapter_path: str, overrides: dict[str, Any]):
    from lorafit.run_dir import load_run_config

    return load_run_config(adapter_path, overrides)


def cmd_train(argv: list[str]) -> int:
    p = _parser("train", "Fine-tune a LoRA (or QLoRA, with --load_in_4bit) adapter.")
    p.add_argument("--config", help="recipe YAML (configs/*.yaml); flags override its fields")
    args, rest = p.parse_known_args(argv)
    from lorafit.config.load import build_config

    overrides = parse_overrides(rest)
    cfg = build_config(args.config, overrides)
    if cfg.train.resume and (Path(cfg.train.output_dir) / "config.yaml").is_file():
        # A run describes itself: --resume starts from its saved config, with this command's settings on top.
        from lorafit.config.load import load_yaml

        cfg = _run_config(cfg.train.output_dir, {**(load_yaml(args.config) if args.config else {}), **overrides})
    from lorafit.train.loop import train

    train(cfg)
    return 0


def cmd_eval(argv: list[str]) -> int:
    p = _parser("eval", "Compare the base model with the tuned one on the held-out split.")
    p.add_argument("--adapter_path", required=True, help="run directory written by `lorafit train`")
    args, rest = p.parse_known_args(argv)
    cfg = _run_config(args.adapter_path, parse_overrides(rest))
    if cfg.train.method != "sft":  # a preference run: accuracy and margin on held-out pairs
        from lorafit.evaluate.preference import evaluate_preference

        evaluate_preference(Path(args.adapter_path), cfg)
        return 0
    from lorafit.evaluate.run import evaluate

    evaluate(Path(args.adapter_path), cfg)
    return 0


def cmd_chat(argv: list[str]) -> int:
    p = _parser("chat", "Chat with the tuned model (one answer with PROMPT, else an interactive loop).")
    p.add_argument("--adapter_path", required=True, help="run directory written by `lorafit train`")
    # PROMPT (answer once and exit) is taken out by _split_prompt: an argparse positional would
    # swallow the value of an override flag such as `--temperature 0`.
    p.usage = "lorafit chat --adapter_path DIR [--demo] [--base] [--FIELD VALUE ...] [PROMPT]"
    p.add_argument("--demo", action="store_true", help="answer a set of built-in prompts")
    p.add_argument("--base", action="store_true", help="use the base model without the adapter")
    argv, prompt = _split_prompt(argv, flags=("--demo", "--base", "-h", "--help"))
    args, rest = p.parse_known_args(argv)
    args.prompt = prompt
    from lorafit.infer.chat import chat

    cfg = _run_config(args.adapter_path, parse_overrides(rest))
    chat(Path(args.adapter_path), cfg, prompt=args.prompt, demo=args.demo, use_adapter=not args.base)
    return 0


def cmd_merge(argv: list[str]) -> int:
    p = _parser("merge", "Merge the adapter into the base, save safetensors, check logits match.")
    p.add_argument("--adapter_path", required=True, help="run directory written by `lorafit train`")
    p.add_argument("--output_dir", required=True, help="folder for the merged model")
    args, rest = p.parse_known_args(argv)
    from lorafit.export.merge import merge

    merge(Path(args.adapter_path), Path(args.output_dir), _run_config(args.adapter_path, parse_overrides(rest)))
    return 0


def cmd_export(argv: list[str]) -> int:
    p = _parser("export", "Write a GGUF file (for llama.cpp and Ollama) from an adapter or a merged folder.")
    p.add_argument("--adapter_path", required=True, help="run directory, or a merged model folder")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="export format")
    p.add_argument("--output", required=True, help="the .gguf file to write")
    from lorafit.export.quant_mix import DTYPES

    p.add_argument("--dtype", default="f16", choices=DTYPES,
                   help="tensor type; q4_k_m is the usual pick (the _s/_m mixes follow llama.cpp's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .gguf and its Modelfile")
    p.add_argument("--skip_perplexity", action="store_true",
                   help="for a quantized dtype, skip the held-out perplexity check (per-tensor errors still shown)")
    p.add_argument("--imatrix", action="store_true",
                   help="weigh the rounding by importance from the run's training data (mean squared activations)")
    args, rest = p.parse_known_args(argv)
    from lorafit.export.gguf import export_gguf

    export_gguf(Path(args.adapter_path), Path(args.output), args.dtype, parse_overrides(rest),
                overwrite=args.overwrite, perplexity=not args.skip_perplexity, imatrix=args.imatrix)
    return 0


def cmd_serve(argv: list[str]) -> int:
    p = _parser("serve", "Serve an OpenAI-compatible API and a chat page.")
    p.add_argument("--adapter_path", required=True, help="run directory written by `lorafit train`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--allowed_hosts", help="Host header names to accept, comma-separated ('*': any; default: "
                   "localhost, 127.0.0.1, ::1 and the --host address)")
    p.add_argument("--cors_origins", help="origins whose pages may call the API, e.g. http://localhost:3000 "
                   "('*': any; default: none, only the server's own page)")
    p.add_argument("--api_key", default=os.environ.get("LORAFIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LORAFIT_API_KEY, else no key)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a client may take to send a request")
    args, rest = p.parse_known_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port", fix="pass a port in 1-65535 (0: any free one)")
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout} must be > 0 seconds")
    from lorafit.serve.access import Access
    from lorafit.serve.http import serve

    cfg = _run_config(args.adapter_path, parse_overrides(rest))
    access = Access.build(args.host, args.allowed_hosts, args.cors_origins, args.api_key)
    serve(Path(args.adapter_path), cfg, host=args.host, port=args.port, access=access, timeout=args.timeout)
    return 0


def cmd_data(argv: list[str]) -> int:
    p = _parser("data", "Report on a dataset before training: format, lengths, masking, problems.")
    p.add_argument("source", nargs="?", help="dataset: file, folder, hub id or `demo`")
    p.add_argument("--config", help="recipe YAML whose data and model settings to use")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--split", choices=["auto", "none"], default="auto",
                   help="none: report the whole file with no train/validation split (a test file; same as "
                        "--val_size 0)")
    args, rest = p.parse_known_args(argv)
    from lorafit.config.load import build_config
    from lorafit.data.check import data_command

    overrides = parse_overrides(rest)
    if args.source:
        overrides["dataset"] = args.source
    if args.split == "none":
        overrides["val_size"] = 0
    return data_command(build_config(args.config, overrides), as_json=args.json)


def cmd_doctor(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="lorafit doctor", description="What this machine can run.").parse_args(argv)
    from lorafit.doctor import doctor

    return doctor()


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train, "eval": cmd_eval, "chat": cmd_chat, "merge": cmd_merge, "export": cmd_export,
    "serve": cmd_serve, "data": cmd_data, "doctor": cmd_doctor,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from lorafit import __version__

        print(f"lorafit {__version__}")
        return 0
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command '{argv[0]}'\n\n{USAGE}", file=sys.stderr)
        return 2
    quiet_libraries(verbose)
    try:
        return command(argv[1:]) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
