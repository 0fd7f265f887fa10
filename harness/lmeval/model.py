"""`qvlm-harness`: an lm-eval `LM` that answers with a (quantized) LLaVA model through the harness's adapter.

Built two ways:
- by lm-eval from `--model_args` (`QVLMHarnessLM(model=..., method=..., bits=...)`): the harness loads the model
  (a registered name such as `default`/`tiny`, a local folder or a hub id), quantizes it with the method plugin
  exactly as `harness run` does, and wraps the result;
- by the harness runner around an already quantized adapter (`QVLMHarnessLM.from_adapter`), for `lmeval:` tasks.

Request conventions follow lm-eval's `hf-multimodal` model: a request's last argument may be `{"visual": [images]}`
and the context marks where each image goes with `<image>` (replaced by the processor's image token; images without
a placeholder are put before the text, the harness's own convention). `apply_chat_template` renders chat turns with
the model's processor template, splitting `<image>` placeholders into image entries, so a context built by lm-eval
with `--apply_chat_template` is exactly the prompt `LlavaAdapter.render` gives the harness's native tasks.

Scoring follows the harness adapter: a continuation is tokenized on its own and appended to the context's token ids
(so the boundary never merges into one token); trailing whitespace of a context moves into the continuation, as
lm-eval does. Generation is greedy unless the task asks for sampling, stops at the model's stop tokens and at the
task's `until` strings, and returns the raw continuation (lm-eval's filters do any stripping).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval.api.model import LM

from qvlm_harness.errors import HarnessError
from qvlm_harness.images import load_image
from qvlm_harness.models.llava import IMAGE_PLACEHOLDER, LlavaAdapter, _tokens_before_stop

ARG_SEPARATORS = ("+", ";", "|")  # list values inside --model_args (commas separate the arguments themselves)


class QVLMHarnessLM(LM):
    """lm-eval model backed by a harness `LlavaAdapter` (quantized by a harness method plugin)."""

    MULTIMODAL = True  # lm-eval refuses multimodal tasks for models without this flag

    def __init__(
        self,
        model: str = "default",
        method: str | None = None,
        bits: str | None = None,
        calib_task: str | None = None,
        calib_samples: int = 64,
        data_dir: str | None = None,
        scope: str = "vision+projector+lm",
        seed: int = 0,
        dtype: str = "fp32",
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_gen_toks: int = 256,
        threads: int | None = None,
        *,
        adapter: LlavaAdapter | None = None,
        quantized: Any = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        if adapter is None:
            quantized = build_quantized(
                model=str(model), method=method, bits=bits, calib_task=calib_task,
                calib_samples=int(calib_samples), data_dir=data_dir, scope=str(scope), seed=self.seed,
                dtype=str(dtype), device=_device(device), threads=threads, method_options=method_options)
            adapter = quantized.adapter
        elif method_options:
            raise HarnessError(f"unknown qvlm-harness model argument(s): {', '.join(sorted(method_options))}")
        self.adapter = adapter
        self.quantized = quantized
        self.processor = adapter.processor
        self.tokenizer = adapter.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or IMAGE_PLACEHOLDER
        self._device = adapter.device

    @classmethod
    def from_adapter(cls, adapter: LlavaAdapter, *, batch_size: int = 1, max_gen_toks: int = 256,
                     quantized: Any = None, seed: int = 0) -> QVLMHarnessLM:
        """Wrap an adapter the caller already loaded (and quantized)."""
        return cls(adapter=adapter, quantized=quantized, batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed)

    # -- lm-eval metadata ----------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.adapter.path or self.adapter.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def get_model_info(self) -> dict[str, Any]:
        """Merged into lm-eval's results["config"]: which model, method and precision produced the numbers."""
        info: dict[str, Any] = {"model_name": self.adapter.name, "model_path": self.adapter.path,
                                "model_fingerprint": self.adapter.fingerprint()}
        q = self.quantized
        if q is not None:
            info |= {"qvlm_method": q.method, "qvlm_bits": "fp" if q.spec.is_float else q.spec.tag,
                     "qvlm_execution": q.execution, "qvlm_quantized_modules": len(q.quantized_modules)}
        return info

    # -- prompts ---------------------------------------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render lm-eval chat turns with the model's template; `<image>` placeholders become image entries."""
        conversation = []
        for message in chat_history:
            content: list[dict[str, str]] = []
            parts = str(message["content"]).split(IMAGE_PLACEHOLDER)
            for i, part in enumerate(parts):
                if part:
                    content.append({"type": "text", "text": part})
                if i < len(parts) - 1:
                    content.append({"type": "image"})
            conversation.append({"role": message["role"], "content": content})
        return self.processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt, tokenize=False)

    def _place_images(self, context: str, images: list) -> str:
        """The context with exactly one image token per image: surplus placeholders (e.g. in few-shot demos whose
        images lm-eval does not pass) are dropped from the front, missing ones are put before the text."""
        if self.image_token != IMAGE_PLACEHOLDER:
            context = context.replace(IMAGE_PLACEHOLDER, self.image_token)
        found = context.count(self.image_token)
        if found > len(images):  # keep the last ones: few-shot demos come first, the evaluated document last
            head, *rest = context.split(self.image_token)
            drop = found - len(images)
            context = head + "".join((self.image_token if i >= drop else "") + r for i, r in enumerate(rest))
        elif found < len(images):
            context = (self.image_token + "\n") * (len(images) - found) + context
        return context

    def _encode(self, contexts: Sequence[str], images: Sequence[list], padding_side: str) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch of already rendered contexts (same processor call as the adapter's)."""
        texts = [self._place_images(c, imgs) for c, imgs in zip(contexts, images, strict=True)]
        flat = [img for imgs in images for img in imgs]
        self.tokenizer.padding_side = padding_side
        batch = self.processor(images=flat or None, text=list(texts), return_tensors="pt", padding=True)
        device, dtype = self.adapter.device, self.adapter.dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}

    @staticmethod
    def _split_args(args: tuple) -> tuple[tuple, list]:
        """(plain arguments, RGB images) of one request; images come from the trailing {"visual": ...} dict."""
        if args and isinstance(args[-1], dict) and ("visual" in args[-1] or "audio" in args[-1]):
            aux = args[-1]
            if aux.get("audio"):
                raise HarnessError("qvlm-harness models take images, not audio; pick a text or image task")
            visual = aux.get("visual") or []
            visual = visual if isinstance(visual, list | tuple) else [visual]
            return args[:-1], [load_image(v, what="lm-eval request") for v in visual]
        return args, []

    # -- log-likelihood ----------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        items = []
        for req in requests:
            (context, continuation), images = self._split_args(tuple(req.args))
            n_space = len(context) - len(context.rstrip())
            if n_space:
                context, continuation = context[:-n_space], context[-n_space:] + continuation
            items.append((context, continuation, images))
        results = self._score(items)
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    @torch.inference_mode()
    def _score(self, items: Sequence[tuple[str, str, list]]) -> list[tuple[float, bool]]:
        """Sum log-prob and greedy flag of each continuation after its context (right-padded batches)."""
        encoded = []
        for context, continuation, images in items:
            cont = self.tokenizer(continuation, add_special_tokens=False).input_ids
            if not cont:
                raise HarnessError(f"continuation {continuation!r} tokenizes to nothing; lm-eval continuations must "
                                   "be non-empty text")
            encoded.append((context, cont, images))
        lengths = [len(self.tokenizer(c, add_special_tokens=True).input_ids) + len(k) for c, k, _ in encoded]
        order = sorted(range(len(encoded)), key=lambda i: -lengths[i])
        out: list[tuple[float, bool] | None] = [None] * len(encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ctx_ids, pixel = self._context_ids([encoded[i] for i in idx])
            rows = [c + encoded[i][1] for c, i in zip(ctx_ids, idx, strict=True)]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for j, r in enumerate(rows):
                input_ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            inputs = {"input_ids": input_ids.to(self.adapter.device), "attention_mask": mask.to(self.adapter.device)}
            inputs |= pixel
            logp = torch.log_softmax(self.adapter.model(**inputs).logits.float(), dim=-1)
            for j, i in enumerate(idx):
                n, cont = len(ctx_ids[j]), encoded[i][1]
                window = logp[j, n - 1:n - 1 + len(cont)]
                target = torch.tensor(cont, device=window.device)
                total = float(window.gather(1, target[:, None]).sum())
                greedy = bool((window.argmax(dim=-1) == target).all())
                out[i] = (total, greedy)
        return out  # type: ignore[return-value]

    def _context_ids(self, batch: Sequence[tuple[str, list[int], list]]) -> tuple[list[list[int]], dict]:
        """Unpadded token ids of each context (image tokens expanded) and the batch's image tensors."""
        ids: list[list[int]] = []
        pixel: dict[str, torch.Tensor] = {}
        texts, images = [], []
        for context, _, imgs in batch:
            if context == "":
                if imgs:
                    raise HarnessError("a multimodal request needs a non-empty context to place its image in")
                bos = self.tokenizer.bos_token_id
                ids.append([bos if bos is not None else self.tokenizer.eos_token_id])
            else:
                ids.append([])
            texts.append(context)
            images.append(imgs)
        todo = [j for j, c in enumerate(texts) if c != ""]
        if todo:
            enc = self._encode([texts[j] for j in todo], [images[j] for j in todo], padding_side="right")
            for row, j in enumerate(todo):
                ids[j] = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            pixel = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        return ids, pixel

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring of text-only strings in disjoint rolling windows (lm-eval's HF convention)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        max_len = self._max_length()
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        out = []
        for req in requests:
            (text,), images = self._split_args(tuple(req.args))
            if images:
                raise HarnessError("loglikelihood_rolling scores text only; an image's likelihood is undefined")
            tokens = self.tokenizer(text, add_special_tokens=False).input_ids
            total = 0.0
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, max_len, 1)):
                total += self._score_ids(ctx, cont)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    @torch.inference_mode()
    def _score_ids(self, context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([context + continuation], device=self.adapter.device)
        logits = self.adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        window = torch.log_softmax(logits, dim=-1)[len(context) - 1:len(context) - 1 + len(continuation)]
        return float(window.gather(1, torch.tensor(continuation, device=window.device)[:, None]).sum())

    def _max_length(self) -> int:
        cfg = self.adapter.model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        return int(getattr(text_cfg, "max_position_embeddings", None) or 2048)

    # -- generation --------------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        items = []
        for req in requests:
            (context, gen_kwargs), images = self._split_args(tuple(req.args))
            items.append((context, dict(gen_kwargs or {}), images))
        groups: dict[str, list[int]] = {}
        for i, (_, kw, _) in enumerate(items):
            groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(items)
        for indices in groups.values():
            kwargs = copy.deepcopy(items[indices[0]][1])
            lengths = {i: len(self.tokenizer(items[i][0]).input_ids) for i in indices}
            indices = sorted(indices, key=lambda i: -lengths[i])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self._generate([items[i][0] for i in chunk], [items[i][2] for i in chunk], dict(kwargs))
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
        for req, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate(self, contexts: list[str], images: list[list], kwargs: dict) -> list[str]:
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos = self.tokenizer.eos_token
        if eos and eos not in until:
            until.append(eos)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        kwargs.pop("max_length", None)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kwargs.pop("do_sample", temperature > 0.0))
        if do_sample:
            kwargs["temperature"] = temperature or 1.0
            torch.manual_seed(self.seed)
        batch = self._encode(contexts, images, padding_side="left")
        start = batch["input_ids"].shape[1]
        stop_ids = self.adapter._eos_ids
        gen = self.adapter.model.generate(
            **batch, max_new_tokens=max_new, do_sample=do_sample, num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=stop_ids,
            stopping_criteria=[_StopOnStrings(self.tokenizer, [u for u in until if u], start)], **kwargs)
        texts = []
        for ids in gen[:, start:].tolist():
            ids = ids[:_tokens_before_stop(ids, stop_ids, self.tokenizer.pad_token_id)]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for term in until:
                if term:
                    text = text.split(term)[0]
            texts.append(text)
        return texts


