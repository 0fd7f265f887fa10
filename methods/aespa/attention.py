"""Second-moment statistics of a self-attention module, captured from calibration forwards, for aespa's
attention-aware objectives (see `qvlm_harness.methods.aespa.objectives` for the objectives themselves).

How the attention probabilities are obtained. transformers attention modules (Llama, CLIP, DINOv2, ...) call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` with the post-RoPE query ``[B, H, T, d]``
and the un-repeated key/value ``[B, KV, T, d]``. `attention_capture` registers an extra implementation, switches
the module's config to it for the duration of the capture, recomputes the softmax probabilities in float32 from
exactly what the model passes (scaling, additive or boolean mask, causal flag when the mask is None), checks that
``A @ V`` reproduces the model's own implementation on the first call (else the objectives would be wrong for this
architecture: `HarnessError`), and returns the model's own output, so the forward is unchanged.

What is accumulated, over real tokens only (the language model's left padding is excluded through the batch's
token mask), for query heads ``h``, key/value heads ``g`` (GQA: ``h`` belongs to ``g = h // (H / KV)``), with
``n`` the number of real tokens:

* ``value[g] = 2/n sum_{h in g} sum_q (A_h X)_q (A_h X)_q^T`` ``[KV, C, C]`` (X: the q/k/v input rows),
* ``key_cov[g] = 2/n sum_j k_j k_j^T`` ``[KV, d, d]`` (post-RoPE keys),
* ``query_cov[g] = 2/n sum_{h in g} sum_p q_{h,p} q_{h,p}^T`` ``[KV, d, d]`` (post-RoPE queries),
* RoPE: when the module receives ``position_embeddings=(cos, sin)`` and the query it passes on equals
  ``q * cos + rotate_half(q) * sin`` of its q_proj output (checked on the first batch), the sums
  ``cc = sum c c^T``, ``cs = sum c s^T``, ``ss = sum s s^T`` over tokens, from which `rope_mean` gives
  ``mean_p R_p^T G R_p`` for any ``G`` (``R_p``: the rotation at position p).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError

CAPTURE_IMPL = "qvlm_aespa_capture"
_ACTIVE: dict[int, AttentionObserver] = {}  # id(attention module) -> observer
_ORIGINAL: dict[int, str | None] = {}  # id(config) -> the implementation name it had


@dataclass
class AttentionGeometry:
    """Head layout of one attention module."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, attn: nn.Module) -> AttentionGeometry:
        q, k = attn.get_submodule("q_proj"), attn.get_submodule("k_proj")
        d = int(getattr(attn, "head_dim", 0) or 0)
        if d <= 0 or q.out_features % d or k.out_features % d:
            raise HarnessError(f"cannot read the head layout of {type(attn).__name__} (head_dim {d}); use "
                               "--method-option aespa.attention=false for layer-wise objectives")
        heads, kv = q.out_features // d, k.out_features // d
        if heads % kv:
            raise HarnessError(f"{type(attn).__name__}: {heads} query heads are not a multiple of {kv} KV heads")
        return cls(heads, kv, d)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_matrix(d: int, device: torch.device | str | None = None) -> Tensor:
    """``P`` with ``rotate_half(x) = P x`` (so the rotation at a position is ``R = diag(c) + diag(s) P``)."""
    half = d // 2
    P = torch.zeros(d, d, dtype=torch.float64, device=device)
    P[:half, half:] = -torch.eye(half, dtype=torch.float64, device=device)
    P[half:, :half] = torch.eye(half, dtype=torch.float64, device=device)
    return P


def rope_mean(G: Tensor, cc: Tensor, cs: Tensor, ss: Tensor, n: int) -> Tensor:
    """``mean_p R_p^T G R_p`` over `n` positions from the summed outer products of their cos/sin vectors.

    With ``R = C + S P`` (``C = diag(c)``, ``S = diag(s)``): ``R^T G R = CGC + CGSP + P^T SGC + P^T SGSP`` and
    ``(CGC)_ij = c_i G_ij c_j`` etc., so the mean needs only ``sum c c^T``, ``sum c s^T``, ``sum s s^T``.
    `G` may carry leading (head) dimensions.
    """
    P = rope_matrix(G.shape[-1], G.device).to(G.dtype)
    cc, cs, ss = (m.to(G.dtype) / n for m in (cc, cs, ss))
    return G * cc + (G * cs) @ P + P.T @ (G * cs.T) + P.T @ (G * ss) @ P


