"""GRPO's rollout engine (train/rollout_model.py): the merged-weight model samples what the LoRA model would, shares
the training model's embeddings, norms and head, is gone after the rollout, and falls back where it cannot run."""
from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

from lorafit.config.load import build_config
from lorafit.errors import ConfigError
from lorafit.model.load import load_base_model
from lorafit.model.lora import apply_lora
from lorafit.train.rollout import sample
from lorafit.train.rollout_model import ADAPTER, MERGED, merged_policy, rollout_policy, why_not_merged


def lora_model(model_dir, load_in_4bit: bool = False, **fields):
    """The tiny model with LoRA on every linear as training builds it, B random (a zero B merges trivially)."""
    cfg = build_config(None, {"model": str(model_dir), "load_in_4bit": load_in_4bit, "target_modules": "all-linear",
                              "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0, "bnb_4bit_compute_dtype": "float32",
                              **fields})
    model = apply_lora(load_base_model(cfg, torch.device("cpu")), cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_merged_logits_equal_the_adapter_models(tiny_model_dir, load_in_4bit):
    """fp32 on the CPU: the merged model's logits are the LoRA model's to float rounding (measured 1.7e-6 of 0.7,
    1.5e-6 with the NF4 base), its linears are plain, and everything else is the training model's own module."""
    model = lora_model(tiny_model_dir("llama"), load_in_4bit)
    assert why_not_merged(model) is None
    fresh = merged_policy(model, torch.float32)
    lm = model.get_base_model()
    ids = torch.randint(0, 200, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, fresh(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert type(fresh.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert fresh.model.embed_tokens is lm.model.embed_tokens and fresh.lm_head is lm.lm_head
    assert fresh.model.norm is lm.model.norm
    assert fresh.model.layers[1].input_layernorm is lm.model.layers[1].input_layernorm
    assert fresh.model.rotary_emb is lm.model.rotary_emb
    assert not any(p.requires_grad for p in fresh.parameters())


def test_bf16_rollout_casts_upcast_norms_and_shares_the_head(tiny_model_dir):
    """A 4-bit base after k-bit preparation holds fp32 norms and embeddings: the bf16 rollout model gets bf16 copies
    (so its residual stream and KV cache are bf16), keeps the head shared, and its logits under autocast stay near
    the adapter model's fp32 ones (bf16 rounding: measured 1.1e-2 on logits of 0.66)."""
    model = lora_model(tiny_model_dir("llama"), True)
    lm = model.get_base_model()
    assert lm.model.norm.weight.dtype == torch.float32  # peft's prepare_model_for_kbit_training upcast it
    fresh = merged_policy(model, torch.bfloat16)
    assert fresh.model.norm is not lm.model.norm and fresh.model.norm.weight.dtype == torch.bfloat16
    assert fresh.model.embed_tokens.weight.dtype == torch.bfloat16 and fresh.lm_head is lm.lm_head
    assert fresh.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fresh(input_ids=ids).logits.float()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=3e-2, rtol=0)


def test_merged_weights_are_summed_in_fp32_under_the_rollouts_autocast(tiny_model_dir):
    """GRPO samples under autocast: the merged weights built there are the ones built outside (B @ A not rounded
    to bf16 first)."""
    model = lora_model(tiny_model_dir("llama"))
    want = merged_policy(model, torch.float32).model.layers[0].mlp.up_proj.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = merged_policy(model, torch.float32).model.layers[0].mlp.up_proj.weight
    assert torch.equal(got, want)


def test_merged_sampling_equals_the_adapter_path(tiny_model_dir, tiny_tokenizer):
    """Same seed, same GenerationConfig: the same completions token for token (fp32, where the logits agree)."""
    model = lora_model(tiny_model_dir("llama"))
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    kw = {"num_generations": 3, "max_new_tokens": 12, "min_new_tokens": 0, "temperature": 1.0, "top_p": 1.0,
          "top_k": 0, "eos": {tiny_tokenizer.eos_token_id}, "pad_id": tiny_tokenizer.pad_token_id, "seed": 123,
          "decode": tiny_tokenizer.decode, "stops": []}
    adapter = sample(model, prompts, **kw)
    merged = sample(merged_policy(model, torch.float32), prompts, **kw)
    assert torch.equal(merged.input_ids, adapter.input_ids) and merged.texts == adapter.texts
    assert len(set(adapter.texts)) > 1  # really sampled


def test_nothing_of_the_rollout_model_is_held_after_the_rollout(tiny_model_dir, tiny_tokenizer):
    """GRPO._sample builds the merged model, samples, logs the path once, and returns with no instance of the model
    class left but the training model's, counted with the garbage collector off (a reference cycle would hold it
    until a collection, and with it the merged weights, through the loss pass)."""
    from lorafit.train.objectives.grpo import GRPO

    model = lora_model(tiny_model_dir("llama"))
    lines: list[str] = []
    grpo = GRPO.__new__(GRPO)  # only what _sample reads
    grpo.g = build_config(None, {"method": "grpo", "reward_funcs": "length", "num_generations": 2,
                                 "max_completion_length": 6}).grpo
    grpo.gen, grpo.seed, grpo.rollout_path = SimpleNamespace(temperature=1.0, top_p=1.0, top_k=0), 0, None
    template = SimpleNamespace(end_of_turn=None, stop_strings=[])
    r = SimpleNamespace(dtype=torch.float32, tlog=SimpleNamespace(info=lines.append), tokenizer=tiny_tokenizer,
                        data=SimpleNamespace(template=template), d=SimpleNamespace(rank=0))
    cls = type(model.get_base_model())
    gc.collect()
    gc.disable()
    try:
        for step in (1, 2):
            roll = grpo._sample(r, model, [[5, 6, 7], [8, 9]], step)
        alive = [o for o in gc.get_objects() if type(o) is cls]
    finally:
        gc.enable()
    assert roll.input_ids.shape[0] == 4
    assert alive == [model.get_base_model()]
    assert lines == ["grpo rollouts: merged weights (W + scaling * B @ A in float32)"]


def test_falls_back_to_the_adapter_path(tiny_model_dir):
    """The knob, a module the engine cannot map, and DoRA (its magnitude vectors are not folded in): today's path,
    with the reason."""
    model = lora_model(tiny_model_dir("llama"))
    policy, path, why = rollout_policy(model, ADAPTER, torch.float32, 4, 16)
    assert policy is model and path == ADAPTER and "adapter" in why
    policy, path, _ = rollout_policy(model, MERGED, torch.float32, 4, 16)
    assert policy is not model and path == MERGED
    model.get_base_model().model.norm = torch.nn.LayerNorm(64)  # a module the model's own class does not build
    policy, path, why = rollout_policy(model, MERGED, torch.float32, 4, 16)
    assert policy is model and path == ADAPTER and "model.norm is a LayerNorm" in why, why
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    dora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    policy, path, why = rollout_policy(dora, MERGED, torch.float32, 4, 16)
    assert policy is dora and path == ADAPTER and "DoRA" in why


def test_rollout_weights_is_checked():
    with pytest.raises(ConfigError, match="rollout_weights"):
        build_config(None, {"method": "grpo", "reward_funcs": "length", "rollout_weights": "fused"})
