"""Argument helpers shared by subcommands (comma lists, shot counts, scopes, method options)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from qvlm_harness import plugins
from qvlm_harness.config import ALL_SCOPES, BITS_SYNTAX, QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.embedding import embedding_format_arg

DEFAULT_MODEL_CAVEAT = ("Model: the embedded default (DINOv2-S/14 + SmolLM2-135M-Instruct, trained projector/LoRA); "
                        "its LM weights come from a Q4_1 GGUF, so weight-only 4-bit results are optimistic; "
                        "the embedded data sets are derived from easy-VQA and packaged photos, not the official "
                        "benchmarks.")


GROUP_RULE = ("g<G> quantizes weights in groups of G input channels in every layer whose input width G divides "
              "(the others per output channel; a G that divides no layer in scope is refused)")
BITS_HELP = (f"comma list of {BITS_SYNTAX}, e.g. w8a8,w4a4,w4a16g128; each flag at most once; {GROUP_RULE}; "
             "-tensor: per-tensor activations (static unless -dynamic), -sym: symmetric activations, -wasym: "
             "asymmetric weights")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in csv_list(text))
    except ValueError:
        raise HarnessError(f"expected comma-separated integers, got {text!r} (e.g. --shots 0,4,32)") from None


def scope_list(text: str) -> tuple[str, ...]:
    parts = tuple(csv_list(text))
    bad = [p for p in parts if p not in ALL_SCOPES]
    if bad or not parts:
        raise HarnessError(f"--quantize takes a comma list of {', '.join(ALL_SCOPES)}; got {text!r}")
    return parts


def method_options(pairs: Sequence[str]) -> dict[str, dict]:
    """--method-option awq.duo_scaling=true -> {"awq": {"duo_scaling": "true"}}: values stay the strings the user
    typed; each method's typed config coerces them (so `false` is False, not the truthy string)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot or not option.strip():
            raise HarnessError(f"--method-option takes METHOD.OPTION=VALUE, got {pair!r}")
        out.setdefault(plugins.methods.resolve_name(method), {})[option.strip()] = value
    return out


def add_run_arguments(p: argparse.ArgumentParser, *, methods_required: bool = True) -> None:
    """The options shared by `run` and other grid-running commands."""
    p.add_argument("--config", type=Path, default=None, metavar="FILE.yaml",
                   help="run settings from a YAML file (flag names as keys); flags given here win")
    p.add_argument("--methods", required=methods_required,
                   help=f"comma list, e.g. {plugins.EXAMPLE_METHODS} (`harness ls methods`)")
    p.add_argument("--tasks", required=True, help=f"comma list, e.g. {plugins.EXAMPLE_TASKS} (see `harness ls tasks`)")
    p.add_argument("--bits", default="w8a8,w4a4", help=BITS_HELP)
    p.add_argument("--model", default="default", help="'default', a local Llava checkpoint folder or a hub id")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of N samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", type=Path, default=Path("results"), help="folder for tables, samples, store")
    p.add_argument("--store", type=Path, default=None, help="SQLite store (default: <output>/harness.db)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="official data: one task's folder, or a folder with one sub-folder per task")
    p.add_argument("--split", default="test", help="'test' means each task's evaluation split")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-task", default=None, help="calibrate every cell on this task (default: its own)")
    p.add_argument("--quantize", type=scope_list, default=ALL_SCOPES, dest="scope",
                   help="parts to quantize: vision,projector,lm (default all)")
    p.add_argument("--scoring", choices=["generate", "loglik"], default="generate")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--shots", type=int_list, default=(0,),
                   help=f"few-shot counts for tasks that take them ({plugins.FEW_SHOT_TASKS})")
    p.add_argument("--trials", type=int, default=1, help="seeded few-shot trials averaged per shot count")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="dtype the model is loaded in before quantization (fp16 on GPUs for 7B+ models)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE")
    p.add_argument("--image-control", choices=["shuffle", "blank"], default=None,
                   help="control run: give each question another question's image (shuffle) or a grey image")
    p.add_argument("--execution", choices=["simulated", "packed"], default="simulated",
                   help="packed: run quantized layers on real low-bit integer kernels (harness.kernels)")
    add_embeddings_argument(p)
    add_rotate_argument(p, "rotate the float model first (QuaRot: norms folded, residual stream, heads and "
                        "down_proj inputs rotated, online Hadamards), then quantize it with each method; default none")
    p.add_argument("--no-log-samples", action="store_true", help="do not keep prompts in the per-sample logs")
    p.add_argument("--lmeval-include", action="append", default=[], metavar="DIR",
                   help="folder of lm-eval task YAML files for lmeval:<task> names (repeatable)")
    p.add_argument("--lmeval-fewshot", type=int, default=None, metavar="N",
                   help="few-shot count for lmeval:<task> names (default: the task's YAML num_fewshot)")
    p.add_argument("--no-progress", action="store_true")