@dataclass
class AttentionObserver:
    """Accumulates the statistics of one attention module (see the module docstring)."""

    geometry: AttentionGeometry
    hidden: int
    value: Tensor = field(init=False)
    key_cov: Tensor = field(init=False)
    query_cov: Tensor = field(init=False)
    cc: Tensor | None = None
    cs: Tensor | None = None
    ss: Tensor | None = None
    n: int = 0
    rope: bool | None = None  # None until the first batch decided it
    checked: bool = False
    # per-batch inputs set by the capture hooks
    x: Tensor | None = None
    q_linear_out: Tensor | None = None
    cos_sin: tuple[Tensor, Tensor] | None = None
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        g = self.geometry
        self.value = torch.zeros(g.kv_heads, self.hidden, self.hidden, dtype=torch.float64)
        self.key_cov = torch.zeros(g.kv_heads, g.head_dim, g.head_dim, dtype=torch.float64)
        self.query_cov = torch.zeros_like(self.key_cov)

    # -- called from the attention implementation ---------------------------------------------------------------
    def probabilities(self, query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float | None,
                      is_causal: bool) -> Tensor:
        g = self.geometry
        q = query.float()
        k = key.float().repeat_interleave(g.rep, dim=1)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = q @ k.transpose(-1, -2) * scale
        tq, tk = scores.shape[-2:]
        if attention_mask is not None:
            m = attention_mask[..., :tk]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        elif is_causal and tq > 1:
            causal = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
            scores = scores.masked_fill(~causal, float("-inf"))
        return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # fully masked (padding) rows -> 0

    def observe(self, query: Tensor, key: Tensor, value: Tensor, probs: Tensor, reference: Tensor) -> None:
        g = self.geometry
        if not self.checked:
            mine = (probs @ value.float().repeat_interleave(g.rep, dim=1)).transpose(1, 2)
            valid = self._valid(mine.shape[0], mine.shape[1], mine.device)
            a, b = mine[valid], reference.float()[valid]
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + float(b.abs().max()))):
                raise HarnessError("aespa: the recomputed attention probabilities do not reproduce this model's "
                                   "attention output (an unsupported attention variant); use --method-option "
                                   "aespa.attention=false for layer-wise objectives")
            self._check_rope(query)
            self.checked = True
        B, _, T, _ = query.shape
        self._follow(query.device)
        valid = self._valid(B, T, query.device)  # [B, T]
        n = int(valid.sum())
        if n == 0:
            return
        x = self.x.float()
        ax = probs @ x.unsqueeze(1)  # [B, H, T, C]
        rows = ax.permute(0, 2, 1, 3)[valid].double()  # [n, H, C]
        rows = rows.reshape(n, g.kv_heads, g.rep, -1)
        self.value += torch.einsum("ngrc,ngrd->gcd", rows, rows)
        q = query.float().transpose(1, 2)[valid].double().reshape(n, g.kv_heads, g.rep, -1)
        k = key.float().transpose(1, 2)[valid].double()  # [n, KV, d]
        self.query_cov += torch.einsum("ngrc,ngrd->gcd", q, q)
        self.key_cov += torch.einsum("ngc,ngd->gcd", k, k)
        if self.rope:
            cos, sin = (t.float().expand(B, T, -1)[valid].double() for t in self.cos_sin)
            self.cc += cos.T @ cos
            self.cs += cos.T @ sin
            self.ss += sin.T @ sin
        self.n += n

    def _valid(self, B: int, T: int, device: torch.device | None = None) -> Tensor:
        if self.mask is not None and tuple(self.mask.shape) == (B, T):
            return self.mask.bool().to(device) if device is not None else self.mask.bool()
        return torch.ones(B, T, dtype=torch.bool, device=device)

    def _follow(self, device: torch.device) -> None:
        """Keep the accumulators where the attention runs (a no-op once they are there, and on the CPU)."""
        if self.value.device != device:
            self.value, self.key_cov, self.query_cov = (t.to(device) for t in (self.value, self.key_cov,
                                                                                 self.query_cov))
            if self.cc is not None:
                self.cc, self.cs, self.ss = (t.to(device) for t in (self.cc, self.cs, self.ss))

    def _check_rope(self, query: Tensor) -> None:
        """Decide whether the module rotates q/k with the rotate-half RoPE (then the Q/K objectives carry the
        rotation), passes the projections through unchanged (no RoPE), or does something else (error)."""
        g = self.geometry
        B, _, T, d = query.shape
        plain = self.q_linear_out.float().reshape(B, T, g.heads, d).transpose(1, 2)
        ref = query.float()
        tol = dict(rtol=1e-3, atol=1e-4 * (1 + float(ref.abs().max())))
        if self.cos_sin is not None:
            cos, sin = (t.float().unsqueeze(1) for t in self.cos_sin)
            if torch.allclose(plain * cos + rotate_half(plain) * sin, ref, **tol):
                self.rope = True
                self.cc = torch.zeros(d, d, dtype=torch.float64, device=query.device)
                self.cs = torch.zeros_like(self.cc)
                self.ss = torch.zeros_like(self.cc)
                return
        if torch.allclose(plain, ref, **tol):
            self.rope = False
            return
        raise HarnessError("aespa: the attention transforms its q_proj output in a way other than rotate-half "
                           "RoPE (e.g. q/k norms); use --method-option aespa.attention=false for layer-wise "
                           "objectives")

    # -- results ------------------------------------------------------------------------------------------------
    def _norm(self, m: Tensor) -> Tensor:
        if self.n == 0:
            raise HarnessError("no calibration tokens reached this attention layer; aespa needs calibration inputs")
        return (2.0 * m / self.n).float()

    def value_hessians(self) -> Tensor:
        """``[KV, C, C]``: the value objective's matrices (the attention-weighted ``E[X^T A^T A X]``, times 2)."""
        return self._norm(self.value)

    def query_row_covariance(self) -> Tensor:
        """``[H, d, d]``: for query head h, ``mean_p R_p^T E[k k^T] R_p`` of its KV head (times 2)."""
        G = self._norm(self.key_cov).double()
        if self.rope:
            G = rope_mean(G, self.cc, self.cs, self.ss, self.n)
        return G.repeat_interleave(self.geometry.rep, dim=0).float()

    def key_row_covariance(self) -> Tensor:
        """``[KV, d, d]``: for KV head g, ``mean_p R_p^T E[sum_{h in g} q_h q_h^T] R_p`` (times 2)."""
        G = self._norm(self.query_cov).double()
        if self.rope:
            G = rope_mean(G, self.cc, self.cs, self.ss, self.n)
        return G.float()


