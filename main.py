"""The first seed's entry point, kept working: `python main.py train|eval|chat`, a thin layer over lorafit's CLI.

    python main.py train [--adapter_path checkpoints/lora_phi3] [--seed 42]   Phi-3-mini + Alpaca-cleaned, QLoRA
    python main.py eval  [--adapter_path checkpoints/lora_phi3] [--seed 42]   base vs tuned on the held-out split
    python main.py chat  [--adapter_path checkpoints/lora_phi3]               interactive (quit / exit / q)

becomes `lorafit train --config configs/phi3_alpaca.yaml --output_dir DIR --seed N`, `lorafit eval
--adapter_path DIR --seed N` and `lorafit chat --adapter_path DIR`. Every other flag passes through,
so any lorafit field works here too. Offline (no Hugging Face hub), train the built-in model instead:

    python main.py train --model smollm2-135m --dataset demo --max_steps 50 --adapter_path runs/demo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_ADAPTER_PATH = "checkpoints/lora_phi3"
DEFAULT_RECIPE = ROOT / "configs" / "phi3_alpaca.yaml"


def lorafit_argv(argv: list[str]) -> list[str]:
    """Translate `main.py COMMAND [options]` into the equivalent `lorafit ...` arguments."""
    p = argparse.ArgumentParser(prog="python main.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["train", "eval", "chat"])
    p.add_argument("--adapter_path", default=DEFAULT_ADAPTER_PATH, help="run directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for training / the validation sample (default: 42)")
    p.add_argument("--config", default=None, help=f"train recipe (default: {DEFAULT_RECIPE.relative_to(ROOT)})")
    args, rest = p.parse_known_args(argv)
    seed = ["--seed", str(args.seed if args.seed is not None else 42)]
    if args.command == "train":
        return ["train", "--config", args.config or str(DEFAULT_RECIPE), "--output_dir", args.adapter_path,
                *seed, *rest]
    if args.config:
        p.error("--config applies to train only: eval and chat read the run directory's config.yaml")
    if args.command == "eval":
        return ["eval", "--adapter_path", args.adapter_path, *seed, *rest]
    prompt, flags = ([rest[0]], rest[1:]) if rest and not rest[0].startswith("--") else ([], rest)
    return ["chat", *prompt, "--adapter_path", args.adapter_path, *(seed if args.seed is not None else []), *flags]


def main(argv: list[str] | None = None) -> int:
    try:
        from lorafit.cli import main as lorafit_main
    except ImportError:  # a plain checkout, not pip-installed: use the package next to this file
        sys.path.insert(0, str(ROOT / "src"))
        from lorafit.cli import main as lorafit_main
    return lorafit_main(lorafit_argv(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    raise SystemExit(main())
