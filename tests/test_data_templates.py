"""Templates and labels: exact renderings, masking, EOS, truncation, and run-directory round trip."""
from __future__ import annotations

import pytest

from lorafit.data.encode import encode_conversation
from lorafit.data.templates import CHATML, Template, encode_prompt, render_prompt, resolve_template
from lorafit.errors import DataError

ALPACA = [{"role": "user", "content": "Add the numbers.", "input": "2 and 3"}, {"role": "assistant", "content": "5"}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"}]


def _trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])


def test_alpaca_template_text(tok):
    t = resolve_template("alpaca", tok, "alpaca")
    assert t.render(ALPACA, tok, False) == "Instruction: Add the numbers.\nInput: 2 and 3\nResponse: 5<|im_end|>"
    no_input = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert render_prompt(t, no_input, tok) == "Instruction: Say hi.\nResponse:"
    assert "\nInstruction:" in t.stop_strings and "<|im_end|>" in t.stop_strings


def test_instruction_and_guanaco_templates(tok):
    t = resolve_template("instruction", tok, "alpaca")
    assert t.render(ALPACA, tok, False) == (
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5<|im_end|>")
    g = resolve_template("guanaco", tok, "guanaco")
    two = CHAT[1:]
    assert g.render(two, tok, False) == (
        "### Human: Hi### Assistant: Hello<|im_end|>### Human: What is 2 + 2?### Assistant: 4<|im_end|>")
    assert "### Human:" in g.stop_strings


def test_chatml_and_model_templates(tok, plain_tok):
    c = resolve_template("chatml", plain_tok, "messages")
    text = c.render(CHAT, plain_tok, True)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and text.endswith("<|im_start|>assistant\n")
    assert c.stop_strings[0] == "<|im_end|>"
    m = resolve_template("model", tok, "messages")
    assert m.chat_template == tok.chat_template and m.end_of_turn == "<|im_end|>"
    with pytest.raises(DataError, match="chat template"):
        resolve_template("model", plain_tok, "messages")
    with pytest.raises(DataError, match="unknown template"):
        resolve_template("fancy", tok, "alpaca")


def test_auto_template_choice(tok, plain_tok):
    assert resolve_template("auto", tok, "alpaca").name == "model"
    assert resolve_template("auto", tok, "text").name == "raw"
    assert resolve_template("auto", plain_tok, "alpaca").name == "alpaca"
    assert resolve_template("auto", plain_tok, "instruction").name == "alpaca"
    assert resolve_template("auto", plain_tok, "guanaco").name == "guanaco"
    assert resolve_template("auto", plain_tok, "messages").name == "chatml"


@pytest.mark.parametrize("name", ["alpaca", "instruction", "guanaco", "chatml", "model"])
def test_only_replies_and_eos_train(tok, name):
    t = resolve_template(name, tok, "messages")
    ids, labels = encode_conversation(t, CHAT, tok, 512, train_on_inputs=False, truncation="truncate")
    trained = _trained_text(tok, ids, labels)
    assert trained.replace(" ", "") == "Hello<|im_end|>4<|im_end|>"
    assert labels.count(-100) > 0 and ids.count(tok.eos_token_id) >= 2
    all_ids, all_labels = encode_conversation(t, CHAT, tok, 512, train_on_inputs=True, truncation="truncate")
    assert all_ids == ids and all_labels[1:] == ids[1:]


@pytest.mark.parametrize("name", ["alpaca", "instruction", "guanaco", "chatml", "model", "raw"])
def test_generation_prompt_tokens_are_a_prefix_of_training_tokens(tok, name):
    """Chat/eval tokenize the prompt alone: it must match what training saw before the reply."""
    t = resolve_template(name, tok, "alpaca")
    ids, labels = encode_conversation(t, ALPACA, tok, 512, train_on_inputs=False, truncation="truncate")
    prompt = encode_prompt(t, ALPACA[:-1], tok)
    assert ids[: len(prompt)] == prompt
    first_trained = next(i for i, label in enumerate(labels) if label != -100)
    assert first_trained == len(prompt)


def test_raw_text_trains_everything(tok):
    t = resolve_template("raw", tok, "text")
    ids, labels = encode_conversation(t, [{"role": "assistant", "content": "Plain text to learn."}], tok, 64,
                                      False, "truncate")
    assert labels[0] == -100 and labels[1:] == ids[1:] and ids[-1] == tok.eos_token_id


def test_truncate_and_drop(tok):
    t = resolve_template("chatml", tok, "messages")
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    ids, labels = encode_conversation(t, long, tok, 32, False, "truncate")
    assert len(ids) == 32 and all(label == -100 for label in labels)  # reply cut away: nothing trains
    assert encode_conversation(t, long, tok, 32, False, "drop") is None
    with pytest.raises(DataError):
        encode_conversation(t, long, tok, 32, False, "sideways")


def test_system_prompt_is_added_once(tok):
    t = resolve_template("chatml", tok, "messages", system_prompt="You are terse.")
    assert t.render(ALPACA, tok, False).count("You are terse.") == 1
    assert t.render(CHAT, tok, False).count("You are terse.") == 0  # the record's own system wins
    a = resolve_template("alpaca", tok, "alpaca", system_prompt="You are terse.")
    assert a.render(ALPACA, tok, False).startswith("You are terse.\n\nInstruction:")


def test_template_round_trips_through_run_dir(tmp_path, tok):
    t = resolve_template("model", tok, "alpaca", system_prompt="sys")
    t.save(tmp_path)
    assert (tmp_path / "template.json").is_file()
    back = Template.load(tmp_path)
    assert back == t and Template.from_dict(t.to_dict()) == t
    assert render_prompt(back, ALPACA, tok) == render_prompt(t, ALPACA, tok)
    with pytest.raises(DataError, match="template.json"):
        Template.load(tmp_path / "nowhere")


def test_chatml_renders_without_a_tokenizer():
    t = Template("chatml", chat_template=CHATML)
    assert t.render(ALPACA[:-1], None, True).endswith("Add the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n")
