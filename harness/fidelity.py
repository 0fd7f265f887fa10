"""How far a quantized model is from its FP model, next to its accuracy.

At chance-level accuracy a table cannot tell a method that lost the task from one that destroyed the language
model (a SmoothQuant W8A8 on a model whose norms it mishandled had a text perplexity of 526,262 against 64.4 for
FP and looked like an ordinary row). So every quantized cell records, on prompts it was not calibrated on (the
first evaluation prompts of its job's task, each alone so padding plays no part), the mean KL divergence
KL(FP || quantized) of the next-token distributions over the last `POSITIONS` prompt positions and how often the
two models agree on the most likely next token.

The FP distributions are taken from the model *before* the method runs, in the same process (kept as float16
log-probabilities of those positions only: a few MB), so no second copy of the model is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qvlm_harness.task import Request

PROBES = 8  # prompts
POSITIONS = 16  # last prompt positions per prompt (the answer's first token is predicted at the last one)


@dataclass
class Reference:
    """FP next-token log-probabilities at the probe positions (float16), one tensor [positions, vocab] per prompt,
    and the FP top-1 tokens (taken before the float16 rounding, which could break near-ties)."""

    logprobs: list[torch.Tensor]
    top1: list[torch.Tensor]
    sample_ids: list[str]


@torch.inference_mode()
def _logprobs(adapter, request: Request) -> torch.Tensor:
    batch = adapter.encode([request])
    logits = adapter.model(**batch).logits[0, -POSITIONS:].float()
    return torch.log_softmax(logits, dim=-1)


def probe_requests(requests: Sequence[Request]) -> list[Request]:
    """The fidelity probes: the first `PROBES` requests, as plain prompts (no options, no generation)."""
    out = []
    for r in list(requests)[:PROBES]:
        out.append(Request(r.sample_id, r.prompt, r.image))
    return out


def reference(adapter, probes: Sequence[Request]) -> Reference:
    logprobs, top1 = [], []
    for r in probes:
        lp = _logprobs(adapter, r).cpu()
        logprobs.append(lp.to(torch.float16))
        top1.append(lp.argmax(-1))
    return Reference(logprobs, top1, [r.sample_id for r in probes])


def compare(adapter, probes: Sequence[Request], ref: Reference) -> dict[str, float | int]:
    """Mean KL(FP || model) in nats per position and top-1 agreement (percent) over the probe positions."""
    kls, agree, n = [], 0, 0
    for r, fp, top in zip(probes, ref.logprobs, ref.top1, strict=True):
        q = _logprobs(adapter, r).cpu()
        p = fp.float()
        m = min(len(p), len(q))
        p, q = p[-m:], q[-m:]
        kl = (p.exp() * (p - q)).sum(dim=-1).clamp(min=0.0)
        kls.append(kl)
        agree += int((top[-m:] == q.argmax(-1)).sum())
        n += m
    all_kl = torch.cat(kls) if kls else torch.zeros(0)
    return {"kl_mean": float(all_kl.mean()) if n else float("nan"),
            "kl_max": float(all_kl.max()) if n else float("nan"),
            "top1_agree": 100.0 * agree / n if n else float("nan"), "positions": n, "prompts": len(probes)}
