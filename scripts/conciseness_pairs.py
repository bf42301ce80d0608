"""Conciseness preference pairs from OpenAssistant (oasst1): for a prompt with several replies, the chosen
reply is one of at most 100 words (the best-ranked such), the rejected one a longer sibling (the worst-ranked
such); prompts without both kinds give no pair. Writes {"prompt", "chosen", "rejected"} JSON lines.

    python scripts/conciseness_pairs.py OpenAssistant/oasst1 conciseness_pairs.jsonl [--words 100] [--lang en]

The first user turn of each thread is the prompt (oasst1's first-level replies); lorafit then renders it
through the run's template. Reads the data through lorafit's own loaders (a hub id, a file or a folder).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from lorafit.data.sources import load_records


def rank(message: dict) -> float:
    r = message.get("rank")
    return float(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else float("inf")


def conciseness_pairs(messages: list[dict], words: int, lang: str | None) -> list[dict]:
    by_id = {m["message_id"]: m for m in messages}
    replies: dict[str, list[dict]] = defaultdict(list)
    for m in messages:
        if m.get("role") == "assistant" and m.get("parent_id") in by_id and m.get("text", "").strip():
            replies[m["parent_id"]].append(m)
    pairs = []
    for parent_id, kids in replies.items():
        prompt = by_id[parent_id]
        if prompt.get("parent_id") is not None or (lang and prompt.get("lang") != lang):
            continue  # first turns only: a later turn's prompt would need the whole thread before it
        short = sorted((k for k in kids if len(k["text"].split()) <= words), key=rank)
        long = sorted((k for k in kids if len(k["text"].split()) > words), key=rank)
        if short and long:
            pairs.append({"prompt": prompt["text"], "chosen": short[0]["text"], "rejected": long[-1]["text"]})
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="oasst1 as a hub id, file or folder (flat messages)")
    p.add_argument("output", help="the .jsonl to write")
    p.add_argument("--words", type=int, default=100, help="longest chosen reply, in words")
    p.add_argument("--lang", default="en", help="keep prompts in this language ('' for all)")
    args = p.parse_args()
    messages = [r.data for r in load_records(args.source, "train")]
    pairs = conciseness_pairs(messages, args.words, args.lang or None)
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
    print(f"{len(pairs)} pairs (chosen <= {args.words} words, rejected longer) -> {args.output}")


if __name__ == "__main__":
    main()
