"""aespa (Kim et al., NeurIPS 2024, arXiv 2402.08958): layer-wise quantization with attention-wise objectives for
the query, key and value projections. Everything aespa needs and no other method uses lives here:

* `method`: the plugin class `Aespa` (registered as ``qvlm_harness.methods.aespa:Aespa``),
* `objectives`: the objectives with the paper's equations, one layer's quantization and the block-wise pass,
* `attention`: the attention statistics (probabilities, RoPE sums) captured from calibration forwards,
* `adaround`: the rounding solver for those objectives (clipping search, AdaRound on a precomputed objective).

Shared primitives (quantizers, GPTQ's solver, the sequential walk) stay in `qvlm_harness.quant`.
"""

from qvlm_harness.methods.aespa.method import Aespa

__all__ = ["Aespa"]
