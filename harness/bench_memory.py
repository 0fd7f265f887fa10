"""`harness bench`'s deployment memory: each variant loaded from its saved checkpoint in a fresh process.

The in-process figure (`qvlm_harness.bench.peak_rss`) quantizes from the FP32 checkpoint in its child, so the
float model passes through that process. A user deploying on a small device loads the quantized checkpoint
instead: here each quantized variant is saved (`save_quantized`, before packing) into a temporary folder, and a
child process loads it as `harness eval --model CKPT --execution packed` does (straight into packed modules,
`load_quantized(packed=True)`), generates once and reports its lifetime peak RSS (``VmHWM``, loading
included; not ``ru_maxrss``, which Linux carries over from the parent across fork and exec) and the resident
weight bytes (the distinct tensor storages the loaded model holds, `qvlm_harness.measure.resident_bytes`).
Float baselines load their float folder in their own dtype.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = "from qvlm_harness.bench_memory import checkpoint_child_main; checkpoint_child_main()"


def float_source(model_path: str, dtype: str) -> dict[str, Any]:
    """What the child loads for a float baseline: the model folder, in the baseline's dtype."""
    return {"kind": "float", "path": model_path, "dtype": dtype}


def checkpoint_source(folder: Path, execution: str, backend: str) -> dict[str, Any]:
    """What the child loads for a quantized variant: its checkpoint, packed as `--execution packed` loads it."""
    return {"kind": "quantized", "path": str(folder), "packed": execution == "packed", "backend": backend}


def save_variant(qm, method, spec, folder: Path, model_id: str, fingerprint: str, scope) -> Path:
    """Write the (still fake-quant) quantized model `qm` as a checkpoint folder the child can load."""
    from qvlm_harness.checkpoint import save_quantized

    return save_quantized(qm, folder, describe=method.describe(spec), base_model=model_id, fingerprint=fingerprint,
                          scope=scope)


def checkpoint_rss(source: dict[str, Any], cfg_json: dict, batch_size: int, timeout_s: float = 1800) -> dict:
    """{"ckpt_rss_mb", "resident_bytes", ...} of `source` loaded and generating once in a fresh process, or
    {"error": ...}."""
    job = {"source": source, "cfg": cfg_json, "batch_size": batch_size}
    try:
        out = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(job), capture_output=True, text=True,
                             timeout=timeout_s, cwd=str(Path(__file__).resolve().parent.parent))
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    for line in out.stdout.splitlines():
        if line.startswith("CKPT_RSS "):
            return json.loads(line.split(" ", 1)[1])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {out.returncode}: {tail[:300]}"}


def load_source(source: dict[str, Any]):
    """The adapter the child measures (also what a deployment would load)."""
    from qvlm_harness.checkpoint import load_float, load_quantized

    if source["kind"] == "float":
        return load_float(source["path"], dtype=source["dtype"])
    return load_quantized(source["path"], packed=source["packed"], backend=source["backend"])[0]


def decode_weight_bytes(model) -> int:
    """Weight bytes one decode step reads: the language model's layers and final norm, and the LM head, each
    storage once; of the token embedding only the new token's row (a table the head does not also read is not
    streamed: a decode step gathers one row of it). The vision tower and projector run in prefill only."""
    from qvlm_harness.models.structure import STACK_ROOTS

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_storages = {t.untyped_storage().data_ptr() for t in list(head.parameters()) + list(head.buffers())}
    seen: dict[int, int] = {}
    lm = model.get_submodule(STACK_ROOTS["lm"])
    emb_tensors = {id(t) for t in list(emb.parameters()) + list(emb.buffers())}
    for t in list(lm.parameters()) + list(lm.buffers()) + list(head.parameters()) + list(head.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if id(t) in emb_tensors and ptr not in head_storages:
            continue
        seen[ptr] = t.untyped_storage().nbytes()
    row = sum(t.numel() * t.element_size() for t in list(emb.parameters()) + list(emb.buffers())) \
        // max(1, emb.num_embeddings)
    return sum(seen.values()) + row


def peak_rss_of_this_process_mb() -> float:
    """This process's lifetime peak RSS in MiB: ``VmHWM`` (the high-water mark of its own address space).

    Not ``getrusage().ru_maxrss``: Linux keeps that across fork and exec, so a child started by a parent holding
    3.5 GB of benchmark variants reports the parent's 3.5 GB whatever it loads itself. ru_maxrss is the fallback
    where /proc is missing."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def checkpoint_child_main() -> None:
    """Entry point of the child: load, generate once, print ``CKPT_RSS {json}``."""
    from qvlm_harness.bench import BenchConfig, _Clock, generate_once, prompts
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.measure import current_rss_mb, resident_bytes
    from qvlm_harness.models.llava import set_threads

    job = json.loads(sys.stdin.read())
    raw = job["cfg"]
    cfg = BenchConfig(**(raw | {"bits": [QuantSpec.parse(b) for b in raw["bits"]], "scope": tuple(raw["scope"])}))
    set_threads(cfg.threads)
    adapter = load_source(job["source"])
    loaded_mb = current_rss_mb()
    resident = resident_bytes(adapter.model)
    decode = decode_weight_bytes(adapter.model)
    batch = adapter.encode(prompts(cfg, job["batch_size"]))
    generate_once(adapter, batch, cfg.new_tokens, _Clock())
    peak_mb = peak_rss_of_this_process_mb()
    print("CKPT_RSS " + json.dumps({"ckpt_rss_mb": peak_mb, "rss_after_load_mb": loaded_mb,
                                    "resident_bytes": resident, "decode_bytes": decode}))
