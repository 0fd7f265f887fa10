"""The built-in plugin registries. Entries are lazy ("module:attr"), so listing them imports nothing heavy.

Third-party packages add their own through entry points:

    [project.entry-points."qvlm_harness.methods"]
    mymethod = "mypkg.quant:MyMethod"
"""

from __future__ import annotations

from qvlm_harness.registry import Registry

_M, _T = "qvlm_harness.methods.", "qvlm_harness.tasks."  # lazy targets: module paths under the install root

methods: Registry = Registry("method", "qvlm_harness.methods")
tasks: Registry = Registry("task", "qvlm_harness.tasks")
models: Registry = Registry("model", "qvlm_harness.models")

# -- methods -------------------------------------------------------------------------------------------------------
methods.register("fp32", _M + "fp:FP32", "unquantized baseline in float32")
methods.register("fp16", _M + "fp:FP16", "unquantized baseline stored and computed in float16")
methods.register("bf16", _M + "fp:BF16", "unquantized baseline stored and computed in bfloat16")
methods.register("rtn", _M + "rtn:RTN", "round-to-nearest weights + uniform activations (the floor)")
methods.register("awq", _M + "awq:AWQ", "activation-aware weight scaling + clipping (llm-awq), 4-bit g128 asym")
methods.register("qlora", _M + "qlora:QLoRA", "QLoRA's NF4 weights, block 64, double quantization (bitsandbytes)")
methods.register("gptq", _M + "gptq:GPTQ", "GPTQ second-order weight quantization (Hessian error feedback)")
methods.register("zeroquant-v2", _M + "zeroquant_v2:ZeroQuantV2",
                 "ZeroQuant-V2: group-wise GPTQ weights, per-token activations, LoRC low-rank compensation",
                 aliases=("zeroquant", "zqv2"))
methods.register("aespa", _M + "aespa:Aespa", "aespa: layer-wise quantization, attention-wise objectives for q/k/v")
methods.register("smoothquant", _M + "smoothquant:SmoothQuant",
                 "SmoothQuant: migrate activation outliers into weights (alpha 0.5), folded into norms")
methods.register("qvlm", _M + "qvlm:QVLM", "Q-VLM (paper): entropy-guided blocks, block-wise rounding search")
methods.register("qvlm-official", _M + "qvlm_official:QVLMOfficial",
                 "Q-VLM as released: NF4 weights, gated per-channel A4 ranges (vision in FP)")

# -- tasks ---------------------------------------------------------------------------------------------------------
tasks.register("sqa", _T + "sqa:ScienceQA", "ScienceQA multiple choice with category breakdown",
               aliases=("scienceqa",))
tasks.register("vqav2", _T + "vqav2:VQAv2", "VQAv2 open-ended, official VQA accuracy", aliases=("vqa",))
tasks.register("vizwiz", _T + "vizwiz:VizWiz", "VizWiz VQA with unanswerable questions")
tasks.register("hm", _T + "hateful_memes:HatefulMemes", "Hateful Memes few-shot, ROC AUC",
               aliases=("hateful_memes", "hatefulmemes"))
tasks.register_prefix("lmeval", _T + "lmeval:LMEvalTask", "any lm-evaluation-harness task (extra: lmeval)")

# -- models --------------------------------------------------------------------------------------------------------
models.register("default", "qvlm_harness.models.default:default_model_path",
                "embedded real-weights Llava: DINOv2-S/14 + SmolLM2-135M-Instruct + trained projector/LoRA")
models.register("tiny", "qvlm_harness.models.tiny:tiny_model_path",
                "tiny random-weight Llava (LLaVA-1.5 chat template) for tests and smoke runs")
models.register("tiny-gemma", "qvlm_harness.models.tiny:tiny_gemma_model_path",
                "tiny random-weight Llava: DINOv2 tower + Gemma3 LM (offset RMSNorm, sandwich norms, "
                "sliding/full attention), Gemma-style template")

# -- built-in names the commands fall back on (the only place the engine names a method or task) --------------------
FLOAT_BASELINES = ("fp32", "bf16", "fp16")  # the unquantized methods, widest first: ratios and recovery use the first
DEFAULT_CALIB_TASK = "sqa"  # `harness quantize`, `harness ablate` and `analyze` calibrate on it unless told
DEFAULT_PROMPT_TASK = "vqav2"  # `harness bench` prompts with its test images
EXAMPLE_TASKS = "sqa,vqav2"  # for help texts
EXAMPLE_METHODS = "fp32,rtn"
EXAMPLE_PAIR = "awq,rtn"  # `harness compare --methods A,B`
BENCH_METHODS = ("fp32", "bf16", "rtn")  # `harness bench` measures these unless told
FEW_SHOT_TASKS = "hm"  # named in the --shots help
