"""Text generation for chat, eval, serving and training previews: sampling, streaming, stop strings.

One token loop with a KV cache serves every caller, so streaming needs no thread and a seed
makes sampling reproducible (a private `torch.Generator`, never the global RNG state).
Generation stops at any EOS id (the tokenizer's, the model's generation config's and the
template's end-of-turn token), or at a stop string: the template's and the caller's. A stop
string is cut from the text; while it may still be forming, the streamed text holds back the
characters that could start it, so no client ever sees half of '<|im_end|>'.

    session = load_session(run_dir, cfg)
    result = generate_text(session.model, session.tokenizer, session.template, messages, cfg.generate)
    stream = stream_text(...); for delta in stream: print(delta, end=""); stream.result.finish_reason

All model calls hold `GENERATION_LOCK` (re-entrant), so a server answering requests one
after another from several threads never interleaves two generations on one KV cache.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.data.templates import Template, encode_prompt
from lorafit.model.load import default_device, load_base_model, load_tokenizer, resolve_model
from lorafit.model.lora import load_adapter
from lorafit.run_dir import require_adapter

if TYPE_CHECKING:
    from lorafit.config.schema import Config, GenerateArgs

GENERATION_LOCK = threading.RLock()


@dataclass
class Session:
    """What chat, eval, serve and previews need to generate."""

    model: Any
    tokenizer: Any
    template: Template
    device: Any
    name: str
    """The run directory's name (serve reports it as the model id)."""


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length' (max_new_tokens reached)."""


def load_session(run_dir: Path, cfg: Config, use_adapter: bool = True, merge: bool = True) -> Session:
    """Tokenizer, base (quantized as trained, in the compute dtype) and the run's adapter, in eval mode.

    With use_adapter=False the base answers alone, through the same template (a fair comparison).
    With merge (the default) the adapter is merged into the weights in memory (see merged_for_inference);
    merge=False keeps the PeftModel, whose disable_adapter() gives the base back (eval scores both).
    """

    run_dir = Path(run_dir)
    if use_adapter:
        require_adapter(run_dir)
    template = run_template(run_dir, cfg)
    device = default_device()
    source = resolve_model(cfg)
    tokenizer = load_tokenizer(cfg, source)
    model = load_base_model(cfg, device, source)
    if use_adapter:
        model = load_adapter(model, run_dir)
    model.eval()
    if use_adapter and merge:
        model = merged_for_inference(model)
    return Session(model=model, tokenizer=tokenizer, template=template, device=device,
                   name=run_dir.resolve().name)


def merged_for_inference(model):
    """The adapter merged into the base weights (W + scaling * B @ A), in place, when the base is not quantized.

    An unmerged adapter adds two small matmuls, a dropout and an add to every adapted linear layer for every
    token (all-linear on SmolLM2: 7 x 30 extra module calls per token). Merged, the model is a plain
    transformers model again, with the base's cost per token. A 4-bit or
    8-bit base keeps its adapter: merging would re-quantize W + BA and lose the update to rounding, and
    bitsandbytes' matmul dominates there anyway.
    """
    quantized = getattr(getattr(model, "config", None), "quantization_config", None) is not None \
        or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized or not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload(progressbar=False, safe_merge=False).eval()


def run_template(run_dir: Path, cfg: Config) -> Template:
    """The run's template.json, with `cfg.data.system_prompt` in place of the trained one when they differ.

    `cfg` is the run's config.yaml with this command's flags on top (load_run_config), and training built the
    template from that same system_prompt, so the two differ only when --system_prompt was given now
    ('' drops the trained one); the rest of the template (how prompts are rendered) stays the run's.
    """
    template = Template.load(run_dir)
    if cfg.data.system_prompt != template.system_prompt:
        logging.getLogger("lorafit").info("system prompt: %r (trained with %r)", cfg.data.system_prompt,
                                          template.system_prompt)
        template = dataclasses.replace(template, system_prompt=cfg.data.system_prompt)
    return template


class TextStream:
    """Iterator over text deltas; once exhausted, `.result` holds the GenerationResult.

    Close it (or run it to the end) to release the generation lock early; garbage collection
    closes an abandoned stream too.
    """

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def close(self) -> None:
        self._gen.close()


def generate_text(model, tokenizer, template: Template, messages: list[dict], gen: GenerateArgs,
                  seed: int | None = None, stop: list[str] | None = None) -> GenerationResult:
    """Answer the conversation `messages` (rendered with the run's template) in one go."""
    stream = stream_text(model, tokenizer, template, messages, gen, seed=seed, stop=stop)
    for _ in stream:
        pass
    return stream.result


def stream_text(model, tokenizer, template: Template, messages: list[dict], gen: GenerateArgs,
                seed: int | None = None, stop: list[str] | None = None, continue_last: bool = False) -> TextStream:
    """Like generate_text, yielding text deltas as tokens come; `.result` afterwards (see TextStream).
    `continue_last`: a trailing assistant message is the reply's start, continued (render_prompt)."""

    ids = encode_prompt(template, messages, tokenizer, continue_last)
    stops = list(template.stop_strings) + list(stop or [])
    eos = eos_token_ids(model, tokenizer, template)
    return TextStream(_token_loop(model, tokenizer, ids, gen, seed, stops, eos))


