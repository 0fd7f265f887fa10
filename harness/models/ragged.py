"""Ragged batches: prompts of any lengths in one forward pass, each row computed exactly as it is alone.

Same-length batching (`qvlm_harness.models.batching`) keeps answers independent of the batch, but on real data it
leaves batches nearly empty: the 600 ScienceQA test prompts of the default model have 43 distinct lengths, so a
runner batch of 16 splits into batches of 1.3 requests on average and every GEMM and decode step runs at batch ~1.

Here the prompts of a batch are concatenated into one row ([1, sum of lengths]) with per-prompt position ids. The
token-wise parts of the model (linears through the row-invariant kernels of `models.invariance`, norms, RoPE, MLPs)
see every token at once; attention is the only part that mixes tokens, and `ragged_attention` runs it once per
prompt on that prompt's own queries and its own keys and values, with the arguments SDPA gets at batch 1 (same
shapes, contiguous keys and values, the causal flag instead of a mask). Each prompt's KV cache is kept per prompt,
grown by concatenation as Hugging Face's dynamic cache grows it, so a decode step feeds one token per unfinished
prompt and a finished prompt costs nothing more. `tests/test_ragged.py` checks answers, log-likelihoods and every
decode step's logits bit for bit against Hugging Face's own generate at batch 1.

Only what it is exact for takes this path (`ragged_supported`): a language model on SDPA without sliding windows,
whose attention modules know their layer index, and greedy generation without logits processors. Anything else
keeps the same-length path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from torch import Tensor, nn

RAGGED_ATTENTION = "qvlm_harness_ragged"

# Generation-config fields that add a logits processor or a stopping rule to greedy decoding: a model that sets one
# keeps Hugging Face's generate, which applies them.
_PROCESSOR_FIELDS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                     "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                     "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits",
                     "stop_strings", "max_time")
_NEUTRAL = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0,
            "min_new_tokens": 0, "renormalize_logits": False}


@dataclass
class RaggedLayout:
    """Which rows of the current forward belong to which prompt, and every prompt's keys and values so far."""

    segments: list[tuple[int, int]]  # per prompt fed in this forward: its [start, stop) rows
    prompts: list[int]  # which prompt each segment is
    kv: dict[int, dict[int, tuple[Tensor, Tensor]]] = field(default_factory=dict)  # layer -> prompt -> (k, v)

    def feed(self, prompts: Sequence[int], lengths: Sequence[int]) -> None:
        """The next forward feeds `lengths[j]` rows of prompt `prompts[j]`, in that order."""
        self.prompts = list(prompts)
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + int(n))
        self.segments = list(zip(starts[:-1], starts[1:], strict=True))


_layout: contextvars.ContextVar[RaggedLayout | None] = contextvars.ContextVar("ragged_layout", default=None)


def ragged_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     **kwargs) -> tuple[Tensor, None]:
    """Attention over a ragged batch ([1, heads, rows, dim]): SDPA once per prompt on its own rows and cache."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = _layout.get()
    if layout is None:
        raise RuntimeError("ragged attention outside a ragged forward (use `ragged_forward`)")
    cache = layout.kv.setdefault(module.layer_idx, {})
    outputs = []
    for prompt, (start, stop) in zip(layout.prompts, layout.segments, strict=True):
        k, v = key[:, :, start:stop], value[:, :, start:stop]
        if prompt in cache:
            past_k, past_v = cache[prompt]
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        else:  # what a fresh dynamic cache returns: a contiguous copy
            k, v = k.contiguous(), v.contiguous()
        cache[prompt] = (k, v)
        out, _ = sdpa_attention_forward(module, query[:, :, start:stop], k, v, None, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _no_mask(*args, **kwargs) -> None:
    """The mask hook of the ragged implementation: attention builds its own causal structure per prompt."""
    return None


@functools.cache
def _register() -> None:
    """Make the implementation known to transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(RAGGED_ATTENTION, ragged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RAGGED_ATTENTION, _no_mask)


def ragged_supported(lm: nn.Module, attentions: Sequence[nn.Module], sliding: bool,
                     generation_config=None) -> str | None:
    """Why the language model `lm` (its attention modules `attentions`, `sliding` when some layer has a sliding
    window) cannot take the ragged path; None when it can."""
    implementation = lm.config._attn_implementation
    if implementation != "sdpa":
        return f"attention implementation {implementation!r} (the ragged path re-runs SDPA)"
    if sliding:
        return "sliding-window attention"
    indices = [getattr(m, "layer_idx", None) for m in attentions]
    if not indices or any(not isinstance(i, int) for i in indices) or len(set(indices)) != len(indices):
        return "attention modules without their own layer index"
    for name in _PROCESSOR_FIELDS if generation_config is not None else ():
        value = getattr(generation_config, name, None)
        if value not in (None, _NEUTRAL.get(name), [], ()):
            return f"generation config sets {name}"
    return None


@contextlib.contextmanager
def ragged_forward(lm: nn.Module, layout: RaggedLayout) -> Iterator[None]:
    """Within the block, `lm`'s attention runs ragged over `layout` (its config's implementation switched and
    restored; other modules and models are untouched)."""
    _register()
    config = lm.config
    previous = config._attn_implementation
    token = _layout.set(layout)
    config._attn_implementation = RAGGED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _layout.reset(token)


def concat_prompts(encodings: Sequence[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[int]]:
    """One ragged batch from single-prompt encodings: ids in one row with per-prompt positions, per-image tensors
    stacked in prompt order (the order their image tokens appear in the row); and each prompt's length."""
    lengths = [int(e["input_ids"].shape[1]) for e in encodings]
    ids = torch.cat([e["input_ids"] for e in encodings], dim=1)
    positions = torch.cat([torch.arange(n, device=ids.device) for n in lengths])[None]
    batch: dict[str, Tensor] = {"input_ids": ids, "position_ids": positions}
    for key in dict.fromkeys(k for e in encodings for k in e):
        if key not in ("input_ids", "attention_mask"):
            batch[key] = torch.cat([e[key] for e in encodings if key in e])
    return batch, lengths


def ragged_prefill(model: nn.Module, lm: nn.Module,
                   encodings: Sequence[dict[str, Tensor]]) -> tuple[RaggedLayout, list[int], Tensor]:
    """One forward of `model` over every prompt of a ragged batch (`lm` its language model): the layout, now
    holding each prompt's keys and values, each prompt's length, and the logits at each prompt's last position
    ([prompts, vocab])."""
    batch, lengths = concat_prompts(encodings)
    layout = RaggedLayout([], [])
    layout.feed(range(len(encodings)), lengths)
    last = torch.tensor(list(accumulate(lengths)), device=batch["input_ids"].device) - 1
    with ragged_forward(lm, layout):
        logits = model(**batch, use_cache=False, logits_to_keep=last).logits[0]
    return layout, lengths, logits


def ragged_step(model: nn.Module, lm: nn.Module, layout: RaggedLayout, prompts: Sequence[int],
                tokens: Sequence[int], positions: Sequence[int]) -> Tensor:
    """One decode step: token `tokens[j]` at position `positions[j]` for prompt `prompts[j]`, against (and into)
    each prompt's own cache; the next-token logits per prompt ([prompts, vocab])."""
    layout.feed(prompts, [1] * len(prompts))
    device = next(model.parameters()).device
    ids = torch.tensor([list(tokens)], device=device)
    pos = torch.tensor([list(positions)], device=device)
    with ragged_forward(lm, layout):
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
