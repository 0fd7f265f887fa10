"""Model adapter for HF `LlavaForConditionalGeneration` checkpoints (llava-hf/* on the hub, or a local folder).

The adapter is the only code that knows how a LLaVA model is prompted: it renders the checkpoint's own chat
template, places the image, batches prompts of equal length (no padding), runs greedy generation (timing prefill
and decode separately) and scores answer options by log-likelihood. It is also the model seam methods go
through: what the model is made of (`stacks()`: stacks of units, from `qvlm_harness.models.architectures`), the
one calibration encoder (`calibration_batches()`), and the recorded function-preserving transforms
(`fold_scales()`, `transforms`). Tasks see only `Request`/`Response`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from qvlm_harness.device import sync
from qvlm_harness.errors import HarnessError, ModelError
from qvlm_harness.images import load_image
from qvlm_harness.models.architectures import describe_model
from qvlm_harness.models.batching import ENCODING_WINDOW_BYTES, same_length_batches
from qvlm_harness.models.invariance import batch_invariant_linear
from qvlm_harness.models.ragged import RaggedLayout, ragged_prefill, ragged_step, ragged_supported
from qvlm_harness.models.structure import STACK_NAMES, STACK_ROOTS, ScaleGroup, Stack
from qvlm_harness.models.transforms import Transform, fold_group
from qvlm_harness.task import Request, Response

if TYPE_CHECKING:
    from qvlm_harness.calibration import CalibrationSet

IMAGE_PLACEHOLDER = "<image>"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# Config keys that say where and with what a checkpoint was loaded, not what it is: the same weights loaded from
# another folder (a CI checkout, a user's cache) or saved by another transformers release must fingerprint alike.
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "_commit_hash", "transformers_version"})


def _without_volatile_keys(value):
    """`value` (a nested config dict) without the keys that record provenance rather than the model."""
    if isinstance(value, dict):
        return {k: _without_volatile_keys(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_without_volatile_keys(v) for v in value]
    return value


@dataclass
class CalibBatch:
    """One encoded calibration batch (left-padded; prompt + the assistant's answer turn when encoded with targets)
    and where its answers are."""

    inputs: dict[str, torch.Tensor]
    answer_pos: torch.Tensor  # bool [b, T]: positions whose *next* token belongs to the answer (none without targets)
    answer_ids: torch.Tensor  # long [n]: those next tokens, in row-major order of answer_pos
    n_samples: int
    n_images: int

    @property
    def token_mask(self) -> torch.Tensor:
        """bool [b, T]: real (not padding) tokens."""
        return self.inputs["attention_mask"].to(torch.bool)


class _TimingStreamer:
    """HF streamer hook: `put` is called once with the prompt ids, then once per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


class LlavaAdapter:
    """A loaded LLaVA model + processor, answering `Request`s."""

    def __init__(self, model: nn.Module, processor, name: str, path: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.path = path
        self.transforms: list[Transform] = []  # function-preserving transforms applied to the model, in order
        self._eos_ids = self._stop_token_ids()

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_id: str | Path, *, dtype: str = "fp32", device: str = "cpu",
             name: str | None = None) -> LlavaAdapter:
        """Load a Llava checkpoint by local path or hub id (offline unless the user has hub access).

        A local folder is checked from its files first (`qvlm_harness.models.folder`: config, weights, tokenizer)
        and its processor is built before the weights, so a broken folder is one line, never a "not reachable on
        the hub" (it is local) and never a weight load wasted."""
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        from qvlm_harness.models.folder import RECREATE, check_model_folder, load_processor, short

        src = str(path_or_id)
        local = Path(src).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise ModelError(f"{local} is not a model folder (no config.json); pass a Llava checkpoint folder "
                                 "or a hub id such as llava-hf/llava-1.5-7b-hf")
            src = str(local)
            check_model_folder(local)
            processor = load_processor(local)
        else:
            try:
                config = AutoConfig.from_pretrained(src)
            except OSError as exc:
                raise ModelError(f"cannot load model {src!r}: not a local folder and not reachable on the hub "
                                 f"({type(exc).__name__}); pass a local Llava checkpoint path, or `--model default`"
                                 ) from exc
            if config.model_type != "llava":
                raise ModelError(f"{src} is a {config.model_type!r} checkpoint, not Llava "
                                 "(LlavaForConditionalGeneration); use a llava-hf/* model or a converted checkpoint")
            processor = AutoProcessor.from_pretrained(src)
        torch_dtype = _dtype(dtype)
        try:
            model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch_dtype)
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise ModelError(f"the weights of {src} cannot be loaded ({short(exc)}); {RECREATE}") from None
        model.to(device)
        return cls(model, processor, name or Path(src).name, path=src)

    # -- structure -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def stacks(self, stacks: Sequence[str] = STACK_NAMES) -> list[Stack]:
        """What the model is made of: the requested stacks in forward order, each with its units (layers, or the
        projector) in forward order; an architecture the seam does not know is refused by name."""
        return describe_model(self.model, stacks)

    def linear_names(self, scopes: Sequence[str]) -> list[str]:
        """Fully qualified names of the nn.Linear layers in the given parts (the user's `--quantize` scopes), stack
        by stack in forward order (vision tower, projector, language model) and in module order within a stack;
        the LM head is excluded (it is usually tied to the embeddings)."""
        unknown = set(scopes) - set(STACK_ROOTS)
        if unknown:
            raise ModelError(f"unknown scope(s) {sorted(unknown)}; choose from {', '.join(STACK_NAMES)}")
        names = []
        for stack in (s for s in STACK_NAMES if s in scopes):
            prefix = STACK_ROOTS[stack] + "."
            names += [n for n, m in self.model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)]
        return names

    def stack_of(self, module_name: str) -> str:
        """The stack (vision, projector, lm) a module belongs to, or "other"."""
        for stack, root in STACK_ROOTS.items():
            if module_name.startswith(root + "."):
                return stack
        return "other"

    def fold_scales(self, group: ScaleGroup, scales: torch.Tensor) -> Transform:
        """Fold per-channel `scales` through a scale group (see `qvlm_harness.models.transforms`) and record it in
        `transforms`, so that the transform can be replayed alone on another model."""
        return fold_group(self, group, scales)

    def fingerprint(self) -> str:
        """A short hash of the config and of a sample of every weight tensor: equal fingerprints mean the same
        weights for all practical purposes, without hashing gigabytes."""
        config = _without_volatile_keys(self.model.config.to_dict())
        h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, t in sorted(self.model.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            h.update(name.encode())
            h.update(flat[::step][:64].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- prompting -------------------------------------------------------------------------------------------------
    def render(self, request: Request) -> str:
        """The full prompt text (chat template applied, generation prompt appended) for one request."""
        conversation = [{"role": "user", "content": self._content(request)}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    @staticmethod
    def _content(request: Request) -> list[dict]:
        """The user turn's content parts: the image where the prompt places it (at the start otherwise)."""
        content: list[dict] = []
        text = request.prompt
        if request.image is not None:
            before, sep, after = text.partition(IMAGE_PLACEHOLDER)
            if not sep:
                before, after = "", text
            if before:
                content.append({"type": "text", "text": before})
            content.append({"type": "image"})
            text = after
        elif IMAGE_PLACEHOLDER in text:
            text = text.replace(IMAGE_PLACEHOLDER, "")
        if text:
            content.append({"type": "text", "text": text})
        return content

    def encode(self, requests: Sequence[Request], *, suffixes: Sequence[str] | None = None,
               padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Processor outputs for a batch (mixed image/text-only batches are fine); `suffixes` are appended to
        each rendered prompt (e.g. the target answer for teacher forcing)."""
        texts = [self.render(r) for r in requests]
        if suffixes is not None:
            texts = [t + s for t, s in zip(texts, suffixes, strict=True)]
        images = [load_image(r.image, what=f"sample {r.sample_id}") for r in requests if r.image is not None]
        self.tokenizer.padding_side = padding_side
        batch = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True,
                               add_special_tokens=self._add_special_tokens(texts))
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}

    # -- answering ---------------------------------------------------------------------------------------------------
    # A batch is computed so that each request's answer is the one it gets alone, whatever the batch size, the
    # thread count or the other requests: ragged batches (`models.ragged`: prompts of any lengths in one forward,
    # attention per prompt) where the model allows, padding-free same-length batches (`models.batching`)
    # otherwise, both with row-invariant linear kernels (`models.invariance`). Pass whole request lists; responses
    # always come back in request order.
    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], batch_size: int = 8) -> list[Response]:
        """Greedy generation; each response carries its share of its batch's prefill and decode time."""
        out: list[Response | None] = [None] * len(requests)
        ragged = self.ragged_unsupported() is None
        run = self._generate_ragged if ragged else self._generate_batch
        with batch_invariant_linear():
            for idx, batch in (self._ragged_batches if ragged else self._batches)(requests, batch_size):
                for i, resp in zip(idx, run([requests[i] for i in idx], batch), strict=True):
                    out[i] = resp
        return out  # type: ignore[return-value]

    def ragged_unsupported(self) -> str | None:
        """Why this model answers through same-length batches instead of ragged ones (None: it does not)."""
        try:
            units = self.stacks(["lm"])[0].units
        except HarnessError as exc:
            return f"the model seam does not describe its language model ({exc})"
        attentions = [u.attention for u in units if u.attention is not None]
        return ragged_supported(self._lm(), [self.model.get_submodule(a.module) for a in attentions],
                                any(a.sliding_window for a in attentions),
                                getattr(self.model, "generation_config", None))

    def _lm(self) -> nn.Module:
        return self.model.get_submodule(STACK_ROOTS["lm"])

    def _generate_ragged(self, chunk: Sequence[Request], encodings: list[dict[str, torch.Tensor]]) -> list[Response]:
        """Greedy generation of a ragged batch: one prefill over every prompt, then one decode step per token that
        feeds only the unfinished prompts; a prompt stops at a stop token or its own `max_new_tokens`."""
        stop = set(self._eos_ids) | ({self.tokenizer.pad_token_id} - {None})
        caps = [max(1, r.max_new_tokens) for r in chunk]
        generated: list[list[int]] = [[] for _ in chunk]
        sync(self.device)
        t0 = time.perf_counter()
        lm = self._lm()
        layout, lengths, logits = ragged_prefill(self.model, lm, encodings)
        t_first = None
        active = list(range(len(chunk)))
        while active:
            for i, token in zip(active, logits.float().argmax(-1).tolist(), strict=True):
                generated[i].append(token)
            if t_first is None:
                t_first = time.perf_counter()
            active = [i for i in active if generated[i][-1] not in stop and len(generated[i]) < caps[i]]
            if active:
                logits = ragged_step(self.model, lm, layout, active, [generated[i][-1] for i in active],
                                     [lengths[i] + len(generated[i]) - 1 for i in active])
        t_end = time.perf_counter()
        prefill, decode = t_first - t0, t_end - t_first
        return [self._response(req, ids, prefill / len(chunk), decode / len(chunk))
                for req, ids in zip(chunk, generated, strict=True)]

    def _response(self, request: Request, ids: Sequence[int], prefill_s: float, decode_s: float) -> Response:
        """The answer text of generated `ids` (cut at the request's cap and before the first stop token)."""
        ids = list(ids)[: request.max_new_tokens]
        n_tokens = _tokens_before_stop(ids, self._eos_ids, self.tokenizer.pad_token_id)
        text = self.tokenizer.decode(ids[:n_tokens], skip_special_tokens=True).strip()
        return Response(text=text, prefill_s=prefill_s, decode_s=decode_s, new_tokens=n_tokens)

    def _generate_batch(self, chunk: Sequence[Request], batch: dict[str, torch.Tensor]) -> list[Response]:
        """One same-length batch through Hugging Face's greedy generation, which stops once every row has ended
        (models the ragged path cannot take; and the reference `tests/test_ragged.py` checks that path against)."""
        length = batch["input_ids"].shape[1]
        streamer = _TimingStreamer()
        sync(self.device)  # on CUDA: nothing queued before is charged to prefill (HF's streamer syncs per token)
        t0 = time.perf_counter()
        max_new = max(r.max_new_tokens for r in chunk)
        gen = self.model.generate(**batch, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                  streamer=streamer, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self._eos_ids)
        t_end = time.perf_counter()
        # times[0]: prompt put; times[1]: first new token (after prefill); times[-1]: end
        t_first = streamer.times[1] if len(streamer.times) > 2 else t_end
        prefill, decode = t_first - t0, t_end - t_first
        return [self._response(req, ids.tolist(), prefill / len(chunk), decode / len(chunk))
                for req, ids in zip(chunk, gen[:, length:], strict=True)]

    @torch.inference_mode()
    def loglik(self, requests: Sequence[Request], batch_size: int = 8) -> list[Response]:
        """Sum of log-probabilities (and token count) of each option as the assistant's answer.

        Options are tokenized on their own and appended to the prompt's ids, so the prompt/answer boundary never
        merges into one token. One forward pass over a batch of prompts (image included) gives every option's
        first token; a request with longer options then scores all of them in one more pass over the prompt's KV
        cache, so the prompt and its image are encoded once per request, not once per option.
        """
        opt_ids = [self._option_ids(r) for r in requests]
        out: list[Response | None] = [None] * len(requests)
        ragged = self.ragged_unsupported() is None
        run = self._loglik_ragged if ragged else self._loglik_batch
        with batch_invariant_linear():
            for idx, batch in (self._ragged_batches if ragged else self._batches)(requests, batch_size):
                for i, resp in zip(idx, run(batch, [opt_ids[i] for i in idx]), strict=True):
                    out[i] = resp
        return out  # type: ignore[return-value]

    def _option_ids(self, request: Request) -> list[list[int]]:
        ids = [self.tokenizer(o, add_special_tokens=False).input_ids for o in request.options]
        if any(not i for i in ids):
            raise ModelError("an answer option tokenizes to nothing; options must be non-empty text")
        return ids

    def _loglik_batch(self, batch: dict[str, torch.Tensor], opt_ids: list[list[list[int]]]) -> list[Response]:
        """One padding-free batch of prompts: a forward that keeps only the last position's logits (and the KV cache
        when some option is longer than one token), then one cached pass per request with such options."""
        t0 = time.perf_counter()
        multi = [any(len(ids) > 1 for ids in per) for per in opt_ids]
        outputs = self.model(**batch, use_cache=any(multi), logits_to_keep=1)
        first = torch.log_softmax(outputs.logits[:, -1, :].float(), dim=-1)
        return self._option_scores(first, opt_ids, t0, lambda row, per: self._continuation_logprobs(outputs.cache,
                                                                                                      row, per))

    def _loglik_ragged(self, encodings: list[dict[str, torch.Tensor]],
                       opt_ids: list[list[list[int]]]) -> list[Response]:
        """`_loglik_batch` for a ragged batch: one forward over every prompt gives each option's first token; a
        request with longer options continues from its own prompt's keys and values."""
        t0 = time.perf_counter()
        layout, _, logits = ragged_prefill(self.model, self._lm(), encodings)
        first = torch.log_softmax(logits.float(), dim=-1)
        return self._option_scores(first, opt_ids, t0, lambda row, per: self._continuation_logprobs(
            _prompt_cache(layout, row), 0, per))

    def _option_scores(self, first: torch.Tensor, opt_ids: list[list[list[int]]], t0: float,
                       continuation) -> list[Response]:
        """Each request's option scores: the first token's log-probability from `first` (row per request, the
        prompt forward that started at `t0`), plus `continuation(row, options)` for a request with an option
        longer than one token; each response carries its share of the prompt forward and its own continuation."""
        sync(first.device)  # CUDA runs asynchronously: the clock must see the forward finished
        share = (time.perf_counter() - t0) / len(opt_ids)
        responses = []
        for row, per in enumerate(opt_ids):
            t1 = time.perf_counter()
            rest = continuation(row, per) if any(len(ids) > 1 for ids in per) else [0.0] * len(per)
            scores = [(float(first[row, ids[0]]) + r, len(ids)) for ids, r in zip(per, rest, strict=True)]
            responses.append(Response(option_logprobs=scores, prefill_s=share + time.perf_counter() - t1))
        return responses

    def _continuation_logprobs(self, cache, row: int, options: list[list[int]]) -> list[float]:
        """log P(option[1:] | prompt, option[0]) for every option of the prompt in `row` of `cache`, in one forward
        over that row's cache repeated once per option. Options are right-padded to the longest: a position after
        an option's end is never read, and causal attention keeps it from touching the positions before it. The
        batch holds only this request's options, so the result does not depend on which requests share its
        prompt batch."""
        longest = max(len(o) for o in options)
        rows = _cache_rows(cache, torch.full((len(options),), row, dtype=torch.long, device=self.device))
        pad = options[0][0]
        ids = torch.tensor([o[:-1] + [pad] * (longest - len(o)) for o in options], device=self.device)
        mask = torch.ones(len(options), rows.get_seq_length() + longest - 1, dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, cache=rows, use_cache=True).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        return [sum(float(logp[j, t, o[t + 1]]) for t in range(len(o) - 1)) for j, o in enumerate(options)]

    @torch.inference_mode()
    def _loglik_sequences(self, chunk: Sequence[Request], opt_ids: list[list[list[int]]]):
        """The reference scoring the fast paths are checked against: one full forward of prompt + option per
        (request, option), the prompt re-encoded each time."""
        scores: list[list[tuple[float, int]]] = []
        for req, per in zip(chunk, opt_ids, strict=True):
            base = self.encode([req])
            n = base["input_ids"].shape[1]
            rows = []
            for ids in per:
                cont = torch.tensor([ids], device=self.device)
                inputs = dict(base)
                inputs["input_ids"] = torch.cat([base["input_ids"], cont], dim=1)
                inputs["attention_mask"] = torch.cat([base["attention_mask"], torch.ones_like(cont)], dim=1)
                logits = self.model(**inputs).logits[0, n - 1: -1].float()
                logp = torch.log_softmax(logits, dim=-1).gather(1, cont[0][:, None]).sum()
                rows.append((float(logp), len(ids)))
            scores.append(rows)
        return scores

    def answer(self, requests: Sequence[Request], batch_size: int = 8) -> list[Response]:
        """Dispatch generate/loglik requests, preserving order."""
        out: list[Response | None] = [None] * len(requests)
        for kind, fn in (("generate", self.generate), ("loglik", self.loglik)):
            idx = [i for i, r in enumerate(requests) if r.kind == kind]
            if idx:
                for i, resp in zip(idx, fn([requests[i] for i in idx], batch_size), strict=True):
                    out[i] = resp
        return out  # type: ignore[return-value]

    # -- calibration ---------------------------------------------------------------------------------------------------
    def answer_suffix(self, request: Request, target: str) -> str:
        """The text that follows the rendered prompt when the assistant answers `target`: the assistant turn
        rendered through the chat template, up to and including its end-of-turn token (trailing whitespace after
        it is never generated, so it is dropped). A template whose assistant turn ends in no special token gets
        the EOS token appended (the model must learn where the answer stops); one whose full conversation does not
        extend the rendered prompt falls back to ``target + EOS``."""
        prompt = self.render(request)
        conversation = [{"role": "user", "content": self._content(request)},
                        {"role": "assistant", "content": [{"type": "text", "text": target}]}]
        full = self.processor.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
        eos = self.tokenizer.eos_token or ""
        if not full.startswith(prompt):
            return target + eos
        suffix = full[len(prompt):].rstrip()
        if not any(suffix.endswith(t) for t in self._special_tokens()):
            suffix += eos
        return suffix

    def _special_tokens(self) -> set[str]:
        """Every special token's text: the named ones (BOS, EOS, ...) and added special tokens such as a
        template's end-of-turn marker, which reloaded tokenizers list only among their added tokens."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        named = set(self.tokenizer.all_special_tokens)
        return {t for t in named | {a.content for a in added.values() if getattr(a, "special", False)} if t}

    def calibration_batches(self, calibration: CalibrationSet, *, with_targets: bool = True,
                            batch_size: int = 8) -> Iterator[CalibBatch]:
        """The calibration set encoded in fixed order, `batch_size` requests per batch: prompts followed (with
        `with_targets`) by the assistant's answer turn (`answer_suffix`), with the answer positions and ids that
        output-guided losses read. The one calibration encoder: every method's calibration goes through it."""
        reqs, targets = calibration.requests, calibration.targets
        for start in range(0, len(reqs), batch_size):
            chunk = reqs[start:start + batch_size]
            suffixes = ([self.answer_suffix(r, t) for r, t in zip(chunk, targets[start:start + batch_size],
                                                                  strict=True)] if with_targets else None)
            inputs = self.encode(chunk, suffixes=suffixes)
            ids = inputs["input_ids"]
            pos = torch.zeros_like(ids, dtype=torch.bool)
            if suffixes is not None:
                n_answer = self._answer_token_counts(chunk, suffixes)
                n_real = inputs["attention_mask"].sum(dim=1)
                t = ids.shape[1]
                for i, n in enumerate(n_answer):
                    n = int(max(1, min(n, int(n_real[i]) - 1)))
                    pos[i, t - n - 1:t - 1] = True  # left padding: the answer ends the row
            answer_ids = ids[:, 1:][pos[:, :-1]]
            n_images = int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0
            yield CalibBatch(inputs, pos, answer_ids, len(chunk), n_images)

    def _answer_token_counts(self, requests: Sequence[Request], suffixes: Sequence[str]) -> list[int]:
        """Tokens the suffix adds to each rendered prompt (text only: the image placeholder's expansion is the same
        with and without the suffix)."""
        prompts = [self.render(r) for r in requests]
        full = [p + s for p, s in zip(prompts, suffixes, strict=True)]
        special = self._add_special_tokens(prompts)
        n_full = [len(x) for x in self.tokenizer(full, add_special_tokens=special).input_ids]
        n_prompt = [len(x) for x in self.tokenizer(prompts, add_special_tokens=special).input_ids]
        return [a - b for a, b in zip(n_full, n_prompt, strict=True)]

    def _encoded_windows(self, requests: Sequence[Request]) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
        """(first index, encodings) of consecutive windows of requests, each request encoded once and alone, a
        window's encodings (ids, masks, pixel values) holding about `ENCODING_WINDOW_BYTES` (with the default
        model's 112-px images ~1700 requests)."""
        start = 0
        while start < len(requests):
            encodings: list[dict[str, torch.Tensor]] = []
            size = 0
            while start + len(encodings) < len(requests) and size < ENCODING_WINDOW_BYTES:
                enc = self.encode([requests[start + len(encodings)]])
                encodings.append(enc)
                size += sum(t.numel() * t.element_size() for t in enc.values())
            yield start, encodings
            start += len(encodings)

    def _batches(self, requests: Sequence[Request],
                 batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(request indices, encoded batch) of padding-free batches, batched by prompt length within a window."""
        for start, encodings in self._encoded_windows(requests):
            lengths = [int(e["input_ids"].shape[1]) for e in encodings]
            for idx in same_length_batches(lengths, batch_size):
                yield [start + i for i in idx], self._stack([encodings[i] for i in idx],
                                                            [requests[start + i] for i in idx])

    def _ragged_batches(self, requests: Sequence[Request],
                        batch_size: int) -> Iterator[tuple[list[int], list[dict[str, torch.Tensor]]]]:
        """(request indices, their single-request encodings) of ragged batches: `batch_size` requests in request
        order, whatever their lengths."""
        size = max(1, int(batch_size))
        for start, encodings in self._encoded_windows(requests):
            for first in range(0, len(encodings), size):
                idx = list(range(first, min(first + size, len(encodings))))
                yield [start + i for i in idx], [encodings[i] for i in idx]

    def _stack(self, encodings: list[dict[str, torch.Tensor]], requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """One batch from same-length single-request encodings: what `encode(requests)` returns without padding
        (Llava processors stack per-image tensors); a processor whose per-image tensors do not stack is asked
        for the batch itself."""
        if len(encodings) == 1:
            return encodings[0]
        keys = dict.fromkeys(k for e in encodings for k in e)
        try:
            return {k: torch.cat([e[k] for e in encodings if k in e]) for k in keys}
        except RuntimeError:
            return self.encode(requests)

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _add_special_tokens(self, texts: Sequence[str]) -> bool:
        """Whether tokenizing rendered prompts should add the tokenizer's special tokens: not when the chat
        template already rendered the BOS token (``{{ bos_token }}``), which would double it."""
        bos = self.tokenizer.bos_token
        return not (bos and texts and all(t.startswith(bos) for t in texts))

    def _stop_token_ids(self) -> list[int]:
        ids = set()
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        for tok in ("<|im_end|>", "</s>", "<|eot_id|>", "<end_of_turn>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return sorted(ids)


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; choose fp32, fp16 or bf16") from None


def _prompt_cache(layout: RaggedLayout, prompt: int):
    """A dynamic cache holding one prompt's keys and values from a ragged forward (as its own batch of one)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in sorted(layout.kv):
        cache.update(*layout.kv[layer][prompt], layer)
    return cache


def _cache_rows(cache, index: torch.Tensor):
    """A new cache holding `cache`'s batch rows `index` (rows may repeat); `cache` itself is left unchanged."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.batch_select_indices(index)
    return rows


def _tokens_before_stop(ids: list[int], stop: Sequence[int], pad: int | None) -> int:
    for i, t in enumerate(ids):
        if t in stop or (pad is not None and t == pad and pad not in stop):
            return i
    return len(ids)


def set_threads(n: int | None) -> int:
    """Fix the intra-op thread count (measurements need it fixed); returns the count in use."""
    if n:
        torch.set_num_threads(n)
    elif os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return torch.get_num_threads()
