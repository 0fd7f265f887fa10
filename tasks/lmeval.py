"""`lmeval:<task>`: any lm-evaluation-harness task (built-in, or YAML from `--lmeval-include DIR`) as a harness task.

The task's documents become harness samples (one per document, id = its index in lm-eval's evaluation split), so
the runner's seeded `--limit`, per-sample logs, resume and store work as for native tasks. Answering goes through
lm-eval's own machinery: `fewshot_context` and `construct_requests` build the instances (with the model's chat
template, as `lm-eval --apply_chat_template` does, the harness's convention for every task), the `qvlm-harness` LM
(`qvlm_harness.lmeval.model`) answers them on the quantized adapter, and the task's filters and `process_results` score
each document. Metrics keep lm-eval's names and scale: `acc,none`, `exact_match,strict-match`, ... as fractions, with
lm-eval's aggregation functions and standard errors (`acc_stderr,none`).

Differences from a plain `lm-eval` run, all for determinism under resume: `--limit N` takes a seeded random subset
(lm-eval takes the first N); few-shot demonstrations are drawn per document from a generator seeded by
(`fewshot_seed`, document index) instead of one generator consumed in document order. Groups and tags (e.g. `mmlu`)
are not expanded: name their member tasks one by one. `--image-control shuffle|blank` replaces every image of a
document with another document's first image (or a blank one).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvlm_harness.errors import DataError, HarnessError, UnknownNameError
from qvlm_harness.task import Request, Response, Sample, Task, TaskMeta

LAYOUT = "the dataset named in the lm-eval task's YAML (dataset_path/custom_dataset); --data-dir is not used"
_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


@dataclass
class LMEvalRequest(Request):
    """A harness request standing for one lm-eval document; `prompt`/`image` are the plain (untemplated) context
    and first image, used for calibration and replaced by the rendered context once answered (for the logs)."""

    doc_id: int = 0
    split: str = ""
    own_image: Any = field(default=None, repr=False)  # the document's first image as built (control runs swap it)


@dataclass(frozen=True)
class DocImage:
    """A lazy reference to a document's first image (a sample's `image`, so `--image-control shuffle` can hand one
    document's image to another without decoding every image up front)."""

    split: str
    doc_id: int


@dataclass
class LMEvalResponse(Response):
    """lm-eval's per-document outcome: metrics keyed `metric,filter`, raw and filtered responses."""

    metrics: dict[str, Any] = field(default_factory=dict)
    resps: list[Any] = field(default_factory=list)
    filtered: dict[str, Any] = field(default_factory=dict)


