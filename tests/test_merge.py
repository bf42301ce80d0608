"""merge.py: merged logits equal the adapter model's (fp32 and from 4-bit runs), NaN/drift refused."""
from __future__ import annotations

import json

import pytest
from helpers import make_run


def _adapter_vs_merged(run, out):
    """Max |logit difference| between PeftModel on the fp32 base and the merged folder (upcast to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.data.templates import Template
    from lorafit.export.merge import check_inputs, merge_config
    from lorafit.model.load import load_base_model
    from lorafit.model.lora import load_adapter
    from lorafit.run_dir import load_run_config

    cfg = merge_config(load_run_config(run))
    adapter = load_adapter(load_base_model(cfg, torch.device("cpu")), run).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    worst, scale = 0.0, 1.0
    with torch.no_grad():
        for ids in check_inputs(Template.load(run), tok):
            x = torch.tensor([ids])
            want, got = adapter(input_ids=x).logits, merged(input_ids=x).logits
            with adapter.disable_adapter():
                assert (adapter(input_ids=x).logits - want).abs().max() > 1e-2  # the adapter does something
            worst = max(worst, float((got - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
    return worst / scale


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_merged_equals_adapter_fp32(arch, tiny_model_dir, tmp_path):
    from lorafit.export.merge import merge_to_folder
    from lorafit.run_dir import load_run_config

    run = make_run(tmp_path / "run", tiny_model_dir(arch), template="chatml")
    out = merge_to_folder(run, tmp_path / "merged", load_run_config(run))
    assert _adapter_vs_merged(run, out) < 1e-5
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "template.json",
            "README.md"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merge_of_a_4bit_run_is_bf16(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorafit.export.merge import merge_to_folder
    from lorafit.run_dir import load_run_config

    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="alpaca", load_in_4bit=True,
                   bnb_4bit_compute_dtype="float32")
    out = merge_to_folder(run, tmp_path / "merged", load_run_config(run))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert _adapter_vs_merged(run, out) < 2e-2  # bf16 rounding of W' only (see merge.TOLERANCE)
    assert "4-bit NF4" in (out / "README.md").read_text()


def test_nan_adapter_is_refused_with_exit_code_3(tiny_model_dir, tmp_path, capsys):
    from lorafit.cli import main

    run = make_run(tmp_path / "run", tiny_model_dir("llama"), nan=True)
    out = tmp_path / "out" / "merged"
    assert main(["merge", "--adapter_path", str(run), "--output_dir", str(out)]) == 3
    err = capsys.readouterr().err
    assert "NaN" in err and "Traceback" not in err
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_drift_is_refused_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import lorafit.export.merge as merge_mod

    run = make_run(tmp_path / "run", tiny_model_dir("qwen2"))
    monkeypatch.setitem(merge_mod.TOLERANCE, "float32", 0.0)  # any rounding now counts as drift
    from lorafit.run_dir import load_run_config

    with pytest.raises(merge_mod.MergeCheckError, match="max abs diff") as err:
        merge_mod.merge_to_folder(run, tmp_path / "merged", load_run_config(run))
    assert err.value.exit_code == 3
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_output_dir_must_be_new(tiny_model_dir, tmp_path, capsys):
    from lorafit.cli import main

    run = make_run(tmp_path / "run", tiny_model_dir("llama"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert main(["merge", "--adapter_path", str(run), "--output_dir", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


def test_merge_takes_a_system_prompt_given_now(tiny_model_dir, tmp_path):
    """template.json of the merged folder (what export and chat read) keeps the trained system prompt unless
    --system_prompt is given to merge, as chat does."""
    from lorafit.data.templates import Template
    from lorafit.export.merge import merge_to_folder
    from lorafit.run_dir import load_run_config

    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="chatml", system_prompt="Be brief.")
    kept = merge_to_folder(run, tmp_path / "m1", load_run_config(run))
    assert Template.load(kept).system_prompt == "Be brief."
    new = merge_to_folder(run, tmp_path / "m2", load_run_config(run, {"system_prompt": "Be a pirate."}))
    assert Template.load(new).system_prompt == "Be a pirate."


def test_merged_chat_template_carries_the_trained_system_prompt(tiny_model_dir, tmp_path):
    """apply_chat_template on the merged folder builds the prompt training built, system prompt included."""
    from transformers import AutoTokenizer

    from lorafit.data.templates import Template
    from lorafit.export.merge import merge_to_folder
    from lorafit.run_dir import load_run_config

    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="chatml", system_prompt="Answer in one word.")
    out = merge_to_folder(run, tmp_path / "merged", load_run_config(run))
    tok = AutoTokenizer.from_pretrained(out)
    template = Template.load(run)
    conv = [{"role": "user", "content": "What is 2 + 2?"}]
    want = template.render(conv, tok, add_generation_prompt=True)
    assert "Answer in one word." in want
    assert tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == want


def test_byte_level_tokenizer_json_loses_the_sentencepiece_decoder(tiny_tokenizer_dir, tmp_path):
    """What transformers' GGUF loader writes for SmolLM2 (byte_fallback and a SentencePiece-style decoder on a
    byte-level vocabulary) becomes a plain byte-level tokenizer.json, encoding and decoding the same."""
    import shutil

    from transformers import AutoTokenizer

    from lorafit.export.vocab import plain_byte_level

    folder = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, folder)
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    path.write_text(json.dumps(spec))
    text = "hello world, Monday: apple & banana ü 12 <|im_end|>"
    before = AutoTokenizer.from_pretrained(folder)
    ids = before(text)["input_ids"]
    plain_byte_level(path)
    spec = json.loads(path.read_text())
    assert spec["model"]["byte_fallback"] is False and spec["decoder"]["type"] == "ByteLevel"
    after = AutoTokenizer.from_pretrained(folder)
    assert after(text)["input_ids"] == ids and after.decode(ids) == before.decode(ids) == text
