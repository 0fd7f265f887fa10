"""AWQ scale/clip search, SmoothQuant folding and LoRC against brute-force or closed-form references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvlm_harness.methods.awq import awq_scales, search_clip, search_scale, search_scale_linear
from qvlm_harness.methods.smoothquant import smooth_scales
from qvlm_harness.models.architectures import describe_unit
from qvlm_harness.models.transforms import fold_scales
from qvlm_harness.quant.lorc import LoRCLinear, lorc_factors
from qvlm_harness.quant.quantizer import fake_quantize_per_token, fake_quantize_weight


def scale_groups(block: nn.Module):
    """The seam's scale groups of a standalone layer (names relative to it)."""
    return describe_unit(block, "", "lm", 0).scale_groups


def llama_layer() -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return LlamaDecoderLayer(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_key_value_heads=4), 0)


class ToyBlock(nn.Module):
    """norm -> (q, k, v) like a decoder layer's attention input, with an 'mlp' of one linear."""

    def __init__(self, d=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.input_layernorm = nn.LayerNorm(d)
        with torch.no_grad():
            self.input_layernorm.weight.uniform_(0.5, 1.5)
            self.input_layernorm.bias.normal_(0, 0.1)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj"):
            setattr(self.self_attn, n, nn.Linear(d, d))

    def forward(self, x):
        h = self.input_layernorm(x)
        a = self.self_attn
        return a.q_proj(h) + a.k_proj(h) * 0.5 + a.v_proj(h)


def outlier_inputs(n=256, d=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 25.0  # outlier channels
    return x


def test_awq_search_picks_the_brute_force_alpha_and_beats_rtn():
    blk = ToyBlock()
    x = blk.input_layernorm(outlier_inputs()).detach()
    lins = [blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj]
    quant = lambda w: fake_quantize_weight(w, 3, False, 32)
    run = lambda: torch.cat([m(x) for m in lins], dim=1)
    x_mean = x.abs().mean(0)
    best, s, losses = search_scale(lins, x_mean, run, quant)
    # brute force: recompute every alpha's loss independently
    with torch.no_grad():
        org = run()
        brute = []
        for i in range(20):
            sc = x_mean.pow(i / 20).clamp(min=1e-4)
            sc = sc / (sc.max() * sc.min()).sqrt()
            out = torch.cat([nn.functional.linear(x, quant(m.weight * sc) / sc, m.bias) for m in lins], dim=1)
            brute.append(float((org - out).pow(2).mean()))
    assert abs(best - min(range(20), key=lambda i: brute[i]) / 20) < 1e-9
    assert torch.allclose(torch.tensor(losses), torch.tensor(brute), rtol=1e-4)
    assert min(losses) < losses[0]  # alpha 0 == plain RTN: AWQ lowers the error
    assert torch.allclose(s, awq_scales(x_mean, best))
    assert torch.equal(lins[0].weight, ToyBlock().self_attn.q_proj.weight)  # weights restored after the search
    # folding the scales keeps the float block output
    inp = outlier_inputs(seed=3)
    ref = blk(inp)
    fold_scales(blk.input_layernorm, lins, s)
    assert torch.allclose(blk(inp), ref, atol=1e-4)


def test_awq_gram_loss_of_a_lone_linear_equals_running_it():
    """The Gram-matrix shortcut (o after v, down after up) gives the same loss per alpha, hence the same alpha and
    scales, as running the linear on every calibration row; the weights are left as they were."""
    blk = ToyBlock()
    x = blk.input_layernorm(outlier_inputs()).detach()
    lin = blk.self_attn.q_proj
    before = lin.weight.detach().clone()
    quant = lambda w: fake_quantize_weight(w, 3, False, 32)
    x_mean = x.abs().mean(0)
    best, s, losses = search_scale([lin], x_mean, lambda: lin(x), quant)
    best_g, s_g, losses_g = search_scale_linear(lin, x_mean, x.T @ x, x.shape[0], quant)
    assert best_g == best and torch.equal(s_g, s)
    assert torch.allclose(torch.tensor(losses_g), torch.tensor(losses), rtol=1e-3)
    assert torch.equal(lin.weight, before)


def test_clip_search_matches_brute_force_per_group():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[:, 3] = 8.0  # an outlier weight per row that clipping should tame
    x = torch.randn(300, 64, generator=g)
    best = search_clip(w, x, 3, False, 32, n_tokens=300)
    xs = x[:: max(1, x.shape[0] // 300)]
    for o in range(6):
        for grp in range(2):
            sl = slice(32 * grp, 32 * grp + 32)
            wv, xv = w[o, sl], xs[:, sl]
            org = xv @ wv
            m0 = wv.abs().max()
            errs = []
            for i in range(10):
                mx = m0 * (1 - i / 20)
                q = fake_quantize_weight(wv.clamp(-mx, mx)[None], 3, False)[0]
                errs.append(float((xv @ q - org).pow(2).mean()))
            i_best = min(range(10), key=lambda i: errs[i])
            assert torch.isclose(best[o, grp], m0 * (1 - i_best / 20))


def test_smoothquant_folding_is_exact_in_float_and_lowers_w8a8_error():
    blk = ToyBlock()
    x = outlier_inputs(seed=4)
    h = blk.input_layernorm(x).detach()
    lins = [blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj]
    # the seam's first scale group of a pre-norm decoder layer: the attention norm feeding q/k/v (ToyBlock's layout)
    groups = scale_groups(llama_layer())
    assert groups[0].producer == "input_layernorm" and groups[0].consumers == tuple(f"self_attn.{n}" for n in
                                                                                   ("q_proj", "k_proj", "v_proj"))

    def w8a8_error() -> float:
        hh = blk.input_layernorm(x).detach()
        fq = fake_quantize_per_token(hh, 8, False)
        outs = [nn.functional.linear(fq, fake_quantize_weight(m.weight, 8, True), m.bias) for m in lins]
        return float(sum((o - m(hh)).pow(2).mean() for o, m in zip(outs, lins, strict=True)))

    ref = blk(x)
    before = w8a8_error()
    s = smooth_scales(h.abs().amax(0), [m.weight for m in lins], 0.5)
    fold_scales(blk.input_layernorm, lins, s)
    assert torch.allclose(blk(x), ref, atol=1e-4)  # float output unchanged
    assert w8a8_error() < 0.5 * before


@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (40, 40)])
def test_lorc_factors_equal_the_truncated_svd(shape):
    """Both orientations of the Gram-matrix path against a full float64 SVD (the Eckart-Young optimum)."""
    g = torch.Generator().manual_seed(3)
    E = torch.randn(*shape, generator=g)
    u, s, vh = torch.linalg.svd(E.double(), full_matrices=False)
    for rank in (1, 8):
        U, V = lorc_factors(E, rank)
        assert U.shape == (shape[0], rank) and V.shape == (rank, shape[1])
        ref = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert float((U.double() @ V.double() - ref).norm() / ref.norm()) < 1e-5


def test_lorc_reduces_the_error_by_the_truncated_svd_amount():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 96, generator=g)
    Wq = fake_quantize_weight(W, 3, True)
    E = W - Wq
    S = torch.linalg.svdvals(E.double())
    for rank in (1, 8, 20):
        U, V = lorc_factors(E, rank)
        resid = (E - U @ V).norm()
        assert torch.isclose(resid.double(), S[rank:].pow(2).sum().sqrt(), rtol=1e-4)
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.quant.qlinear import QLinear

    lin = nn.Linear(96, 48)
    with torch.no_grad():
        lin.weight.copy_(W)
    q = QLinear.from_linear(lin, QuantSpec.parse("w3a16"))
    U, V = lorc_factors(W - q.weight, 8)
    exact = LoRCLinear(q, U, V, bits=16)
    int8 = LoRCLinear(q, U, V, bits=8)
    x = torch.randn(5, 96)
    want = (W - q.weight - U @ V).norm()
    assert torch.isclose((W - q.weight - exact.lowrank_weight()).norm(), want, rtol=1e-4)
    assert (W - q.weight - int8.lowrank_weight()).norm() < 1.02 * want  # 8-bit factors cost < 2%
    assert torch.allclose(exact(x), x @ (q.weight + U @ V).T + lin.bias, atol=1e-4)
