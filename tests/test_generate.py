"""generate.py: greedy and seeded sampling, streaming, stop strings, EOS, batched greedy, the lock."""
from __future__ import annotations

import itertools
import threading
import time

import pytest
from helpers import make_run

MSGS = [{"role": "user", "content": "hello world, what is the apple?"}]


@pytest.fixture(scope="module")
def session(llama_run):
    from lorafit.infer.generate import load_session
    from lorafit.run_dir import load_run_config

    return load_session(llama_run, load_run_config(llama_run))


def _gen(**kw):
    from lorafit.config.schema import GenerateArgs

    return GenerateArgs(**{"max_new_tokens": 12, **kw})


def test_session_loads_adapter_and_template(session, llama_run):
    assert not session.model.training
    assert session.template.name == "chatml"
    assert session.name == llama_run.name


def test_session_generates_with_the_adapter_merged(session, llama_run):
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
    from lorafit.infer.generate import _safe_length, cut_at_stop

    stops = ["<|im_end|>", "\nInstruction:"]
    assert _safe_length("Paris<|im", stops) == len("Paris")
    assert _safe_length("Paris\nInstr", stops) == len("Paris")
    assert _safe_length("Paris is", stops) == len("Paris is")
    assert _safe_length("caf\ufffd", stops) == 3
    assert cut_at_stop("a<|im_end|>b\nInstruction:", stops) == ("a", True)
    assert cut_at_stop("abc", stops) == ("abc", False)


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
    for conv, got in zip(convs, batch, strict=True):
        one = generate_text(s.model, s.tokenizer, s.template, conv, _gen(temperature=0, max_new_tokens=8,
                                                                          repetition_penalty=1.0))
        assert got.text == one.text


def test_concurrent_generations_do_not_interleave(session):
    """Three threads generating at once on one model take turns: GENERATION_LOCK lets no model call of one
    generation fall between two of another's (one generation's KV cache and activations in memory at a time).

    Each call has its own KV cache and seeded generator, so the answers agree with or without the lock; the
    order of the model calls is what the lock decides. The hook sleeps 2 ms per call (releasing the GIL), so
    without the lock the threads do interleave."""
    from lorafit.infer.generate import generate_text

    s = session
    gen = _gen(temperature=0.8)
    want = generate_text(s.model, s.tokenizer, s.template, MSGS, gen, seed=3)
    assert want.completion_tokens >= 4  # enough model calls per generation to interleave
    got, calls, start = [], [], threading.Barrier(3)

    def one() -> None:
        start.wait()
        got.append(generate_text(s.model, s.tokenizer, s.template, MSGS, gen, seed=3))

    def hook(_module, _args) -> None:
        calls.append(threading.get_ident())
        time.sleep(0.002)

    handle = s.model.register_forward_pre_hook(hook)
    try:
        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        handle.remove()
    assert got == [want] * 3
    turns = [ident for ident, _ in itertools.groupby(calls)]  # one entry per uninterrupted run of calls
    assert len(turns) == len(set(turns)) == 3, f"{len(turns)} turns for 3 generations"


def test_4bit_session_generates(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")

    from lorafit.infer.generate import generate_text, load_session
    from lorafit.run_dir import load_run_config

    run = make_run(tmp_path / "run", tiny_model_dir("qwen2"), template="alpaca", load_in_4bit=True,
                   bnb_4bit_compute_dtype="float32")
    s = load_session(run, load_run_config(run))  # a 4-bit base keeps its adapter (merging would re-quantize)
    assert type(s.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    r = generate_text(s.model, s.tokenizer, s.template, MSGS, _gen(temperature=0.7, max_new_tokens=4), seed=0)
    assert r.completion_tokens <= 4 and r.prompt_tokens > 0


def test_run_dir_has_what_train_writes(llama_run):
    from lorafit.run_dir import has_adapter, load_run_config

    assert has_adapter(llama_run)
    assert (llama_run / "template.json").is_file()
    assert load_run_config(llama_run).lora.lora_r == 4
