"""Writes bench/alpaca_lengths.txt: one integer a line, the token count of each
alpaca_en_demo.json record in the Alpaca prompt template plus EOS, and
bench/alpaca_prompt_lengths.txt: the prompt part of each (masked from the loss).

Only integer lengths leave this script, never the records (../shared/data stays out of the
repo). Tokenizer: Mistral-7B-v0.1's 32k SentencePiece model shipped inside the
`mistral-common` wheel, a stand-in for Phi-3-mini's Llama-2 32k SentencePiece tokenizer
(no hub access here); both split English text into about the same number of pieces.

usage: python bench/make_lengths.py ../shared/data/alpaca_en_demo.json /path/to/tokenizer.model.v1 [--ids]
--ids also writes .bench-data/alpaca_ids.json (token ids, for bench/loss_check.py; git-ignored, carried
to the GPU machine, never committed).
"""
import json
import sys
from pathlib import Path

import sentencepiece as spm

PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{inp}### Response:\n")


def main(data_path: str, sp_path: str, write_ids: bool = False) -> None:
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    out = Path(__file__).parent
    total, prompt, ids = [], [], []
    for rec in json.loads(Path(data_path).read_text()):
        inp = f"### Input:\n{rec['input']}\n\n" if rec["input"] else ""
        ctx = ", paired with an input that provides further context" if rec["input"] else ""
        p_ids = [1] + sp.encode(PROMPT.format(ctx=ctx, instruction=rec["instruction"], inp=inp))  # BOS + prompt
        full = p_ids + sp.encode(rec["output"]) + [2]  # + EOS
        total.append(len(full))
        prompt.append(len(p_ids))
        ids.append([len(p_ids), full])
    (out / "alpaca_lengths.txt").write_text("".join(f"{n}\n" for n in total))
    (out / "alpaca_prompt_lengths.txt").write_text("".join(f"{n}\n" for n in prompt))
    if write_ids:
        d = out.parent / ".bench-data"
        d.mkdir(exist_ok=True)
        (d / "alpaca_ids.json").write_text(json.dumps(ids))
    print(f"{len(total)} records, mean {sum(total) / len(total):.1f} tokens, max {max(total)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--ids" in sys.argv[3:])
