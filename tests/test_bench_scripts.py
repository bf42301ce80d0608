"""The GPU benchmark's scripts run once, on a machine with no chance to debug: their CPU-runnable parts here."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

BENCH = REPO / "bench"


def test_run_sh_parses_and_expands_its_groups():
    assert subprocess.run(["bash", "-n", str(BENCH / "run.sh")], check=False).returncode == 0
    text = (BENCH / "run.sh").read_text()
    for step in ("rcp:phi3_alpaca:all peer:unsloth peer:hf", "sh:lorafit:graphs@llama3-8b", "graphs_check.py",
                 "mem32k:unsloth loss"):
        assert step in text


def test_recipe_data_has_the_real_lengths(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "recipe.py"), "configs/phi3_alpaca.yaml", "unused", str(tmp_path),
                          "--data-only"], check=True, capture_output=True, text=True, cwd=REPO)
    assert json.loads(out.stdout)["records"] == 899
    recs = [json.loads(x) for x in (tmp_path / "alpaca_lengths.json").read_text().splitlines()]
    lens = [int(x) for x in (BENCH / "alpaca_lengths.txt").read_text().split()]
    prompts = [int(x) for x in (BENCH / "alpaca_prompt_lengths.txt").read_text().split()]
    assert len(recs) == 899
    assert [len(r["output"].split()) for r in recs] == [max(1, n - p) for n, p in zip(lens, prompts, strict=True)]


def test_table_puts_the_recipe_shape_first_with_its_target(tmp_path):
    lines = [{"stack": "unsloth", "shape": "8x512", "tok_s": 100, "peak_gib": 3.0},
             {"stack": "lorafit", "shape": "8x512", "tok_s": 170, "peak_gib": 3.2},
             {"stack": "lorafit", "shape": "recipe", "tok_s": 18000, "peak_gib": 3.9},
             {"stack": "unsloth", "bs": 4, "acc": 4, "real_tok_s": 3500, "peak_gib": 3.2},
             {"stack": "hf", "bs": 4, "acc": 4, "real_tok_s": 1800, "peak_gib": 5.4}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = subprocess.run([sys.executable, str(BENCH / "table.py"), str(path)], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    rows = [x for x in table if x.startswith("| ") and "---" not in x][1:]
    assert [r.split(" | ")[1] for r in rows[:3]] == ["recipe"] * 3
    lorafit = next(r for r in rows if r.startswith("| lorafit | recipe"))
    assert "5.14" in lorafit and "met (>= 5.0x at <= 1.25x mem)" in lorafit
    assert "met (>= 1.6x" in next(r for r in rows if r.startswith("| lorafit | 8x512"))


def test_dpo_table_says_which_loss_path_ran(tmp_path):
    rows = [{"stack": "lorafit", "path": "fused", "pairs_per_s": 3.0, "tokens_per_s": 9000, "peak_gib": 5.0,
             "steps_timed": 17},
            {"stack": "trl", "path": "trl", "pairs_per_s": 1.0, "tokens_per_s": 3000, "peak_gib": 5.5,
             "steps_timed": 17}]
    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    out = subprocess.run([sys.executable, str(BENCH / "dpo_bench.py"), "table", str(path)], check=True,
                         capture_output=True, text=True).stdout
    assert "| lorafit | fused | 3.00 | 9000 |" in out and "3.00x tokens/s" in out


def test_recipe_reports_the_second_half_of_its_steps(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("recipe_bench", BENCH / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val_loss": 2.0}] + [{"step": i, "tokens": 1000, "step_time": 1.0 if i <= 2 else 0.25}
                                              for i in range(1, 5)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert recipe.late_tok_s(metrics, 2) == 4000       # steps 3 and 4: 2,000 tokens in 0.5 s
    assert recipe.late_tok_s(metrics, 4) is None
