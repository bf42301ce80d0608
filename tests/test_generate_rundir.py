"""Private helper for the generate/chat/eval/merge tests: hand-built run directories.

`make_run(tmp, model_dir, arch_template)` writes what `lorafit train` writes (adapter in PEFT
format, config.yaml, template.json), with a LoRA update that is far from zero so base and
tuned outputs differ. Kept apart from train.py so these tests need nothing but a tiny model.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make_config(model_dir: Path, run_dir: Path, **fields):
    from lorafit.config.checks import validate
    from lorafit.config.schema import Config

    cfg = Config()
    cfg.model.model = str(model_dir)
    cfg.train.output_dir = str(run_dir)
    cfg.lora.lora_r = 4
    cfg.lora.lora_alpha = 8
    cfg.lora.target_modules = "all-linear"
    cfg.eval.max_samples = 8
    cfg.eval.eval_max_new_tokens = 8
    cfg.generate.max_new_tokens = 16
    for key, value in fields.items():
        cfg.set(key, value)
    validate(cfg)
    return cfg


def make_run(run_dir: Path, model_dir: Path, template: str = "chatml", scale: float = 0.3, seed: int = 0,
             nan: bool = False, **fields) -> Path:
    """A run directory with a random non-zero adapter (NaN in one lora_B when `nan`)."""
    import torch

    from lorafit.data.templates import resolve_template
    from lorafit.model.load import load_base_model, load_tokenizer
    from lorafit.model.lora import apply_lora
    from lorafit.run_dir import save_config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = make_config(model_dir, run_dir, template=template, **fields)
    tok = load_tokenizer(cfg)
    model = apply_lora(load_base_model(cfg, torch.device("cpu")), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        if nan:
            next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    model.save_pretrained(run_dir)
    save_config(run_dir, cfg)
    resolve_template(template, tok, "alpaca", cfg.data.system_prompt).save(run_dir)  # as training does
    return run_dir


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("run-llama"), tiny_model_dir("llama"), template="chatml")


def test_run_dir_has_what_train_writes(llama_run):
    from lorafit.run_dir import has_adapter, load_run_config

    assert has_adapter(llama_run)
    assert (llama_run / "template.json").is_file()
    assert load_run_config(llama_run).lora.lora_r == 4
