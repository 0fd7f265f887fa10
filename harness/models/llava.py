"""Model adapter for HF `LlavaForConditionalGeneration` checkpoints (llava-hf/* on the hub, or a local folder).

The adapter is the only code that knows how a LLaVA model is prompted: it renders the checkpoint's own chat
template, places the image, batches prompts of equal length (no padding), runs greedy generation (timing prefill
and decode separately) and scores answer options by log-likelihood. Methods see the `torch.nn.Module` and the
names of the linear layers of each part (`vision`, `projector`, `lm`); tasks see only `Request`/`Response`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qvlm_harness.errors import ModelError
from qvlm_harness.images import load_image
from qvlm_harness.models.batching import ENCODING_WINDOW_BYTES, same_length_batches
from qvlm_harness.models.invariance import batch_invariant_linear
from qvlm_harness.task import Request, Response

IMAGE_PLACEHOLDER = "<image>"
# Where each part of a Llava model lives (transformers >= 4.52 layout).
SCOPE_PREFIXES = {
    "vision": "model.vision_tower.",
    "projector": "model.multi_modal_projector.",
    "lm": "model.language_model.",
}
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
class Timing:
    """Wall-clock seconds of one batch: prefill (prompt forward, up to the first new token) and decode."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: list[int] = field(default_factory=list)


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
        self._eos_ids = self._stop_token_ids()

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_id: str | Path, *, dtype: str = "fp32", device: str = "cpu",
             name: str | None = None) -> LlavaAdapter:
        """Load a Llava checkpoint by local path or hub id (offline unless the user has hub access)."""
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        src = str(path_or_id)
        local = Path(src).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise ModelError(f"{local} is not a model folder (no config.json); pass a Llava checkpoint folder "
                                 "or a hub id such as llava-hf/llava-1.5-7b-hf")
            src = str(local)
        try:
            config = AutoConfig.from_pretrained(src)
        except OSError as exc:
            raise ModelError(f"cannot load model {src!r}: not a local folder and not reachable on the hub "
                             f"({type(exc).__name__}); pass a local Llava checkpoint path, or `--model default`"
                             ) from exc
        if config.model_type != "llava":
            raise ModelError(f"{src} is a {config.model_type!r} checkpoint, not Llava "
                             "(LlavaForConditionalGeneration); use a llava-hf/* model or a converted checkpoint")
        torch_dtype = _dtype(dtype)
        model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch_dtype)
        processor = AutoProcessor.from_pretrained(src)
        model.to(device)
        return cls(model, processor, name or Path(src).name, path=src)

    # -- structure -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def linear_names(self, scopes: Sequence[str]) -> list[str]:
        """Fully qualified names of the nn.Linear layers in the given parts, in forward order (vision tower,
        projector, language model); the LM head is excluded (it is usually tied to the embeddings)."""
        order = [s for s in ("vision", "projector", "lm") if s in scopes]
        unknown = set(scopes) - set(SCOPE_PREFIXES)
        if unknown:
            raise ModelError(f"unknown scope(s) {sorted(unknown)}; choose from vision, projector, lm")
        names = []
        for scope in order:
            prefix = SCOPE_PREFIXES[scope]
            names += [n for n, m in self.model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)]
        return names

    def scope_of(self, module_name: str) -> str:
        for scope, prefix in SCOPE_PREFIXES.items():
            if module_name.startswith(prefix):
                return scope
        return "other"

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
        conversation = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def encode(self, requests: Sequence[Request], *, suffixes: Sequence[str] | None = None,
               padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Processor outputs for a batch (mixed image/text-only batches are fine); `suffixes` are appended to
        each rendered prompt (e.g. the target answer for teacher forcing)."""
        texts = [self.render(r) for r in requests]
        if suffixes is not None:
            texts = [t + s for t, s in zip(texts, suffixes, strict=True)]
        images = [load_image(r.image, what=f"sample {r.sample_id}") for r in requests if r.image is not None]
        self.tokenizer.padding_side = padding_side
        batch = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}

    # -- answering ---------------------------------------------------------------------------------------------------
    # Batches hold only requests whose prompts have the same token length (no padding, see `models.batching`) and
    # run with row-invariant linear kernels (`models.invariance`), so a request's answer is the one it gets alone,
    # whatever the batch size, the thread count or the other requests: pass whole request lists, the longer the
    # list the fuller the batches. Responses always come back in request order.
    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], batch_size: int = 8) -> list[Response]:
        """Greedy generation; each response carries its share of its batch's prefill and decode time."""
        out: list[Response | None] = [None] * len(requests)
        with batch_invariant_linear():
            for idx, batch in self._batches(requests, batch_size):
                for i, resp in zip(idx, self._generate_batch([requests[i] for i in idx], batch), strict=True):
                    out[i] = resp
        return out  # type: ignore[return-value]

    def _generate_batch(self, chunk: Sequence[Request], batch: dict[str, torch.Tensor]) -> list[Response]:
        """One padding-free batch through HF greedy generation, which stops once every row has ended."""
        length = batch["input_ids"].shape[1]
        streamer = _TimingStreamer()
        t0 = time.perf_counter()
        max_new = max(r.max_new_tokens for r in chunk)
        gen = self.model.generate(**batch, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                  streamer=streamer, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self._eos_ids)
        t_end = time.perf_counter()
        # times[0]: prompt put; times[1]: first new token (after prefill); times[-1]: end
        t_first = streamer.times[1] if len(streamer.times) > 2 else t_end
        prefill, decode = t_first - t0, t_end - t_first
        out = []
        for req, ids in zip(chunk, gen[:, length:], strict=True):
            ids = ids[: req.max_new_tokens]
            n_tokens = _tokens_before_stop(ids.tolist(), self._eos_ids, self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(ids[:n_tokens], skip_special_tokens=True).strip()
            out.append(Response(text=text, prefill_s=prefill / len(chunk), decode_s=decode / len(chunk),
                                new_tokens=n_tokens))
        return out

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
        with batch_invariant_linear():
            for idx, batch in self._batches(requests, batch_size):
                for i, resp in zip(idx, self._loglik_batch(batch, [opt_ids[i] for i in idx]), strict=True):
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
        share = (time.perf_counter() - t0) / len(opt_ids)
        responses = []
        for row, (per, longer) in enumerate(zip(opt_ids, multi, strict=True)):
            t1 = time.perf_counter()
            rest = self._continuation_logprobs(outputs.cache, row, per) if longer else [0.0] * len(per)
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

    def _batches(self, requests: Sequence[Request],
                 batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(request indices, encoded batch) of padding-free batches. Each request is encoded once, alone; requests
        are taken in windows whose encodings fit `ENCODING_WINDOW_BYTES`, and batched by prompt length within a
        window (with the default model's 112-px images a window holds ~1700 requests)."""
        start = 0
        while start < len(requests):
            encodings: list[dict[str, torch.Tensor]] = []
            size = 0
            while start + len(encodings) < len(requests) and size < ENCODING_WINDOW_BYTES:
                enc = self.encode([requests[start + len(encodings)]])
                encodings.append(enc)
                size += sum(t.numel() * t.element_size() for t in enc.values())
            lengths = [int(e["input_ids"].shape[1]) for e in encodings]
            for idx in same_length_batches(lengths, batch_size):
                yield [start + i for i in idx], self._stack([encodings[i] for i in idx],
                                                            [requests[start + i] for i in idx])
            start += len(encodings)

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

    def forward_requests(self, requests: Sequence[Request], *, with_targets: Sequence[str] | None = None,
                         batch_size: int = 8) -> Iterator[tuple[dict, torch.Tensor]]:
        """Run the model on calibration requests (optionally teacher-forcing target answers) and yield
        (inputs, logits) per batch; methods use it with hooks to capture activations."""
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            suffixes = None
            if with_targets is not None:
                end = self.tokenizer.eos_token or ""
                suffixes = [t + end for t in with_targets[start:start + batch_size]]
            batch = self.encode(chunk, suffixes=suffixes)
            with torch.no_grad():
                logits = self.model(**batch).logits
            yield batch, logits

    # -- helpers ---------------------------------------------------------------------------------------------------
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
