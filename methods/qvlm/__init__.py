"""Q-VLM (Wang et al., NeurIPS 2024): entropy-guided block partition, block-wise rounding search and
visual-encoder optimisation. The method plugin is `QVLM`; the pieces are reusable (the dependency analysis
command uses the same units, entropies and searches)."""

from qvlm_harness.methods.qvlm.method import QVLM
from qvlm_harness.methods.qvlm.options import QVLMOptions

__all__ = ["QVLM", "QVLMOptions"]