def lmeval_task_options(args: argparse.Namespace) -> dict[str, dict]:
    """--lmeval-include / --lmeval-fewshot -> constructor options of every lmeval:<task> in --tasks/--calib-task."""
    include = getattr(args, "lmeval_include", None) or []
    fewshot = getattr(args, "lmeval_fewshot", None)
    names = csv_list(args.tasks) + ([args.calib_task] if getattr(args, "calib_task", None) else [])
    lmeval = [plugins.tasks.resolve_name(n) for n in names if n.strip().lower().startswith("lmeval:")]
    if (include or fewshot is not None) and not lmeval:
        raise HarnessError("--lmeval-include/--lmeval-fewshot apply to lmeval:<task> names; add one to --tasks")
    if fewshot is not None and fewshot < 0:
        raise HarnessError("--lmeval-fewshot must be 0 or more")
    options: dict = {}
    if include:
        options["include_path"] = [str(Path(p).expanduser()) for p in include]
    if fewshot is not None:
        options["num_fewshot"] = fewshot
    return {name: dict(options) for name in lmeval} if options else {}


def add_embeddings_argument(p: argparse.ArgumentParser) -> None:
    """`--quantize-embeddings` (run, quantize and bench take the same flag)."""
    p.add_argument("--quantize-embeddings", type=embedding_format_arg, default="none", dest="embeddings",
                   help="also quantize the token embedding and the LM head (packed, whatever the method): int8 per "
                        "row or int4 in groups of 32/64/128 hidden channels; a tied head shares the codes "
                        "(default none: they stay float)")


def add_rotate_argument(p: argparse.ArgumentParser, help: str) -> None:
    """`--rotate` with the rotation kinds; `help` says what the command does with it."""
    p.add_argument("--rotate", choices=["none", "hadamard", "random"], default="none", help=help)


def run_spec_from_args(args: argparse.Namespace) -> RunSpec:
    spec = RunSpec(
        methods=csv_list(args.methods), tasks=csv_list(args.tasks), bits=QuantSpec.parse_list(args.bits),
        model=args.model, limit=args.limit, seed=args.seed, batch_size=args.batch_size, output=args.output,
        store=args.store, data_dir=args.data_dir, split=args.split, calib_samples=args.calib_samples,
        calib_task=args.calib_task, scope=tuple(args.scope), scoring=args.scoring,
        max_new_tokens=args.max_new_tokens, shots=args.shots, trials=args.trials, device=args.device,
        dtype=args.dtype, threads=args.threads, log_samples=not args.no_log_samples, image_control=args.image_control,
        method_options=method_options(args.method_option), execution=args.execution,
        rotate=getattr(args, "rotate", "none"),
        task_options=lmeval_task_options(args), embeddings=args.embeddings,
    )
    return spec


def run_folder(output: Path, model_id: str, run_id: str) -> Path:
    return output / model_id.replace("/", "_") / run_id
