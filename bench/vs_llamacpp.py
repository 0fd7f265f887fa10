"""Race llama.cpp on the same weights: the embedded default's language model exported as GGUF (F32, Q8_0, Q4_0)
and decoded by llama.cpp, against the harness's packed kernels (fp32, W8A16/W4A16 on the same g32 grids, and
W8A8/W4A4), on the same text prompts (token ids from the checkpoint's tokenizer), the same thread count, greedy,
in interleaved rounds (every round runs every variant once, in the same order), medians reported.

Both sides run the same loop: one forward over the prompt (prefill, up to the first token's logits), then one
forward per generated token with the KV cache (decode), argmax each time. The harness side is the Llava model
(text-only input) with its quantized layers converted by `convert_to_packed`, so W8A16 runs the int8-storage
dequantize-per-call path, W4A16 the CPU int4pack kernel, W8A8/W4A4 the fused integer kernel; llama.cpp runs its
own CPU kernels (for Q8_0/Q4_0 it quantizes the activations to Q8_0 blocks itself). The GGUF files are exported
from the harness's RTN checkpoints at w8a16g32 / w4a16g32, so both engines hold the same codes (GGUF scales in
float16). Ratios are harness time / llama.cpp time (>1: the harness is slower). `--profile` writes where the
harness's decode step spends its time (torch.profiler op self times) for each variant more than 1.5x slower.

    python bench/vs_llamacpp.py --threads 1 --rounds 5 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

PAIRS = [("F32", "fp32"), ("Q8_0", "w8a16g32"), ("Q8_0", "w8a8"), ("Q4_0", "w4a16g32"), ("Q4_0", "w4a4")]
GGUF_FROM = {"F32": None, "Q8_0": "w8a16g32", "Q4_0": "w4a16g32"}
SLOWER = 1.5


@dataclass
class Runner:
    """One engine holding one model: `prefill(ids)` then `step(token)`, each returning the next greedy token."""

    label: str
    engine: str
    prefill: object
    step: object
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def harness_runner(label: str, model) -> Runner:
    state: dict = {}

    @torch.inference_mode()
    def prefill(ids: list[int]) -> int:
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        state["cache"] = out.cache
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def step(token: int) -> int:
        out = model(input_ids=torch.tensor([[token]]), cache=state["cache"], use_cache=True, logits_to_keep=1)
        state["cache"] = out.cache
        return int(out.logits[0, -1].argmax())

    return Runner(label, "harness", prefill, step)


def llama_runner(label: str, path: Path, threads: int, n_ctx: int) -> Runner:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the last position's logits straight from the context (`scores` needs logits_all)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def prefill(ids: list[int]) -> int:
        llm.reset()
        llm.eval(ids)
        return greedy()

    def step(token: int) -> int:
        llm.eval([token])
        return greedy()

    return Runner(label, "llama.cpp", prefill, step)


def run_once(r: Runner, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    tok = r.prefill(ids)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = r.step(tok)
        out.append(tok)
    return t1 - t0, time.perf_counter() - t1, out


def prompt_ids(tokenizer, n: int, task_name: str) -> list[list[int]]:
    """`n` text prompts (the prompt task's questions without their images) through the model's chat template."""
    from qvlm_harness import plugins

    task = plugins.tasks.get(task_name)()
    out = []
    for s in task.load("test")[:n]:
        request = task.request(s, scoring="generate")
        chat = [{"role": "user", "content": request.prompt}]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def checkpoints(model_path: str, work: Path, bits: list[str], log) -> dict[str, Path]:
    """RTN checkpoints of the language model at each bit width (quantized once, reused from `work`)."""
    from qvlm_harness import plugins
    from qvlm_harness.checkpoint import load_float, save_quantized
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.quantize import quantize

    out = {}
    for b in bits:
        folder = work / f"rtn-{b}"
        if not (folder / "manifest.json").is_file():
            log(f"  quantizing rtn {b} (language model)")
            adapter = load_float(model_path)
            method = plugins.methods.get("rtn")()
            spec = QuantSpec.parse(b)
            qm = quantize(adapter, method, spec, None, scope=("lm",), measure_fp_pass=False)
            save_quantized(qm, folder, describe=method.describe(spec), base_model="default",
                           fingerprint=adapter.fingerprint(), scope=("lm",))
        out[b] = folder
    return out


def export(source: Path | str, out: Path) -> Path:
    from qvlm_harness.cli import main

    if not list(out.glob("*.gguf")):
        code = main(["export", "--model", str(source), "--format", "gguf", "--output", str(out)])
        if code:
            raise SystemExit(f"export of {source} failed")
    return next(out.glob("*.gguf"))


def profile_step(r: Runner, ids: list[int], steps: int) -> dict:
    """Where one harness decode step spends its time: op self times per step by category, and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    from qvlm_harness.bench import CATEGORIES

    tok = r.prefill(ids)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            tok = r.step(tok)
    wall = 1000 * (time.perf_counter() - t0) / steps
    rows = sorted(((e.key, e.count, e.self_cpu_time_total / 1000.0) for e in prof.key_averages()),
                  key=lambda x: -x[2])
    ops = sum(ms for _, _, ms in rows) / steps
    cats = {c: sum(ms for k, _, ms in rows if k.startswith(p)) / steps for c, p in CATEGORIES.items()}
    cats["other ops"] = ops - sum(cats.values())
    cats["Python/framework"] = max(0.0, wall - ops)
    return {"wall_ms_per_step": wall, "categories_ms": cats,
            "top": [(k, round(n / steps), ms / steps) for k, n, ms in rows[:12]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per round (each variant runs all of them)")
    ap.add_argument("--work", type=Path, default=Path("results/bench/vs_llamacpp"),
                    help="checkpoints, GGUF files and the result JSON")
    ap.add_argument("--task", default="sqa", help="task whose questions are the prompts (their text only)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)

    from qvlm_harness.checkpoint import load_adapter
    from qvlm_harness.kernels.convert import convert_to_packed
    from qvlm_harness.models.llava import set_threads
    from qvlm_harness.plan import resolve_model

    threads = set_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _, model_path = resolve_model("default")
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = load_avg()
    log(f"vs llama.cpp: {threads} thread(s), {args.rounds} rounds, {args.new_tokens} new tokens, load {load_before}")
    ckpts = checkpoints(model_path, args.work, ["w8a16g32", "w4a16g32", "w8a8", "w4a4"], log)
    ggufs = {k: export(model_path if b is None else ckpts[b], args.work / f"gguf-{k}") for k, b in GGUF_FROM.items()}
    base = load_adapter(model_path)
    prompts = prompt_ids(base.tokenizer, args.prompts, args.task)
    n_ctx = max(len(p) for p in prompts) + args.new_tokens + 8
    runners: list[Runner] = []
    for kind, path in ggufs.items():
        runners.append(llama_runner(kind, path, threads, n_ctx))
    for bits in dict.fromkeys(b for _, b in PAIRS):
        adapter = base if bits == "fp32" else load_adapter(str(ckpts[bits]))
        if bits != "fp32":
            log(f"  packing {bits}: {convert_to_packed(adapter.model).summary()}")
        adapter.model.eval()
        runners.append(harness_runner(bits, adapter.model))
    for r in runners:  # warm-up: first-call allocations, kernel loads
        run_once(r, prompts[0], 2)
    for i in range(args.rounds):
        for r in runners:
            p_s, d_s, toks = 0.0, 0.0, []
            for ids in prompts:
                p, d, t = run_once(r, ids, args.new_tokens)
                p_s, d_s = p_s + p, d_s + d
                toks.append(t)
            r.prefill_s.append(p_s / len(prompts))
            r.decode_s.append(d_s / len(prompts))
            r.tokens = toks
        log(f"  round {i + 1}/{args.rounds} done (load {load_avg()})")
    load_after = load_avg()
    by = {(r.engine, r.label): r for r in runners}
    rows = []
    for kind, bits in PAIRS:
        lc, hs = by[("llama.cpp", kind)], by[("harness", bits)]
        lc_p, hs_p = statistics.median(lc.prefill_s), statistics.median(hs.prefill_s)
        lc_d, hs_d = statistics.median(lc.decode_s), statistics.median(hs.decode_s)
        steps = args.new_tokens - 1
        same = sum(a == b for x, y in zip(lc.tokens, hs.tokens, strict=True) for a, b in zip(x, y, strict=True))
        rows.append({"gguf": kind, "harness": bits, "llama_prefill_ms": 1000 * lc_p, "harness_prefill_ms": 1000 * hs_p,
                     "prefill_x": hs_p / lc_p, "llama_tok_s": steps / lc_d, "harness_tok_s": steps / hs_d,
                     "decode_x": hs_d / lc_d, "same_tokens": f"{same}/{len(prompts) * args.new_tokens}"})
    profiles = {}
    if args.profile:
        for row in rows:
            if row["decode_x"] > SLOWER and row["harness"] not in profiles:
                log(f"  profiling harness {row['harness']}")
                profiles[row["harness"]] = profile_step(by[("harness", row["harness"])], prompts[0], 16)
    prompt_tokens = [len(p) for p in prompts]
    env = {"threads": threads, "rounds": args.rounds, "new_tokens": args.new_tokens, "prompt_tokens": prompt_tokens,
           "torch": torch.__version__, "llama_cpp": __import__("llama_cpp").__version__,
           "load_before": load_before, "load_after": load_after, "cpu": cpu_name()}
    result = {"env": env, "rows": rows, "profiles": profiles}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.work / f"vs_llamacpp-{stamp}.json").write_text(json.dumps(result, indent=1))
    print(render(result))
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def render(result: dict) -> str:
    import pandas as pd

    env = result["env"]
    head = (f"{env['threads']} thread(s), {env['cpu']}; prompts of {env['prompt_tokens']} tokens, {env['new_tokens']} "
            f"greedy tokens; medians of {env['rounds']} interleaved rounds; torch {env['torch']}, llama-cpp-python "
            f"{env['llama_cpp']}; load average {env['load_before']} before, {env['load_after']} after")
    df = pd.DataFrame(result["rows"]).rename(columns={
        "gguf": "llama.cpp", "harness": "harness", "llama_prefill_ms": "llama.cpp prefill ms",
        "harness_prefill_ms": "harness prefill ms", "prefill_x": "prefill x", "llama_tok_s": "llama.cpp tok/s",
        "harness_tok_s": "harness tok/s", "decode_x": "decode x", "same_tokens": "same greedy tokens"})
    out = [head, "", df.to_markdown(index=False, floatfmt=".2f"), "",
           "x = harness time / llama.cpp time (>1: the harness is slower)."]
    for bits, prof in result["profiles"].items():
        cats = ", ".join(f"{k} {v:.2f} ms" for k, v in prof["categories_ms"].items())
        out += ["", f"harness {bits}: {prof['wall_ms_per_step']:.2f} ms per decode step under the profiler: {cats}"]
        out += [f"  {name[:50]:<50} {calls:>5} {ms:8.3f} ms" for name, calls, ms in prof["top"]]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
