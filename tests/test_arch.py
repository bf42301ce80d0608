"""model/arch.py: the one table of model families and the one fused-path rule."""
from __future__ import annotations

import pytest

from lorafit.config.load import build_config
from lorafit.errors import ConfigError
from lorafit.export.arch import ARCHS
from lorafit.model.arch import FAMILIES, fused_path_choice


def test_8bit_base_with_fast_kernels_on_is_a_config_error():
    with pytest.raises(ConfigError, match="8-bit base"):
        build_config(None, {"load_in_8bit": True, "fast_kernels": "on"})


@pytest.mark.parametrize("settings, model_type, fsdp, cuda, fused", [
    ({"load_in_8bit": True}, "llama", False, True, False),   # auto on a GPU: 8-bit falls back, it does not crash
    ({"load_in_4bit": True}, "llama", False, True, True),
    ({}, "llama", True, True, False),                         # FSDP shards what the kernels read whole
    ({}, "gpt2", False, True, False),                         # no fused layout
    ({}, "llama", False, False, False),                       # auto without CUDA
    ({"fast_kernels": "on"}, "llama", False, False, True),    # asked for on the CPU: it runs (Triton interpreter)
    ({"fast_kernels": "off"}, "llama", False, True, False),
])
def test_fused_path_choice(settings, model_type, fsdp, cuda, fused):
    cfg = build_config(None, settings)
    got, why = fused_path_choice(cfg, model_type, fsdp=fsdp, cuda=cuda)
    assert got is fused and why


def test_preference_methods_take_the_fused_path_and_say_where_a_ref_adapter_runs(tmp_path):
    for method in ("dpo", "orpo", "kto"):
        assert fused_path_choice(build_config(None, {"method": method}), "llama", fsdp=False, cuda=True) == \
            (True, "fused LoRA kernels")
    (tmp_path / "adapter_config.json").write_text("{}")
    cfg = build_config(None, {"method": "dpo", "ref_adapter": str(tmp_path)})
    fused, why = fused_path_choice(cfg, "llama", fsdp=False, cuda=True)
    assert fused and "--ref_adapter reference runs the model's own forward" in why


def test_fast_kernels_on_for_an_unsupported_architecture_says_why():
    cfg = build_config(None, {"fast_kernels": "on"})
    with pytest.raises(ConfigError, match="'gpt2' has no fused path"):
        fused_path_choice(cfg, "gpt2", fsdp=False, cuda=True)


def test_gguf_architectures_come_from_the_family_table():
    assert set(ARCHS) == {name for name, f in FAMILIES.items() if f.gguf_arch}
    assert ARCHS["mistral"].gguf_arch == "llama" and ARCHS["llama"].permute_qk and not ARCHS["phi3"].permute_qk


def test_fp8_base_with_the_fused_kernels_off_is_a_config_error():
    with pytest.raises(ConfigError, match="'fp8_base' needs the fused kernels"):
        build_config(None, {"fp8_base": "all", "fast_kernels": "off"})
