"""An importance matrix for quantization (`lorafit export --imatrix`), from the run's own training data.

For every linear layer, the mean squared activation of each input column over a few batches of training
conversations (rendered with the run's template): a weight that multiplies large inputs moves the output more
when it is rounded, so the quantizers' scale searches weigh its error more (quants.py, quants_legacy.py).
llama.cpp computes the same statistic with a separate `llama-imatrix` run over a text file; here it comes from
the data the adapter learned.

  importance(folder, run_dir, cfg, plans)   {GGUF tensor name: (cols,) float32}
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorafit.data.encode import encode_conversation, load_conversations, split_conversations
from lorafit.data.templates import Template

if TYPE_CHECKING:
    from lorafit.config.schema import Config
    from lorafit.export.arch import TensorPlan

SEQUENCES = 64  # training conversations run through the model; the statistic settles well before (SmolLM2-135M)


def importance(folder: Path, run_dir: Path, cfg: Config, plans: list[TensorPlan],
               sequences: int = SEQUENCES) -> dict[str, torch.Tensor]:
    """Mean x^2 per input column of every planned 2-D weight that is a linear layer's (the tied embedding gets
    the output head's, which is what it is used as)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = Template.load(run_dir)
    train, _, _ = split_conversations(load_conversations(cfg)[0], cfg)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def collect(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (tokens, cols)
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return collect

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            for conv in train[:sequences]:
                enc = encode_conversation(template, conv, tokenizer, cfg.data.max_seq_length, False, "truncate")
                if enc is not None:
                    model(input_ids=torch.tensor([enc[0]]))
    finally:
        for h in handles:
            h.remove()
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for plan in plans:
        if plan.source is None or len(plan.shape) != 2:
            continue
        module = "lm_head" if tied and plan.name == "token_embd.weight" else plan.source.removesuffix(".weight")
        if module in sums:
            out[plan.name] = sums[module] / max(counts[module], 1)
    return out