class LMEvalTask(Task):
    """One lm-eval task, named `lmeval:<task>`; options arrive from the run's task options (`--lmeval-include`)."""

    scoring_modes = ("lmeval",)
    batch_invariant = False  # lm-eval's model API batches (and pads) requests itself
    supports_shots = False
    train_split = "train"
    data_layout = LAYOUT

    def __init__(self, task: str, include_path: str | Sequence[str] | None = None, num_fewshot: int | None = None,
                 apply_chat_template: bool = True, system_instruction: str | None = None, fewshot_seed: int = 1234,
                 bootstrap_iters: int = 100000):
        self.lm_task_name = task
        self.name = f"lmeval:{task}"
        self.include_path = _paths(include_path)
        self.num_fewshot = num_fewshot
        self.apply_chat_template = bool(apply_chat_template)
        self.system_instruction = system_instruction
        self.fewshot_seed = int(fewshot_seed)
        self.bootstrap_iters = int(bootstrap_iters)
        self._task: Any = None
        self._docs: dict[str, Any] = {}

    # -- the lm-eval task ------------------------------------------------------------------------------------------
    @property
    def lm_task(self) -> Any:
        """The lm-eval `Task`, built on first use (building downloads or reads its dataset)."""
        if self._task is None:
            self._task = _build_task(self.lm_task_name, self.include_path)
        return self._task

    @property
    def shots(self) -> int:
        n = self.num_fewshot if self.num_fewshot is not None else self.lm_task.config.num_fewshot
        return int(n or 0)

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"lm-eval task {self.lm_task_name} ({self.lm_task.OUTPUT_TYPE}, {self.shots}-shot)"

    @property
    def metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        filters = [f.name for f in getattr(self.lm_task, "_filters", [])] or ["none"]
        names = list(self.lm_task.aggregation()) or ["acc"]
        return tuple(f"{m},{f}" for f in filters for m in names)

    @property
    def primary_metric(self) -> str:  # type: ignore[override]
        return self.metrics[0]

    def metadata(self) -> TaskMeta:
        """Labelled with the harness name (`lmeval:<task>`); each `metric,filter` followed by its standard error,
        the order `aggregate` stores them in. lm-eval's scale (fractions) and its own `higher_is_better`."""
        higher = self.lm_task.higher_is_better() or {}
        columns, stderrs, lower = [], [], []
        for key in self.metrics:
            metric, _, filt = key.partition(",")
            stderr = f"{metric}_stderr,{filt}"
            columns += [key, stderr]
            stderrs.append(stderr)
            if higher.get(metric) is False:
                lower.append(key)
        return TaskMeta(label=self.name, metrics=tuple(columns), primary=self.primary_metric,
                        lower_is_better=tuple(lower), unranked=tuple(stderrs),
                        caption=f"lm-eval task {self.lm_task_name}: lm-eval's metrics (metric,filter) and scale "
                                "(fractions), with their standard errors.")

    @property
    def eval_split(self) -> str:  # type: ignore[override]
        cfg = self.lm_task.config
        return cfg.test_split if self.lm_task.has_test_docs() else (cfg.validation_split or "validation")

    # -- samples ---------------------------------------------------------------------------------------------------
    def _split_docs(self, split: str) -> list:
        split = self.resolve_split(split)
        if split not in self._docs:
            t, cfg = self.lm_task, self.lm_task.config
            if split == self.eval_split:
                docs = t.eval_docs
            elif split == self.train_split or split == cfg.training_split:
                if t.has_training_docs():
                    docs = t.training_docs()
                elif getattr(t.fewshot_cfg, "split", None):
                    docs = t.fewshot_docs()
                else:
                    raise HarnessError(f"{self.name} has no training split to calibrate on; pass --calib-task with a "
                                       "task that has one (e.g. --calib-task sqa)")
            elif split in (cfg.validation_split, "validation", "val") and t.has_validation_docs():
                docs = t.validation_docs()
            else:
                raise DataError(f"{self.name}: no split {split!r}; use test (the evaluation split), train, validation")
            # a datasets.Dataset is kept as is: indexing decodes one document (and its images) at a time
            self._docs[split] = docs if hasattr(docs, "__getitem__") and hasattr(docs, "__len__") else list(docs)
        return self._docs[split]

    def load(self, split: str, data_dir: Path | None = None) -> list[Sample]:
        split = self.resolve_split(split)
        t = self.lm_task
        samples = []
        for i, doc in enumerate(self._split_docs(split)):
            text = t.doc_to_text(doc)
            image = DocImage(split, i) if t.config.doc_to_image and _images(t, doc) else None
            samples.append(Sample(str(i), image, {"doc_id": i, "split": split, "text": text if isinstance(text, str)
                                                  else str(text), "target": str(t.doc_to_target(doc))}))
        return samples

    def resolve_split(self, split: str) -> str:
        return self.eval_split if split == "test" else split

    def _doc(self, sample_or_request: Sample | LMEvalRequest) -> dict:
        if isinstance(sample_or_request, Sample):
            split, doc_id = sample_or_request.data["split"], int(sample_or_request.data["doc_id"])
        else:
            split, doc_id = sample_or_request.split, sample_or_request.doc_id
        return self._split_docs(split)[doc_id]

    # -- requests --------------------------------------------------------------------------------------------------
    def _context(self, doc: dict, doc_id: int, chat_template=None) -> str | list[str]:
        """lm-eval's prompt for one document; few-shot demos seeded per document so resume does not change them.
        With a chat template, demos are separate turns (lm-eval's default with --apply_chat_template)."""
        t = self.lm_task
        digest = hashlib.sha256(f"{self.fewshot_seed}-{doc_id}".encode()).digest()
        t.set_fewshot_seed(int.from_bytes(digest[:8], "little"))
        return t.fewshot_context(doc, self.shots, system_instruction=self.system_instruction,
                                 apply_chat_template=chat_template is not None,
                                 fewshot_as_multiturn=chat_template is not None,
                                 chat_template=chat_template, gen_prefix=t.doc_to_prefix(doc))

    def request(self, sample: Sample, *, scoring: str = "generate", demos: Sequence[Sample] = ()) -> LMEvalRequest:
        t = self.lm_task
        doc = self._doc(sample)
        plain = self._context(doc, int(sample.data["doc_id"]))
        images = _images(t, doc)
        kind = "generate" if t.OUTPUT_TYPE == "generate_until" else "loglik"
        options = tuple(str(c) for c in t.doc_to_choice(doc)) if t.OUTPUT_TYPE == "multiple_choice" else ()
        max_new = int((t.config.generation_kwargs or {}).get("max_gen_toks", 256))
        first = images[0] if images else None
        return LMEvalRequest(sample.id, plain if isinstance(plain, str) else plain[0], first, kind=kind,
                             options=options, max_new_tokens=max_new, doc_id=int(sample.data["doc_id"]),
                             split=sample.data["split"], own_image=first)

    def target(self, sample: Sample) -> str:
        t = self.lm_task
        doc = self._doc(sample)
        target = t.doc_to_target(doc)
        if isinstance(target, int) and t.config.doc_to_choice is not None:
            return str(t.doc_to_choice(doc)[target])
        if isinstance(target, list):
            return str(target[0])
        return str(target)

    def answer(self, adapter: Any, requests: Sequence[Request], batch_size: int = 8) -> list[Response]:
        """Build lm-eval instances with the model's chat template, answer them, filter and score per document."""
        from qvlm_harness.lmeval.model import QVLMHarnessLM

        t = self.lm_task
        lm = QVLMHarnessLM.from_adapter(adapter, batch_size=batch_size, seed=self.fewshot_seed)
        template = lm.apply_chat_template if self.apply_chat_template else None
        per_doc = []
        for req in requests:
            if not isinstance(req, LMEvalRequest):
                raise TypeError(f"{self.name} answers only its own requests, got {type(req).__name__}")
            doc = self._doc(req)
            ctx = self._context(doc, req.doc_id, chat_template=template)
            inst = t.construct_requests(doc=doc, ctx=ctx, metadata=(t.config.task, req.doc_id, t.config.repeats),
                                        apply_chat_template=template is not None, chat_template=template)
            inst = inst if isinstance(inst, list) else [inst]
            if req.image is not req.own_image:  # an image-control run replaced this document's image
                self._replace_images(inst, req.image)
            per_doc.append(inst)
            req.prompt = ctx if isinstance(ctx, str) else "\n---\n".join(ctx)
        by_type: dict[str, list] = defaultdict(list)
        for insts in per_doc:
            for inst in insts:
                by_type[inst.request_type].append(inst)
        seconds: dict[str, float] = {}
        for rtype, insts in by_type.items():
            cloned = [inst for inst in insts for _ in range(inst.repeats)]
            t0 = time.perf_counter()
            outputs = getattr(lm, rtype)(cloned)
            seconds[rtype] = time.perf_counter() - t0
            for out, inst in zip(outputs, cloned, strict=True):
                inst.resps.append(out)
        loglik_share = seconds.get("loglikelihood", 0.0) / max(1, len(requests))
        responses: list[Response] = []
        for req, insts in zip(requests, per_doc, strict=True):
            insts.sort(key=lambda x: x.idx)
            for ensemble in getattr(t, "_filters", []):
                ensemble.apply(insts)
            doc = self._doc(req)
            metrics: dict[str, Any] = {}
            filtered: dict[str, Any] = {}
            for key in insts[0].filtered_resps:
                values = [inst.filtered_resps[key] for inst in insts]
                filtered[key] = values
                for metric, value in t.process_results(doc, values).items():
                    metrics[f"{metric},{key}"] = value
            text = insts[0].resps[0] if t.OUTPUT_TYPE == "generate_until" and insts[0].resps else None
            responses.append(LMEvalResponse(
                text=text if isinstance(text, str) else None,
                prefill_s=loglik_share if "loglikelihood" in by_type else None,
                metrics=metrics, resps=[i.resps for i in insts], filtered=filtered))
        return responses

    def _replace_images(self, instances: list, image: Any) -> None:
        """Every image of these instances becomes `image` (another document's, or a blank one)."""
        if isinstance(image, DocImage):
            image = _images(self.lm_task, self._split_docs(image.split)[image.doc_id])[0]
        for inst in instances:
            *args, aux = inst.arguments
            if isinstance(aux, dict) and aux.get("visual"):
                visual = aux["visual"] if isinstance(aux["visual"], list | tuple) else [aux["visual"]]
                inst.arguments = (*args, {**aux, "visual": [image] * len(visual)})

    # -- scoring ---------------------------------------------------------------------------------------------------
    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        if not isinstance(response, LMEvalResponse):
            raise TypeError(f"{self.name} scores only lm-eval responses, got {type(response).__name__}")
        return {"metrics": _jsonable(response.metrics), "target": sample.data.get("target"),
                "resps": _jsonable(response.resps), "filtered": _jsonable(response.filtered)}

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """lm-eval's aggregation per `metric,filter` (mean unless the task says otherwise) and its standard errors."""
        from lm_eval.api.metrics import mean, stderr_for_metric

        raw: dict[str, list] = defaultdict(list)
        for rec in records:
            for key, value in rec["metrics"].items():
                raw[key].append(value)
        aggregations = self.lm_task.aggregation()
        out: dict[str, float] = {}
        for key, items in raw.items():
            metric, _, filt = key.partition(",")
            fn = aggregations.get(metric, mean)
            value = fn(items)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = float(value)
            iters = min(self.bootstrap_iters, 100) if metric in ("bleu", "chrf", "chrf++", "ter") else \
                self.bootstrap_iters
            stderr = stderr_for_metric(metric=fn, bootstrap_iters=iters)
            if stderr is not None and len(items) > 1:
                err = stderr(items)
                if isinstance(err, int | float) and math.isfinite(err):
                    out[f"{metric}_stderr,{filt}"] = float(err)
        return out

    def describe_layout(self) -> str:
        return LAYOUT