class _StopOnStrings:
    """Stopping criterion: a row is done once its new text contains any stop string (lm-eval's `until`)."""

    def __init__(self, tokenizer, stops: Sequence[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, list(stops), start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        for row, ids in enumerate(input_ids[:, self.start:].tolist()):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            done[row] = any(s in text for s in self.stops)
        return done


def _device(value: str | None) -> str:
    """lm-eval passes its --device (default cuda); without CUDA, fall back to the CPU as lm-eval's HF model does."""
    device = str(value or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"qvlm-harness: device {device!r} requested but CUDA is not available; using cpu", file=sys.stderr)
        return "cpu"
    return device


def _batch_size(value: int | str | None) -> int:
    if value in (None, "", "auto") or (isinstance(value, str) and value.startswith("auto")):
        return 1
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise HarnessError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise HarnessError(f"batch_size must be a positive integer, got {value!r}")
    return size


def _list_arg(value: str) -> tuple[str, ...]:
    text = str(value)
    for sep in ARG_SEPARATORS[1:]:
        text = text.replace(sep, ARG_SEPARATORS[0])
    return tuple(p.strip() for p in text.split(ARG_SEPARATORS[0]) if p.strip())


def build_quantized(*, model: str, method: str | None, bits: str | None, calib_task: str | None, calib_samples: int,
                    data_dir: str | None, scope: str, seed: int, dtype: str, device: str, threads: int | None,
                    method_options: dict[str, Any], log: Callable[[str], None] | None = None):
    """Load `model` and quantize it with `method` (default fp32) at `bits`, the way `harness run` quantizes one
    cell; a quantized checkpoint folder (`harness quantize --output DIR`) is loaded as stored instead."""
    from pathlib import Path

    from qvlm_harness import plugins
    from qvlm_harness.checkpoint import StoredQuantization, load_quantized, read_manifest
    from qvlm_harness.config import ALL_SCOPES, QuantSpec
    from qvlm_harness.models.llava import set_threads
    from qvlm_harness.plan import check_model_source, resolve_model
    from qvlm_harness.quantize import calibration_for, quantize

    manifest = read_manifest(model) if Path(model).expanduser().is_dir() else None
    if manifest is not None:
        if method is not None or bits is not None:
            raise HarnessError(f"{model} is a quantized checkpoint ({manifest['method']} {manifest['spec']['tag']}); "
                               "drop method=/bits= from --model_args to evaluate it as stored")
        set_threads(int(threads) if threads else None)
        adapter, _ = load_quantized(model, device=device)
        stored = StoredQuantization(manifest, model)
        return quantize(adapter, stored, stored.spec)
    method = method or plugins.FLOAT_BASELINES[0]

    options = {}
    for key, value in method_options.items():
        if not key.startswith("opt_"):
            raise HarnessError(f"unknown qvlm-harness model argument {key!r}; known: model, method, bits, "
                               "calib_task, calib_samples, data_dir, scope, seed, dtype, device, batch_size, "
                               "max_gen_toks, threads, and opt_<name>=<value> for method options")
        options[key[4:]] = value
    name = plugins.methods.resolve_name(method)
    method_obj = plugins.methods.get(name)(**options)
    if method_obj.fixed_precision:
        spec = QuantSpec()
    elif bits is None:
        raise HarnessError(f"method {name} needs bits=...: add e.g. bits=w4a4 to --model_args")
    else:
        spec = QuantSpec.parse(str(bits))
    reason = method_obj.supports(spec)
    if reason is not None:
        raise HarnessError(f"method {name} does not support {spec.tag} ({reason}); see `harness ls methods`")
    scopes = _list_arg(scope)
    bad = [s for s in scopes if s not in ALL_SCOPES]
    if bad or not scopes:
        raise HarnessError(f"scope takes {'+'.join(ALL_SCOPES)} joined by '+', got {scope!r}")
    calibration = None
    if method_obj.needs_calibration(spec):
        if not calib_task:
            raise HarnessError(f"method {name} at {spec.tag} calibrates on a harness task's train split: add "
                               f"calib_task={plugins.DEFAULT_CALIB_TASK} (or another task from `harness ls tasks`) "
                               "to --model_args")
        task = plugins.tasks.get(plugins.tasks.resolve_name(calib_task))()
        calibration = calibration_for(method_obj, spec, task, calib_samples, seed,
                                      Path(data_dir) if data_dir else None)
    check_model_source(model)
    set_threads(int(threads) if threads else None)
    model_id, path = resolve_model(model)
    adapter = LlavaAdapter.load(path, dtype=dtype, device=device, name=model_id)
    if log:
        log(f"quantizing {model_id}: {name} {'fp' if spec.is_float else spec.tag}")
    return quantize(adapter, method_obj, spec, calibration, scope=scopes, seed=seed)
