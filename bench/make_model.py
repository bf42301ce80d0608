"""Writes the benchmark model: Llama layout with Phi-3-mini-4k dimensions (hidden 3072, MLP 8192,
32 layers, 32 heads, vocab 32064; 3.8B parameters), random bf16 weights (speed does not depend on
the values), plus a word-level tokenizer of the same vocabulary for loaders that want one.
Unsloth loads Phi-3 in this Llama layout, so all three stacks run the same graph.

usage: python bench/make_model.py OUT_DIR [--tiny]
--tiny: the same layout, vocabulary and tokenizer with hidden 256, MLP 512, 2 layers, 4 heads
(a few seconds to load; for the 2-GPU `lorafit train` smoke run in run.sh's `ddp` step).
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


def main(out: str, tiny: bool = False) -> None:
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**(TINY if tiny else PHI3_MINI)), dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(PHI3_MINI["vocab_size"])}
    for i, tok in ((0, "<unk>"), (1, "<s>"), (32000, "</s>")):
        vocab.pop(f"t{i}")
        vocab[tok] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>", model_max_length=4096).save_pretrained(out)
    print("saved", out, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], tiny="--tiny" in sys.argv[2:])
