"""Model adapter for HF `LlavaForConditionalGeneration` checkpoints (llava-hf/* on the hub, or a local folder).

The adapter is the only code that knows how a LLaVA model is prompted: it renders the checkpoint's own chat
template, places the image, batches with left padding, runs greedy generation (timing prefill and decode
separately) and scores answer options by log-likelihood. Methods see the `torch.nn.Module` and the names of
the linear layers of each part (`vision`, `projector`, `lm`); tasks see only `Request`/`Response`.
"""

from __future__ import annotations

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
    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], batch_size: int = 8) -> list[Response]:
        """Greedy generation; each response carries its share of the batch's prefill and decode time."""
        out: list[Response] = []
        for chunk in _chunks(requests, batch_size):
            batch = self.encode(chunk)
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
            new = gen[:, batch["input_ids"].shape[1]:]
            for req, ids in zip(chunk, new, strict=True):
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
        merges into one token. When every option of every request in a batch is a single token (option letters,
        yes/no), one forward pass scores them all; otherwise each (request, option) pair is a sequence.
        """
        out: list[Response] = []
        for chunk in _chunks(requests, batch_size):
            opt_ids = [[self.tokenizer(o, add_special_tokens=False).input_ids for o in r.options] for r in chunk]
            if any(not ids for per in opt_ids for ids in per):
                raise ModelError("an answer option tokenizes to nothing; options must be non-empty text")
            t0 = time.perf_counter()
            if all(len(ids) == 1 for per in opt_ids for ids in per):
                batch = self.encode(chunk)
                logits = self.model(**batch).logits[:, -1, :].float()
                logp = torch.log_softmax(logits, dim=-1)
                scores = [[(float(logp[i, ids[0]]), 1) for ids in per] for i, per in enumerate(opt_ids)]
            else:
                scores = self._loglik_sequences(chunk, opt_ids)
            elapsed = time.perf_counter() - t0
            out += [Response(option_logprobs=s, prefill_s=elapsed / len(chunk)) for s in scores]
        return out

    @torch.inference_mode()
    def _loglik_sequences(self, chunk: Sequence[Request], opt_ids: list[list[list[int]]]):
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


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]


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
