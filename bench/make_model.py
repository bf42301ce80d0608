"""Writes the benchmark model: Llama layout with Phi-3-mini-4k dimensions (hidden 3072, MLP 8192,
32 layers, 32 heads, vocab 32064; 3.8B parameters), random bf16 weights (speed does not depend on
the values), plus a word-level tokenizer of the same vocabulary for loaders that want one.
Unsloth loads Phi-3 in this Llama layout, so all three stacks run the same graph.

usage: python bench/make_model.py OUT_DIR [--tiny | --llama3-8b]
--tiny: the same layout, vocabulary and tokenizer with hidden 256, MLP 512, 2 layers, 4 heads
(a few seconds to load; for the 2-GPU `lorafit train` smoke run in run.sh's `ddp` step).
--llama3-8b: Llama-3-8B's shape (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256; 8.0B
parameters, 16 GB of bf16 safetensors), for bench/qlora8b.sh.
"""
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

PHI3_MINI = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000,
                 "pad_token_id": 32000}


TINY = {**PHI3_MINI, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4}


LLAMA3_8B = {**PHI3_MINI, "hidden_size": 4096, "intermediate_size": 14336, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}


def main(out: str, shape: dict) -> None:
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    for i, tok in ((0, "<unk>"), (1, "<s>"), (32000, "</s>")):
        vocab.pop(f"t{i}")
        vocab[tok] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>", model_max_length=4096).save_pretrained(out)
    print("saved", out, flush=True)


if __name__ == "__main__":
    flags = sys.argv[2:]
    main(sys.argv[1], TINY if "--tiny" in flags else LLAMA3_8B if "--llama3-8b" in flags else PHI3_MINI)