def _delegate(module: nn.Module) -> object:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _ORIGINAL.get(id(module.config), "eager")
    if name and name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise HarnessError(f"aespa: cannot find the eager attention of {type(module).__name__}")
    return fn


def _capture_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       *args, **kwargs):
    out = _delegate(module)(module, query, key, value, attention_mask, *args, **kwargs)
    obs = _ACTIVE.get(id(module))
    if obs is not None:
        is_causal = kwargs.get("is_causal")
        is_causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
        probs = obs.probabilities(query, key, attention_mask, kwargs.get("scaling"), is_causal)
        obs.observe(query, key, value, probs, out[0])
    return out


def _register() -> None:
    from transformers.modeling_utils import AttentionInterface

    if CAPTURE_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(CAPTURE_IMPL, _capture_attention)


@contextmanager
def attention_capture(attn: nn.Module, observer: AttentionObserver) -> Iterator[AttentionObserver]:
    """While active, every call of `attn` feeds `observer` (its q/k/v input, q_proj output, RoPE cos/sin and
    probabilities). The caller sets ``observer.mask`` per batch (token mask or None)."""
    _register()
    config = attn.config
    handles = []

    def pre_attn(_m, args, kwargs):
        pe = kwargs.get("position_embeddings")
        observer.cos_sin = tuple(pe) if isinstance(pe, tuple | list) and len(pe) == 2 else None

    def pre_q(_m, args, kwargs):
        observer.x = (args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))).detach()

    def post_q(_m, args, out):
        observer.q_linear_out = out.detach()

    q = attn.get_submodule("q_proj")
    handles.append(attn.register_forward_pre_hook(pre_attn, with_kwargs=True))
    handles.append(q.register_forward_pre_hook(pre_q, with_kwargs=True))
    handles.append(q.register_forward_hook(post_q))
    original = config._attn_implementation_internal
    _ORIGINAL[id(config)] = original
    _ACTIVE[id(attn)] = observer
    config._attn_implementation_internal = CAPTURE_IMPL
    try:
        yield observer
    finally:
        config._attn_implementation_internal = original
        _ACTIVE.pop(id(attn), None)
        _ORIGINAL.pop(id(config), None)
        for h in handles:
            h.remove()