def generate_from_prompt(model, tokenizer, prompt: str, gen: GenerateArgs, seed: int | None = None,
                         stop: list[str] | None = None) -> GenerationResult:
    """Continue a raw text prompt (no template; the tokenizer adds BOS as it would by default)."""
    stream = stream_from_prompt(model, tokenizer, prompt, gen, seed=seed, stop=stop)
    for _ in stream:
        pass
    return stream.result


def stream_from_prompt(model, tokenizer, prompt: str, gen: GenerateArgs, seed: int | None = None,
                       stop: list[str] | None = None) -> TextStream:
    ids = list(tokenizer(prompt)["input_ids"])
    return TextStream(_token_loop(model, tokenizer, ids, gen, seed, list(stop or []),
                                  eos_token_ids(model, tokenizer, None)))


def eos_token_ids(model, tokenizer, template: Template | None) -> set[int]:
    """Every id that ends a reply: tokenizer EOS, generation-config EOS(s), the template's end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    cfg_eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if cfg_eos is not None:
        ids.update(int(i) for i in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]))
    for text in ([template.end_of_turn] if template is not None else []):
        if text:
            tok = tokenizer.convert_tokens_to_ids(text)
            if isinstance(tok, int) and tok != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tok) == text:
                ids.add(tok)
    return ids


# -- the token loop ---------------------------------------------------------------------------------------

def _token_loop(model, tokenizer, prompt_ids: list[int], gen: GenerateArgs, seed: int | None,
                stops: list[str], eos: set[int]):
    """Generator: yields text deltas, returns the GenerationResult."""
    import torch

    with GENERATION_LOCK, torch.inference_mode():
        device = _model_device(model)
        prompt_ids = _fit_context(model, prompt_ids, gen.max_new_tokens)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        pick = _sampler(gen, generator)
        seen = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T) for repetition penalty
        cache = None
        step_input = seen
        out_ids: list[int] = []
        emitted = 0
        finish = "length"
        text = ""
        for _ in range(gen.max_new_tokens):
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = pick(seen, out.logits[:, -1, :].float())
            if token in eos:
                finish = "stop"
                break
            out_ids.append(token)
            seen = torch.cat([seen, seen.new_tensor([[token]])], dim=1)
            step_input = seen[:, -1:]
            text, stopped = cut_at_stop(decode(tokenizer, out_ids), stops)
            if stopped:
                finish = "stop"
                break
            safe = _safe_length(text, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if finish == "stop" and not out_ids:
            text = ""
        if len(text) > emitted:
            yield text[emitted:]
        return GenerationResult(text=text, prompt_tokens=len(prompt_ids), completion_tokens=len(out_ids),
                                finish_reason=finish)


def decode(tokenizer, ids: list[int]) -> str:
    """The text the tokens spell, special tokens included (stop strings are found in it).

    Never the WordPiece clean-up ("a , b" -> "a, b"): it would change text already streamed, and on a BPE
    tokenizer whose config asks for it (SmolLM2's does) transformers skips it with a warning on every run.
    """
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _sampler(gen: GenerateArgs, generator):
    """(seen ids (1, T), next-token logits (1, V)) -> token id: greedy at temperature 0, else sampled."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if gen.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    greedy = gen.temperature == 0
    if not greedy:
        procs.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k > 0:
            procs.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen.top_p))

    def pick(seen, logits) -> int:
        scores = procs(seen, logits)
        if greedy:
            return int(scores.argmax(dim=-1).item())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())

    return pick


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text up to the first stop string, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown: not a trailing partial UTF-8 character, nor a possible stop start."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                hold = max(hold, k)
                break
    return end - hold


def _fit_context(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Keep the prompt's tail when prompt + reply would not fit the model's positions."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit:
        return prompt_ids
    room = max(1, limit - max_new_tokens)
    return prompt_ids[-room:]


def _model_device(model):
    import torch

    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


# -- batched greedy (eval) --------------------------------------------------------------------------------

def generate_batch(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int,
                   eos: set[int], stops: list[str]) -> list[GenerationResult]:
    """Greedy answers for several prompts at once (left padding), for eval on CPU.

    Greedy with no repetition penalty, so scores do not depend on sampling settings.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    width = max(len(p) for p in prompts_ids)
    input_ids = torch.full((len(prompts_ids), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    device = _model_device(model)
    with GENERATION_LOCK, torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             repetition_penalty=1.0, eos_token_id=sorted(eos), pad_token_id=pad, use_cache=True,
                             temperature=None, top_p=None, top_k=None)
    results = []
    for row, ids in enumerate(prompts_ids):
        new = out[row, width:].tolist()
        finish = "length"
        for i, t in enumerate(new):
            if t in eos:
                new, finish = new[:i], "stop"
                break
        text, stopped = cut_at_stop(decode(tokenizer, new), stops)
        finish = "stop" if stopped else finish
        results.append(GenerationResult(text, len(ids), len(new), finish))
    return results
