"""A local alpaca-format JSONL file of random words (the multi-GPU CLI checks' data: cli2.sh, fsdp2.sh).

usage: python bench/make_jsonl.py PATH [N]   (N records, default 96, seeded)"""
import json
import random
import sys


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 96
    rng = random.Random(0)

    def words(k: int) -> str:
        return " ".join(f"t{rng.randrange(2, 32000)}" for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            rec = {"instruction": words(rng.randrange(8, 60)), "input": "", "output": words(rng.randrange(8, 120))}
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
