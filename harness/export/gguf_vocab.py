"""The GGUF tokenizer of a checkpoint: read from the tokenizer.json and the tokenizer the checkpoint carries.

llama.cpp tokenizes with its own code, so the vocabulary must say which of its pre-tokenizers reproduces the
Hugging Face one; a tokenizer this module cannot map is refused with the reason rather than written with a
guessed pre-tokenizer (prompts would tokenize differently in llama.cpp and the harness). Mapped today: byte-level
BPE with the GPT-2 split regex (llama.cpp ``gpt2`` model, ``gpt-2`` pre-tokenizer), which is what the embedded
default and the tiny test models use.

Token types as llama.cpp expects them: added special tokens are CONTROL, other added tokens USER_DEFINED, ids the
tokenizer does not define (embedding rows beyond the vocabulary) UNUSED ``[PAD<id>]`` entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qvlm_harness.errors import HarnessError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values


@dataclass
class GgufVocab:
    """Everything `tokenizer.ggml.*` holds."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` entry, or one line saying why none."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return "gpt-2"
    raise HarnessError(f"the tokenizer's pre-tokenizer {json.dumps(spec)[:120]} has no llama.cpp equivalent this "
                       "exporter knows (it maps byte-level BPE with the GPT-2 regex); export to compressed-tensors "
                       "instead")


def _merges(model: dict) -> list[str]:
    return [" ".join(m) if isinstance(m, list) else str(m) for m in model.get("merges", [])]


def _template_adds(post: dict | None) -> tuple[bool, bool]:
    """(adds a leading special token, adds a trailing one) for a tokenizer.json ``post_processor``."""
    if not post:
        return False, False
    if post.get("type") == "Sequence":
        flags = [_template_adds(p) for p in post.get("processors", [])]
        return any(f[0] for f in flags), any(f[1] for f in flags)
    if post.get("type") == "TemplateProcessing":
        single = post.get("single", [])
        return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]
    if post.get("type") == "ByteLevel":
        return False, False
    raise HarnessError(f"the tokenizer's post-processor {post.get('type')!r} is not one this exporter can describe "
                       "to llama.cpp (it reads TemplateProcessing and ByteLevel)")


def read_vocab(folder: Path, tokenizer, n_rows: int) -> GgufVocab:
    """The vocabulary of the checkpoint in `folder` (its tokenizer.json) for an embedding of `n_rows` rows;
    `tokenizer` (the loaded one) supplies the special-token ids and the chat template."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise HarnessError(f"{folder} has no tokenizer.json; GGUF export needs the fast (tokenizers) tokenizer")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise HarnessError(f"the tokenizer is {model.get('type')} (byte_fallback={model.get('byte_fallback')}, "
                           f"normalizer={bool(spec.get('normalizer'))}); GGUF export maps byte-level BPE only")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    by_id: dict[int, tuple[str, int]] = {int(i): (t, NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if by_id and max(by_id) >= n_rows:
        raise HarnessError(f"the tokenizer has token id {max(by_id)} but the embedding has {n_rows} rows; the "
                           "checkpoint's tokenizer does not belong to its model")
    tokens, types = [], []
    for i in range(n_rows):
        text, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(text)
        types.append(kind)
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_rows:
            special[role] = tid
    add_bos, add_eos = _template_adds(spec.get("post_processor"))
    template = getattr(tokenizer, "chat_template", None)
    return GgufVocab("gpt2", pre, tokens, types, _merges(model), special, add_bos, add_eos,
                     template if isinstance(template, str) else None)


def write_vocab(writer, vocab: GgufVocab) -> None:
    """Add the vocabulary's keys to a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for role, tid in vocab.special.items():
        adders[role](tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
