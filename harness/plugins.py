"""The built-in plugin registries. Entries are lazy ("module:attr"), so listing them imports nothing heavy.

Third-party packages add their own through entry points:

    [project.entry-points."qvlm_harness.methods"]
    mymethod = "mypkg.quant:MyMethod"
"""

from __future__ import annotations

from harness.registry import Registry

methods: Registry = Registry("method", "qvlm_harness.methods")
tasks: Registry = Registry("task", "qvlm_harness.tasks")
models: Registry = Registry("model", "qvlm_harness.models")

# -- methods -------------------------------------------------------------------------------------------------------
methods.register("fp32", "methods.fp:FP32", "unquantized baseline in float32")
methods.register("fp16", "methods.fp:FP16", "unquantized baseline stored and computed in float16")
methods.register("bf16", "methods.fp:BF16", "unquantized baseline stored and computed in bfloat16")
methods.register("rtn", "methods.rtn:RTN", "round-to-nearest weights + uniform activations (the floor)")
methods.register("awq", "methods.awq:AWQ", "activation-aware weight scaling + clipping (llm-awq), 4-bit g128 asym")
methods.register("qlora", "methods.qlora:QLoRA", "QLoRA's NF4 weights, block 64, double quantization (bitsandbytes)")
methods.register("gptq", "methods.gptq:GPTQ", "GPTQ second-order weight quantization (Hessian error feedback)")
methods.register("zeroquant-v2", "methods.zeroquant_v2:ZeroQuantV2",
                 "ZeroQuant-V2: group-wise GPTQ weights, per-token activations, LoRC low-rank compensation",
                 aliases=("zeroquant", "zqv2"))
methods.register("aespa", "methods.aespa:Aespa", "aespa: layer-wise quantization, attention-wise objectives for q/k/v")
methods.register("smoothquant", "methods.smoothquant:SmoothQuant",
                 "SmoothQuant: migrate activation outliers into weights (alpha 0.5), folded into norms")
methods.register("qvlm", "methods.qvlm:QVLM", "Q-VLM (paper): entropy-guided blocks, block-wise rounding search")
methods.register("qvlm-official", "methods.qvlm_official:QVLMOfficial",
                 "Q-VLM as released: NF4 weights, gated per-channel A4 ranges (vision in FP)")

# -- tasks ---------------------------------------------------------------------------------------------------------
tasks.register("sqa", "tasks.sqa:ScienceQA", "ScienceQA multiple choice with category breakdown",
               aliases=("scienceqa",))
tasks.register("vqav2", "tasks.vqav2:VQAv2", "VQAv2 open-ended, official VQA accuracy", aliases=("vqa",))
tasks.register("vizwiz", "tasks.vizwiz:VizWiz", "VizWiz VQA with unanswerable questions")
tasks.register("hm", "tasks.hateful_memes:HatefulMemes", "Hateful Memes few-shot, ROC AUC",
               aliases=("hateful_memes", "hatefulmemes"))
tasks.register_prefix("lmeval", "tasks.lmeval:LMEvalTask", "any lm-evaluation-harness task (extra: lmeval)")

# -- models --------------------------------------------------------------------------------------------------------
models.register("default", "harness.models.default:default_model_path",
                "embedded real-weights Llava: DINOv2-S/14 + SmolLM2-135M-Instruct + trained projector/LoRA")
models.register("tiny", "harness.models.tiny:tiny_model_path",
                "tiny random-weight Llava (LLaVA-1.5 chat template) for tests and smoke runs")
