"""The JSON line bench/fsdp2.sh prints: what each run under /tmp/fsdp2 did, against its one-process reference.

usage: N=2 python3 bench/fsdp2_check.py   (after bench/fsdp2.sh's runs; logs in $OUT/fsdp2-NAME.log)"""
import json
import math
import os
import re
from pathlib import Path

W, OUT, N = Path("/tmp/fsdp2"), Path(os.environ.get("OUT", "/tmp/bench-out")), int(os.environ.get("N", "2"))
REFERENCE = {"torchrun": "single", "accelerate": "single", "resume1": "single", "qlora": "qlora_single",
             "qlora_accel": "qlora_single", "qlora_offload": "qlora_single", "qlora_resume1": "qlora_single"}


def losses(run):
    p = run / "metrics.jsonl"
    if not p.is_file():
        return {}
    return {m["step"]: m["loss"] for m in map(json.loads, p.read_text().splitlines()) if "loss" in m}


def loads(run, four_bit):
    """PeftModel.from_pretrained on the tiny base (4-bit where the run was); finite logits on a few tokens."""
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.bfloat16),
              "device_map": {"": 0}} if four_bit else {}
        base = AutoModelForCausalLM.from_pretrained(str(W / "tiny"), dtype=torch.bfloat16, **kw)
        model = PeftModel.from_pretrained(base, str(run))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 5, 9, 13]], device=base.device)).logits
        return bool(torch.isfinite(logits).all())
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:200]


def check(name):
    run, log = W / name, OUT / f"fsdp2-{name}.log"
    text = log.read_text() if log.is_file() else ""
    got = losses(run)
    peak = re.search(r"peak memory per rank \(([^)]*)\): ([\d., ]+) GiB", text)
    done_peak = re.search(r"peak memory ([\d.]+) GiB", text)
    load_peak = re.search(r"fsdp: peak while loading ([\d.]+) GiB", text)
    procs = re.search(r"x (\d+) process", text)
    adapter = loads(run, name.startswith("qlora")) if (run / "adapter_config.json").is_file() else None
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
    res = {"ran": log.is_file(), "processes_in_log": int(procs.group(1)) if procs else None,
           "fsdp_in_log": "fsdp: FSDP2 over" in text,
           "fast_path_off_for_fsdp": "the fused kernels read whole base weights, which FSDP shards" in text,
           "four_bit_sharded": (re.search(r"fsdp: 4-bit base: [^\n]*", text) or [None])[0],
           "adapter_written": (run / "adapter_model.safetensors").is_file(),
           "peft_loads_finite": adapter,
           "metrics_steps": sorted(got), "losses": [round(v, 4) for _, v in sorted(got.items())],
           "finite": all(math.isfinite(v) for v in got.values()) and len(got) > 0,
           "checkpoints": ckpts,
           "peak_gib_per_rank": [float(x) for x in peak.group(2).split(",")] if peak else
           ([float(done_peak.group(1))] if done_peak else None),
           "load_peak_gib_rank0": float(load_peak.group(1)) if load_peak else None,
           "errors": [x[:200] for x in text.splitlines() if x.startswith(("error:", "Traceback"))][:3]}
    if name in REFERENCE:
        ref = losses(W / REFERENCE[name])
        res["max_rel_loss_diff_vs_" + REFERENCE[name]] = max(
            (abs(got[s] - ref[s]) / abs(ref[s]) for s in got if s in ref), default=None)
    for line in text.splitlines():
        if line.startswith("fsdp: accelerate settings used"):
            res["accelerate_settings"] = line[len("fsdp: "):][:300]
    return res


names = [n for n in ("torchrun", "accelerate", "single", "resume1", "qlora", "qlora_accel", "qlora_offload",
                     "qlora_single", "qlora_resume1") if (OUT / f"fsdp2-{n}.log").is_file()]
print(json.dumps({"fsdp2": True, "gpus": N, **{n: check(n) for n in names}}))