# -- helpers -----------------------------------------------------------------------------------------------------------
def _paths(include_path: str | Sequence[str] | None) -> tuple[str, ...]:
    if include_path is None:
        return ()
    items = [include_path] if isinstance(include_path, str | Path) else list(include_path)
    out: list[str] = []
    for item in items:
        out += [p for p in str(item).split(os.pathsep) if p]
    for p in out:
        if not Path(p).is_dir():
            raise DataError(f"--lmeval-include {p}: no such folder; pass a folder holding lm-eval task YAML files")
    return tuple(str(Path(p).resolve()) for p in out)


def _manager(include: tuple[str, ...], defaults: bool):
    """lm-eval's TaskManager, cached: indexing the built-in tasks takes ~10 s, an include folder alone ~0."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise HarnessError("lmeval: tasks need lm-eval: pip install -c constraints.txt 'qvlm-harness[lmeval]'"
                           ) from exc
    key = (include, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(include) or None, include_defaults=defaults)
    return _MANAGERS[key]


def _build_task(name: str, include: tuple[str, ...]):
    manager = _manager(include, False) if include else None
    if manager is None or name not in manager.all_tasks:
        manager = _manager(include, True)
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr('lmeval:' + c) for c in close)}?" if close else ""
        where = f" or in {', '.join(include)}" if include else "; add --lmeval-include DIR for your own YAML tasks"
        raise UnknownNameError(f"lm-eval has no task {name!r} among its built-ins{where}.{hint} "
                               "List them with `lm-eval ls tasks`.")
    try:
        loaded = manager.load([name])
    except Exception as exc:  # dataset download/parsing errors come from many libraries
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"lm-eval could not build task {name!r} ({type(exc).__name__}: {first[:200]}); built-in tasks "
                        "fetch their data from the Hugging Face hub, so check network access or HF_DATASETS_OFFLINE "
                        "and the local datasets cache") from exc
    tasks = loaded["tasks"]
    if loaded.get("groups") or len(tasks) != 1:
        members = ", ".join(f"lmeval:{n}" for n in sorted(tasks)[:8]) + (" ..." if len(tasks) > 8 else "")
        raise HarnessError(f"lmeval:{name} is an lm-eval group/tag of {len(tasks)} tasks; pass its tasks one by one "
                           f"(e.g. {members})")
    return next(iter(tasks.values()))


def _images(task: Any, doc: dict) -> list:
    if not task.config.doc_to_image:
        return []
    visual = task.doc_to_image(doc)
    if visual is None:
        return []
    return list(visual) if isinstance(visual, list | tuple) else [visual]


def _jsonable(value: Any) -> Any:
    """Per-sample values as JSON for the sample logs (tuples -> lists, numpy scalars -> numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)
