"""GGUF export of the tiny model's language model: read back with the gguf package's own reader and dequantizer,
the weights are the harness's (codes times the float16-rounded scales, exactly); grids GGUF cannot hold are
refused in one line before any file is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.export_common import harness_weights, make_checkpoint
from tests.test_cli import one_line_error, run_cli

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'qvlm-harness[export]')")

LM = "model.language_model"
SHORT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")

    def get(bits: str, method: str = "rtn", **options):
        return make_checkpoint(tiny_model_dir, root / f"{method}-{bits}", method, bits, **options)

    return get


def export(capsys, model, out, *extra):
    code, stdout, err = run_cli(capsys, "export", "--model", str(model), "--format", "gguf", "--output", str(out),
                                *extra)
    return code, stdout, err


def llama_cpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp wants for a rotary q/k weight, built index by index: in each head of d rows, Hugging
    Face rotates row i with row i + d/2; llama.cpp rotates adjacent rows 2i and 2i+1."""
    d = w.shape[0] // n_head
    order = [h * d + i + half * (d // 2) for h in range(n_head) for i in range(d // 2) for half in (0, 1)]
    return w[order]


def read_back(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, np.asarray(values, dtype=np.float32).reshape(
            [int(n) for n in reversed(t.shape)]))
    fields = {}
    for name, f in reader.fields.items():
        fields[name] = f.contents() if hasattr(f, "contents") else f
    return tensors, fields


def expected_lm(weights: dict, config) -> dict[str, np.ndarray]:
    text = config.text_config
    out = {}
    for i in range(text.num_hidden_layers):
        for hf, short in SHORT.items():
            w = weights[f"{LM}.layers.{i}.{hf}"].numpy()
            heads = {"attn_q": text.num_attention_heads, "attn_k": text.num_key_value_heads}.get(short)
            out[f"blk.{i}.{short}.weight"] = llama_cpp_rows(w, heads) if heads else w
    return out


@pytest.mark.parametrize(("bits", "qtype"), [("w4a16g32", "Q4_0"), ("w8a16g32", "Q8_0"), ("w8a16", "Q8_0"),
                                             ("w4a16g64", "Q4_0")])
def test_quantized_weights_read_back_as_the_harness_computes_them(checkpoints, tmp_path, capsys, bits, qtype):
    from transformers import AutoConfig

    folder = checkpoints(bits)
    code, stdout, err = export(capsys, folder, tmp_path / "out")
    assert code == 0, err
    tensors, fields = read_back(tmp_path / "out" / f"model-{qtype}.gguf")
    config = AutoConfig.from_pretrained(folder)
    exact = expected_lm(harness_weights(folder, scale_dtype=torch.float16), config)
    fp32 = expected_lm(harness_weights(folder), config)
    for name, want in exact.items():
        kind, got = tensors[name]
        assert kind == qtype, name
        assert np.array_equal(got, want), name  # codes x fp16(scale): nothing else changed
        rel = np.abs(got - fp32[name])[fp32[name] != 0] / np.abs(fp32[name][fp32[name] != 0])
        assert rel.max() <= 2.0**-11 * 1.0001, name  # the fp16 rounding of a normal scale, at most half an ulp
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert 0 < summary["max_scale_rounding"] <= 2.0**-11 * 1.0001
    # float tensors: exactly the model's
    from safetensors.torch import load_file

    stored = load_file(str(folder / "model.safetensors"))
    assert np.array_equal(tensors["token_embd.weight"][1], stored[f"{LM}.embed_tokens.weight"].numpy())
    assert np.array_equal(tensors["blk.1.ffn_norm.weight"][1],
                          stored[f"{LM}.layers.1.post_attention_layernorm.weight"].numpy())
    assert np.array_equal(tensors["output.weight"][1], stored["lm_head.weight"].numpy())  # the tiny model is untied
    text = config.text_config
    assert int(fields["llama.block_count"]) == text.num_hidden_layers
    assert int(fields["llama.attention.head_count_kv"]) == text.num_key_value_heads
    assert int(fields["llama.rope.dimension_count"]) == text.hidden_size // text.num_attention_heads
    assert fields["general.architecture"] == "llama"
    assert int(fields["general.file_type"]) == int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])


def test_vocabulary_is_the_checkpoints_tokenizer(checkpoints, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = checkpoints("w4a16g32")
    assert export(capsys, folder, tmp_path / "out")[0] == 0
    _, fields = read_back(tmp_path / "out" / "model-Q4_0.gguf")
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = tok.get_vocab()
    tokens = list(fields["tokenizer.ggml.tokens"])
    assert len(tokens) == len(vocab)
    assert all(tokens[i] == t for t, i in vocab.items())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert int(fields["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
    types = list(fields["tokenizer.ggml.token_type"])
    assert types[tok.convert_tokens_to_ids("<image>")] == int(gguf.TokenType.CONTROL)
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert list(fields["tokenizer.ggml.merges"])[:5] == [" ".join(m) for m in merges[:5]]


@pytest.mark.parametrize("ftype", ["f32", "f16"])
def test_float_model_exports_as_f32_or_f16(tiny_model_dir, tmp_path, capsys, ftype):
    from safetensors.torch import load_file

    code, _, err = export(capsys, tiny_model_dir, tmp_path / "out", "--gguf-float", ftype)
    assert code == 0, err
    kind = "F32" if ftype == "f32" else "F16"
    tensors, fields = read_back(tmp_path / "out" / f"model-{kind}.gguf")
    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    w = stored["language_model.model.layers.0.mlp.down_proj.weight"]
    assert tensors["blk.0.ffn_down.weight"][0] == kind
    want = w.numpy() if ftype == "f32" else w.half().float().numpy()
    assert np.array_equal(tensors["blk.0.ffn_down.weight"][1], want)
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"  # 1-D tensors stay F32, as llama.cpp's converter does


@pytest.mark.parametrize(("bits", "method", "options", "needle"), [
    ("w4a16g32-wasym", "rtn", {}, "asymmetric"),
    ("w4a16g16", "rtn", {}, "groups of 16"),
    ("w8a8", "rtn", {}, "input is quantized"),
    ("w4a16", "qlora", {}, "NormalFloat"),
    ("w4a16g32", "zeroquant-v2", {"weights": "rtn"}, "low-rank side path"),
])
def test_grids_gguf_cannot_hold_are_refused_before_writing(checkpoints, tmp_path, capsys, bits, method, options,
                                                           needle):
    folder = checkpoints(bits, method, **options)
    code, _, err = export(capsys, folder, tmp_path / "out")
    assert code == 2
    line = one_line_error(err)
    assert needle in line and "cannot export" in line
    assert not list((tmp_path / "out").glob("*.gguf*")) if (tmp_path / "out").exists() else True


def test_bad_inputs_are_one_line(tiny_model_dir, tmp_path, capsys):
    code, _, err = export(capsys, tmp_path / "missing", tmp_path / "out")
    assert code == 2 and "does not exist" in one_line_error(err)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = export(capsys, tiny_model_dir, tmp_path / "busy")
    assert code == 2 and "choose an empty folder" in one_line_error(err)
    code, _, err = run_cli(capsys, "export", "--model", str(tiny_model_dir), "--format", "compressed-tensors",
                           "--output", str(tmp_path / "o2"), "--gguf-float", "f16")
    assert code == 2 and "--gguf-float applies to --format gguf" in one_line_error(err)
