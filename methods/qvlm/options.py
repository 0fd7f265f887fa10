"""Q-VLM options: one dataclass, validated once, so a typo in `--method-option qvlm.X=...` fails before any work.

The defaults are sized for the embedded default model on 2 CPU cores (a few minutes per bit-width with 64
calibration samples); the paper-scale settings are reached through the same options (e.g. ``iters=2000``,
``ve_steps=200``), see docs/qvlm.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from qvlm_harness.errors import HarnessError

ENTROPY_KINDS = ("hist", "official")
VE_PARAMS = ("norms+projector", "norms", "projector")
VE_ANCHORS = ("quantized", "fp")


@dataclass(frozen=True)
class QVLMOptions:
    # -- partition ---------------------------------------------------------------------------------------------
    p: float = 0.5  # unit l+1 joins l's block while H_l >= the p-quantile of the stack's entropies ...
    max_depth: int = 3  # ... and the block has fewer than max_depth units
    entropy: str = "hist"  # "hist": Shannon entropy of the input histogram; "official": token-normalised proxy
    bins: int = 256  # histogram bins of the entropy estimator
    # -- block-wise rounding search ------------------------------------------------------------------------------
    iters: int = 8  # optimisation steps per unit of a block (a block of d units runs iters * d steps)
    batch_size: int = 2  # calibration sequences per step (and per propagation batch)
    lr_round: float = 2e-2  # Adam step on the AdaRound offsets V
    lr_act: float = 5e-3  # Adam step on log(step size) of static activation quantizers (LSQ)
    round_weight: float = 0.01  # lambda of the AdaRound rounding regulariser (mean over rounding variables)
    warmup: float = 0.2  # fraction of steps without the rounding regulariser
    beta_start: float = 20.0  # annealing of the regulariser's exponent (AdaRound: 20 -> 2)
    beta_end: float = 2.0
    kl_weight: float = 1.0  # auto-regressive guidance on the LM's final block (KL on answer tokens)
    weight_mse: bool = True  # initialise weight scales by MSE range search (else min/max)
    act_tokens: int = 1024  # tokens per layer for the MSE initialisation of static activation step sizes
    eval_batches: int = 2  # calibration batches on which per-block loss before/after is measured
    fp_cache_mb: float = 1024.0  # keep the FP stream of the entropy pass in memory (saves one FP pass) below this
    # -- visual-encoder optimisation ----------------------------------------------------------------------------
    eta: float = 0.0  # weight of the LM-activation entropy term; 0 leaves the visual encoder unchanged
    ve_steps: int = 8  # optimisation steps of the visual encoder (only when eta > 0 or ve_anchor == "fp")
    ve_lr: float = 1e-3
    ve_batch: int = 1  # sequences per visual-encoder step (each step runs the whole model forward + backward)
    ve_params: str = "norms+projector"
    ve_anchor: str = "quantized"  # KL reference: the (provisionally) quantized model with the untouched encoder
    ve_bins: int = 64  # bins of the differentiable (soft) histogram entropy

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise HarnessError(f"qvlm option {msg}")

        need(0.0 <= self.p <= 1.0, f"p must be in [0, 1], got {self.p}; e.g. --method-option qvlm.p=0.5")
        need(self.max_depth >= 1, f"max_depth must be >= 1, got {self.max_depth}")
        need(self.entropy in ENTROPY_KINDS, f"entropy must be one of {', '.join(ENTROPY_KINDS)}, got {self.entropy!r}")
        need(self.bins >= 2, f"bins must be >= 2, got {self.bins}")
        need(self.iters >= 0, f"iters must be >= 0, got {self.iters}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr_round", "lr_act", "ve_lr"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("round_weight", "kl_weight", "eta", "fp_cache_mb"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(0.0 <= self.warmup < 1.0, f"warmup must be in [0, 1), got {self.warmup}")
        need(self.beta_start >= self.beta_end > 0, "beta_start >= beta_end > 0 required")
        need(self.act_tokens >= 16, f"act_tokens must be >= 16, got {self.act_tokens}")
        need(self.eval_batches >= 1, f"eval_batches must be >= 1, got {self.eval_batches}")
        need(self.ve_steps >= 0, f"ve_steps must be >= 0, got {self.ve_steps}")
        need(self.ve_batch >= 1, f"ve_batch must be >= 1, got {self.ve_batch}")
        need(self.ve_params in VE_PARAMS, f"ve_params must be one of {', '.join(VE_PARAMS)}, got {self.ve_params!r}")
        need(self.ve_anchor in VE_ANCHORS, f"ve_anchor must be one of {', '.join(VE_ANCHORS)}, got {self.ve_anchor!r}")
        need(self.ve_bins >= 4, f"ve_bins must be >= 4, got {self.ve_bins}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> QVLMOptions:
        """Build from `--method-option qvlm.X=V` values (JSON-parsed), coercing numbers and rejecting unknowns."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise HarnessError(f"unknown qvlm option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        defaults = cls()
        for key, raw in options.items():
            default = getattr(defaults, key)
            try:
                if isinstance(default, bool):
                    if isinstance(raw, str):
                        if raw.lower() not in ("true", "false", "1", "0"):
                            raise ValueError(raw)
                        raw = raw.lower() in ("true", "1")
                    values[key] = bool(raw)
                elif isinstance(default, int):
                    if isinstance(raw, float) and not raw.is_integer():
                        raise ValueError(raw)
                    values[key] = int(raw)
                elif isinstance(default, float):
                    values[key] = float(raw)
                else:
                    values[key] = str(raw)
            except (TypeError, ValueError):
                raise HarnessError(f"qvlm option {key} expects a {type(default).__name__}, got {raw!r}") from None
        return cls(**values)

    @property
    def visual_optimisation(self) -> bool:
        """Whether the visual-encoder stage runs: with eta = 0 and the quantized-model anchor the untouched
        encoder is the exact optimum (zero gradient), so the stage is skipped rather than run for nothing."""
        return self.ve_steps > 0 and (self.eta > 0 or self.ve_anchor == "fp")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
