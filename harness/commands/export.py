"""`harness export`: write a quantized checkpoint (or a float model) in a serving format, from the codes and scales
the harness stored (no re-quantization).

* ``--format compressed-tensors``: the whole Llava as a Hugging Face folder whose config.json carries the
  ``quantization_config`` llm-compressor writes (see `qvlm_harness.export.compressed`).
* ``--format gguf``: the language model for llama.cpp, Q8_0 / Q4_0 from block-32 symmetric grids, F32 / F16 for a
  float model (see `qvlm_harness.export.gguf_llama`).

A grid a format cannot represent is refused in one line before anything is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from qvlm_harness.errors import HarnessError

FORMATS = ("compressed-tensors", "gguf")
PACKAGES = {"compressed-tensors": None, "gguf": "gguf"}  # format -> python package its writer needs
SUMMARY = "export.json"


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a quantized checkpoint as compressed-tensors or GGUF (llama.cpp)")
    p.add_argument("--model", required=True,
                   help="a quantized checkpoint folder (harness quantize --output), or a float model: 'default', "
                        "'tiny' or a Llava folder")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--output", type=Path, required=True, help="folder to write the exported model to")
    p.add_argument("--gguf-float", default="f32", choices=["f32", "f16"],
                   help="gguf: type of the tensors left in float (embeddings, output, unquantized linears)")


def check_output(folder: Path) -> None:
    from qvlm_harness.writable import check_output_folder

    check_output_folder(folder, "--output")
    written_before = (folder / SUMMARY).is_file()  # an earlier export is replaced
    if folder.exists() and not written_before and any(not p.name.startswith(".") for p in folder.iterdir()):
        raise HarnessError(f"{folder} exists and holds files harness export did not write; choose an empty folder")


def precheck(fmt: str, path: Path) -> None:
    """Refuse what the format cannot hold from the checkpoint's manifest and config alone (before the model loads);
    the writers check the loaded model again."""
    from qvlm_harness.checkpoint import read_manifest
    from qvlm_harness.export import compressed, gguf_llama
    from qvlm_harness.export.source import manifest_facts, source_label

    manifest = read_manifest(path)
    label = source_label(path, manifest)
    if manifest is not None:
        facts, blocked = manifest_facts(manifest)
        writer = gguf_llama if fmt == "gguf" else compressed
        writer.refuse(label, writer.problems(facts, blocked))
    if fmt == "gguf" and (path / "config.json").is_file():
        from transformers import AutoConfig

        gguf_llama.check_llama(AutoConfig.from_pretrained(path).text_config)


def execute(args: argparse.Namespace) -> int:
    from qvlm_harness.plan import check_model_source, resolve_model

    package = PACKAGES[args.fmt]
    if package and importlib.util.find_spec(package) is None:
        raise HarnessError(f"--format {args.fmt} needs the {package} package: pip install -c constraints.txt "
                           "'qvlm-harness[export]'")
    if args.gguf_float != "f32" and args.fmt != "gguf":
        raise HarnessError("--gguf-float applies to --format gguf; drop it")
    check_model_source(args.model)
    check_output(args.output)
    _, path = resolve_model(args.model)
    precheck(args.fmt, Path(path))
    from qvlm_harness.export.source import load_source

    source = load_source(path)
    if args.fmt == "gguf":
        from qvlm_harness.export.gguf_llama import export_gguf

        result = export_gguf(source, args.output, float_type=args.gguf_float)
    else:
        from qvlm_harness.export.compressed import export_compressed

        result = export_compressed(source, args.output)
    summary = {"source": str(path), "label": source.label} | result.to_dict()
    (args.output / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    types = ", ".join(f"{n} {k}" for k, n in sorted(result.types.items()))
    print(f"{source.label} -> {args.fmt}: {types}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"written {args.output}/ ({result.path.name})")
    return 0
