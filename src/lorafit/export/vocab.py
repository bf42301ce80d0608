"""Tokenizer -> GGUF metadata (`tokenizer.ggml.*`), read from a merged folder's tokenizer.json.

Two vocabulary kinds, as llama.cpp names them:
  gpt2   byte-level BPE (SmolLM2, Llama 3, Qwen2): tokens, token types, merges, and `pre`, the name of the
         regex llama.cpp splits text with before BPE.
  llama  SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama, Phi-3): tokens, scores,
         token types (bytes as <0xNN>); llama.cpp merges by score, so scores follow merge order.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.errors import UserError

# Split regexes of known byte-level pre-tokenizers -> llama.cpp's name for them (llama-vocab.cpp).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_SPLIT = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2"}
# Vocabularies whose tokenizer.json may not show their pre-tokenizer (transformers' GGUF loader writes a plain
# ByteLevel one, which is how the built-in SmolLM2 arrives): sha256 of the tokens in id order -> llama.cpp's name.
# SmolLM and SmolLM2 (135M, 360M, 1.7B) share this 49152-token vocabulary; llama.cpp's converter names it
# `smollm` (its hash of the encoded check text matches for the built-in tokenizer too).
_PRE_BY_VOCAB = {"d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm"}
# Added tokens that are control tokens whatever their `special` flag says (llama.cpp's converter does the same,
# and its loader warns about a `<|...|>` token of another type).
_CONTROL_LOOKING = re.compile(r"<\|.*\|>|<pad>|<mask>")


@dataclass
class VocabInfo:
    """What the Modelfile and the checks need to know about the written vocabulary."""

    kind: str
    """gpt2 or llama."""
    pre: str | None
    """llama.cpp pre-tokenizer name (gpt2 kind only)."""
    size: int
    bos: str | None
    eos: str | None
    warning: str | None = None


def add_vocab(writer: Any, folder: Path, tokenizer: Any, config: Any) -> VocabInfo:
    """Write the tokenizer keys for `tokenizer` (a transformers fast tokenizer loaded from `folder`)."""
    vocab_size = config.vocab_size
    spec = _tokenizer_json(folder)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers; '{folder}' has a {model.get('type')} tokenizer",
                        fix="export a Llama/Mistral/Qwen2/Phi-3/SmolLM2 family model")
    kind = _kind(spec)
    tokens, types = _tokens_and_types(model["vocab"], spec.get("added_tokens") or [], vocab_size, kind, tokenizer)
    writer.add_tokenizer_model(kind)
    warning, pre = None, None
    if kind == "gpt2":
        pre, warning = _pre_name(spec.get("pre_tokenizer"))
        known = _PRE_BY_VOCAB.get(vocab_digest(model["vocab"]))
        if known:
            pre, warning = known, None
        writer.add_tokenizer_pre(pre)
        writer.add_add_space_prefix(False)  # transformers' GGUF loader strips a leading space unless told
    else:
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_adds_space_prefix(spec))
        writer.add_token_scores(_scores(types))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []])
    ids = _special_ids(tokenizer, config)
    for key, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(_adds(tokenizer, ids["bos"], first=True))
    writer.add_add_eos_token(_adds(tokenizer, ids["eos"], first=False))
    def name(i):
        return tokens[i] if i is not None else None

    return VocabInfo(kind, pre, len(tokens), name(ids["bos"]), name(ids["eos"]), warning)


def plain_byte_level(path: Path) -> None:
    """Rewrite a byte-level BPE tokenizer.json the way such tokenizers are normally saved: no byte fallback and
    a ByteLevel decoder. transformers' GGUF loader (how the built-in SmolLM2 arrives) sets `byte_fallback` and a
    SentencePiece-style decoder on byte-level vocabularies; llama.cpp's convert_hf_to_gguf.py then takes the
    folder for SentencePiece and writes a file llama.cpp cannot load. Encoding is unchanged (a byte-level
    vocabulary covers every byte, so the fallback never fires) and so is decoding."""
    if not path.is_file():
        return
    spec = json.loads(path.read_text(encoding="utf-8"))
    if _kind(spec) != "gpt2" or not (spec["model"].get("byte_fallback") or "ByteFallback" in json.dumps(
            spec.get("decoder"))):
        return
    spec["model"]["byte_fallback"] = False
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")


def _kind(spec: dict[str, Any]) -> str:
    """Byte-level BPE maps bytes to printable characters (a ByteLevel pre-tokenizer); SentencePiece-style BPE
    marks spaces with '▁' and falls back to <0xNN> byte tokens. (transformers sets byte_fallback on tokenizers
    it converts from GGUF even when they are byte-level, so the pre-tokenizer decides.)"""
    if "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return "gpt2"
    if spec["model"].get("byte_fallback") or "Metaspace" in json.dumps(spec.get("pre_tokenizer")):
        return "llama"
    raise UserError("GGUF export supports byte-level BPE (GPT-2 style) and SentencePiece-style BPE tokenizers; "
                    "this tokenizer.json is neither", fix="export a Llama/Mistral/Qwen2/Phi-3/SmolLM2 family model")


def _tokenizer_json(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"'{folder}' holds no tokenizer.json (a fast tokenizer)",
                        fix="save the tokenizer with `tokenizer.save_pretrained(folder)` from transformers")
    return json.loads(path.read_text(encoding="utf-8"))


def _tokens_and_types(vocab: dict[str, int], added: list[dict], vocab_size: int, kind: str,
                      tokenizer: Any) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {i: t for t, i in vocab.items()}
    added_by_id = {a["id"]: a for a in added}
    size = max(vocab_size, max([*by_id, *added_by_id], default=-1) + 1)
    if size > vocab_size:
        raise UserError(f"the tokenizer has {size} tokens but the model's embedding only {vocab_size}",
                        fix="resize the embedding (`model.resize_token_embeddings(len(tokenizer))`) and merge again")
    unk = getattr(tokenizer, "unk_token_id", None)
    tokens, types = [], []
    for i in range(size):
        tok = added_by_id[i]["content"] if i in added_by_id else by_id.get(i)
        if tok is not None and kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", tok):
            tokens.append(tok)  # byte-fallback pieces, whether or not tokenizer.json lists them as added
            types.append(gguf.TokenType.BYTE)
        elif i == unk and kind == "llama":  # byte-level BPE has no unknown token: SmolLM2's unk is <|endoftext|>
            tokens.append(tok)
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added_by_id:
            tokens.append(tok)
            control = added_by_id[i].get("special") or _CONTROL_LOOKING.fullmatch(tok)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        elif tok is not None:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (Qwen2 pads to a multiple of 128)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def vocab_digest(vocab: dict[str, int]) -> str:
    """sha256 of the tokens in id order: names a vocabulary however its tokenizer.json was rewritten."""
    return hashlib.sha256("\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()


def _scores(types: list[int]) -> list[float]:
    """SentencePiece BPE merges the pair whose result scores highest; a BPE tokenizer.json keeps tokens in merge
    order, so -rank among normal tokens reproduces that order. Specials, bytes and unused rows score 0."""
    import gguf

    scores, rank = [], 0
    for t in types:
        if t == gguf.TokenType.NORMAL or t == gguf.TokenType.USER_DEFINED:
            scores.append(-float(rank))
            rank += 1
        else:
            scores.append(0.0)
    return scores


def _pre_name(pre: dict | None) -> tuple[str, str | None]:
    """llama.cpp's name for a byte-level pre-tokenizer, from its tokenizer.json description."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm", None  # SmolLM/StarCoder: single digits, then GPT-2's regex
    if kinds and kinds[0] == "Split" and "ByteLevel" in kinds:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _PRE_BY_SPLIT:
            return _PRE_BY_SPLIT[regex], None
    return "default", (f"unknown pre-tokenizer {kinds}; wrote tokenizer.ggml.pre=default, so llama.cpp may split "
                       "text slightly differently from transformers")


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """SentencePiece adds '▁' before the first word: a Prepend normalizer or a Metaspace pre-tokenizer."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def _special_ids(tokenizer: Any, config: Any) -> dict[str, int | None]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(config, "bos_token_id", None)
    # Tokenizers without BOS (Qwen2, ChatML ones) still get an id: transformers' GGUF tokenizer loader fails
    # without one, and add_bos_token (written False for them) keeps llama.cpp from inserting it.
    return {"bos": bos if bos is not None else eos, "eos": eos,
            "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether encoding text puts this special first (bos) or last (eos): llama.cpp's add_bos/add_eos."""
    if token_id is None:
        return False
    ids = tokenizer("hello world")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id
