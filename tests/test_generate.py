"""generate.py: greedy and seeded sampling, streaming, stop strings, EOS, batched greedy, the lock."""
from __future__ import annotations

import threading

import pytest
from test_generate_rundir import llama_run  # noqa: F401  (fixture)

MSGS = [{"role": "user", "content": "hello world, what is the apple?"}]


@pytest.fixture(scope="module")
def session(llama_run):  # noqa: F811
    from lorafit.infer.generate import load_session
    from lorafit.run_dir import load_run_config

    return load_session(llama_run, load_run_config(llama_run))


def _gen(**kw):
    from lorafit.config.schema import GenerateArgs

    return GenerateArgs(**{"max_new_tokens": 12, **kw})


def test_session_loads_adapter_and_template(session, llama_run):  # noqa: F811
    assert not session.model.training
    assert session.template.name == "chatml"
    assert session.name == llama_run.name


def test_session_generates_with_the_adapter_merged(session, llama_run):  # noqa: F811
    """Merged in memory: a plain transformers model (no LoRA layers per token) with the adapter's logits."""
    import torch
    from peft import PeftModel

    from lorafit.infer.generate import load_session
    from lorafit.run_dir import load_run_config

    unmerged = load_session(llama_run, load_run_config(llama_run), merge=False)
    assert isinstance(unmerged.model, PeftModel) and not isinstance(session.model, PeftModel)
    assert not any("lora" in n for n, _ in session.model.named_modules())
    ids = torch.tensor([[5, 17, 33, 60, 2, 9]])
    with torch.no_grad():
        merged, adapter = session.model(ids).logits, unmerged.model(ids).logits
        with unmerged.model.disable_adapter():
            base = unmerged.model(ids).logits
    assert torch.allclose(merged, adapter, atol=1e-5) and not torch.allclose(merged, base, atol=1e-3)


def test_greedy_is_deterministic_and_stream_matches(session):
    from lorafit.infer.generate import generate_text, stream_text

    s = session
    a = generate_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0))
    b = generate_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0))
    assert a == b
    assert a.finish_reason == "length" and a.completion_tokens == 12 and a.prompt_tokens > 5
    stream = stream_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0))
    assert stream.result is None
    deltas = list(stream)
    assert len(deltas) > 1, "tokens must stream one by one, not in a single piece"
    assert "".join(deltas) == a.text and stream.result == a


def test_sampling_is_reproducible_with_a_seed(session):
    from lorafit.infer.generate import generate_text

    s = session
    gen = _gen(temperature=1.0, top_p=0.95, top_k=0, repetition_penalty=1.2)
    a = generate_text(s.model, s.tokenizer, s.template, MSGS, gen, seed=7)
    b = generate_text(s.model, s.tokenizer, s.template, MSGS, gen, seed=7)
    others = {generate_text(s.model, s.tokenizer, s.template, MSGS, gen, seed=k).text for k in (1, 2, 3)}
    assert a == b
    assert len(others | {a.text}) > 1


def test_caller_stop_string_is_cut(session):
    from lorafit.infer.generate import generate_text, stream_text

    s = session
    full = generate_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0)).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = generate_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0), stop=[stop])
    assert r.finish_reason == "stop"
    assert r.text == full[: full.find(stop)]
    stream = stream_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0), stop=[stop])
    assert "".join(stream) == r.text


def test_eos_ends_the_reply(session):
    from lorafit.infer.generate import _token_loop, eos_token_ids

    s = session
    assert s.tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(s.model, s.tokenizer, s.template)
    ids = s.tokenizer("hello world")["input_ids"]
    greedy = _greedy_ids(s, ids, 8)
    k = next(i for i, t in enumerate(greedy) if i > 0 and t not in greedy[:i])
    # Treat the k-th greedy token as EOS: the reply must end right before it.
    out = _token_loop(s.model, s.tokenizer, ids, _gen(temperature=0), None, [], {greedy[k]})
    try:
        while True:
            next(out)
    except StopIteration as stop:
        result = stop.value
    assert result.finish_reason == "stop" and result.completion_tokens == k
    assert result.text == s.tokenizer.decode(greedy[:k])


def _greedy_ids(s, ids, n):
    import torch

    with torch.no_grad():
        out = s.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_partial_stop_strings_are_held_back():
    from lorafit.infer.generate import _find_stop, _safe_length

    stops = ["<|im_end|>", "\nInstruction:"]
    assert _safe_length("Paris<|im", stops) == len("Paris")
    assert _safe_length("Paris\nInstr", stops) == len("Paris")
    assert _safe_length("Paris is", stops) == len("Paris is")
    assert _safe_length("caf\ufffd", stops) == 3
    assert _find_stop("a<|im_end|>b\nInstruction:", stops) == 1
    assert _find_stop("abc", stops) is None


def test_raw_prompt_completion(session):
    from lorafit.infer.generate import generate_from_prompt

    s = session
    r = generate_from_prompt(s.model, s.tokenizer, "the apple", _gen(temperature=0, max_new_tokens=5))
    assert r.completion_tokens == 5 and r.prompt_tokens == len(s.tokenizer("the apple")["input_ids"])


def test_batched_greedy_matches_one_by_one(session):
    from lorafit.data.templates import encode_prompt
    from lorafit.infer.generate import eos_token_ids, generate_batch, generate_text

    s = session
    convs = [[{"role": "user", "content": c}] for c in ("hi", "sort the number 3 and 1 please", "apple banana")]
    ids = [encode_prompt(s.template, c, s.tokenizer) for c in convs]
    batch = generate_batch(s.model, s.tokenizer, ids, 8, eos_token_ids(s.model, s.tokenizer, s.template),
                           s.template.stop_strings)
    for conv, got in zip(convs, batch):
        one = generate_text(s.model, s.tokenizer, s.template, conv, _gen(temperature=0, max_new_tokens=8,
                                                                          repetition_penalty=1.0))
        assert got.text == one.text


def test_concurrent_requests_do_not_interleave(session):
    from lorafit.infer.generate import generate_text

    s = session
    want = generate_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0.8), seed=3)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(
        generate_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0.8), seed=3))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 3


def test_4bit_session_generates(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_generate_rundir import make_run

    from lorafit.infer.generate import generate_text, load_session
    from lorafit.run_dir import load_run_config

    run = make_run(tmp_path / "run", tiny_model_dir("qwen2"), template="alpaca", load_in_4bit=True,
                   bnb_4bit_compute_dtype="float32")
    s = load_session(run, load_run_config(run))  # a 4-bit base keeps its adapter (merging would re-quantize)
    assert type(s.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    r = generate_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0.7, max_new_tokens=4), seed=0)
    assert r.completion_tokens <= 4 and r.prompt_tokens > 0
