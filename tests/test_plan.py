"""The planner and `harness validate`: every problem found before any model loads, the spec never mutated, the
one quantize entry point (calibration check, stages, FP-pass multiple), and the local executor's protocol."""

from __future__ import annotations

import copy

import pytest

from qvlm_harness.cli import main
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.plan import make_plan


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(LlavaAdapter, "load", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))


def _spec(tiny_model_dir, tmp_path, **kw) -> RunSpec:
    base = dict(methods=["fp32", "rtn"], tasks=["sqa"], bits=QuantSpec.parse_list("w8a8,w4a4"),
                model=str(tiny_model_dir), limit=4, output=tmp_path / "out")
    return RunSpec(**(base | kw))


def test_plan_lists_cells_and_jobs_without_loading_a_model(tiny_model_dir, tmp_path, no_model_load):
    spec = _spec(tiny_model_dir, tmp_path, methods=["fp32", "rtn", "gptq"])
    before = copy.deepcopy(spec)
    plan = make_plan(spec)
    assert [(c.method, c.bits) for c in plan.cells] == [("fp32", "fp"), ("rtn", "w8a8"), ("rtn", "w4a4"),
                                                        ("gptq", "w8a8"), ("gptq", "w4a4")]
    jobs = plan.jobs()
    assert [(j.method, j.calib_task) for j in jobs] == [("fp32", None), ("rtn", None), ("rtn", None),
                                                        ("gptq", "sqa"), ("gptq", "sqa")]
    assert spec == before  # the planner never mutates the spec
    assert len({plan.cell_id(c) for c in plan.cells}) == len(plan.cells)


def test_duplicates_are_removed_with_a_note(tiny_model_dir, tmp_path, no_model_load):
    spec = _spec(tiny_model_dir, tmp_path, methods=["rtn", "RTN"], tasks=["sqa", "scienceqa"],
                 bits=QuantSpec.parse_list("w4a4,W4A4"))
    plan = make_plan(spec)
    assert [(c.method, c.bits, c.task) for c in plan.cells] == [("rtn", "w4a4", "sqa")]
    assert len(plan.notes) >= 2


def test_checkpoint_bits_come_from_the_manifest_not_a_mutated_spec(tiny_model_dir, tmp_path):
    ck = tmp_path / "ck"
    assert main(["quantize", "--method", "rtn", "--bits", "w4a8", "--model", str(tiny_model_dir),
                 "--output", str(ck)]) == 0
    spec = RunSpec(methods=[], tasks=["sqa"], model=str(ck), limit=2, output=tmp_path / "out")
    bits_before = list(spec.bits)
    plan = make_plan(spec)
    assert [c.bits for c in plan.cells] == ["w4a8"] and spec.bits == bits_before


@pytest.mark.parametrize(("flags", "pattern"), [
    (["--batch-size", "0"], "--batch-size"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-1"], "--threads"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--shots", "-4"], "--shots"),
    (["--calib-samples", "-1"], "--calib-samples"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--device", "bogus"], "--device"),
    (["--limit", "0"], "--limit"),
    (["--methods", "gptq", "--calib-samples", "0"], "--calib-samples"),
    (["--methods", "gptq", "--method-option", "gptq.percdamp=abc"], "percdamp"),
    (["--methods", "gptq", "--method-option", "gptq.group_size=0"], "group_size"),
    (["--methods", "gptq", "--bits", "w4a16g128", "--method-option", "gptq.group_size=64"], "group"),
])
def test_bad_run_inputs_stop_before_any_model_load(tiny_model_dir, tmp_path, capsys, no_model_load, flags, pattern):
    args = ["run", "--methods", "rtn", "--tasks", "sqa", "--bits", "w4a4", "--model", str(tiny_model_dir),
            "--output", str(tmp_path), "--no-progress"]
    for i in range(0, len(flags), 2):  # later flags override earlier ones (argparse keeps the last)
        args += flags[i:i + 2]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and pattern in err[0], err


def test_cuda_without_a_gpu_is_refused(tiny_model_dir, tmp_path, no_model_load):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(HarnessError, match="CUDA is not available"):
        make_plan(_spec(tiny_model_dir, tmp_path, device="cuda"))


def test_validate_prints_the_plan_and_every_problem(tiny_model_dir, tmp_path, capsys, no_model_load):
    ok = main(["validate", "--methods", "fp32,gptq", "--tasks", "sqa", "--bits", "w4a16", "--limit", "3",
               "--model", str(tiny_model_dir), "--output", str(tmp_path), "--method-option", "gptq.act_order=true"])
    out = capsys.readouterr().out
    assert ok == 0 and "2 cell(s)" in out and "gptq w4a16 [act_order=True], calibrated on 64 sqa" in out
    assert "3 samples" in out
    bad = main(["validate", "--methods", "rnt,gptq", "--tasks", "sqa,vqa3", "--limit", "-2", "--model",
                str(tiny_model_dir), "--output", str(tmp_path), "--method-option", "gptq.act_order=perhaps"])
    err = capsys.readouterr().err.strip().splitlines()
    assert bad == 2
    problems = [line for line in err if line.startswith("error: ")]
    assert len(problems) >= 4  # --limit, unknown method, bad option, unknown task: all reported together
    assert any("rnt" in p for p in problems) and any("vqa3" in p for p in problems)
    assert any("act_order" in p for p in problems) and any("--limit" in p for p in problems)


def test_quantize_entry_point_checks_calibration_and_records_cost(tiny_model_dir):
    from qvlm_harness import plugins
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.quantize import quantize

    adapter = LlavaAdapter.load(tiny_model_dir)
    gptq = plugins.methods.get("gptq")()
    spec = QuantSpec.parse("w4a16")
    with pytest.raises(HarnessError, match="--calib-samples"):
        quantize(adapter, gptq, spec, None)
    calibration = CalibrationSet.from_task(plugins.tasks.get("sqa")(), 4, 0)
    qm = quantize(adapter, gptq, spec, calibration)
    cost = qm.search_cost
    assert cost.seconds > 0 and cost.fp_pass_s and cost.fp_pass_s > 0
    assert cost.fp_passes == pytest.approx(cost.seconds / cost.fp_pass_s)
    assert {"gptq", "activation_calibration"} <= set(cost.stages)
    assert sum(cost.stages.values()) <= cost.seconds * 1.01
    assert qm.config == gptq.config.to_dict() and qm.config["version"] == 1
    with pytest.raises(HarnessError, match="does not support"):
        quantize(LlavaAdapter.load(tiny_model_dir), gptq, QuantSpec(), calibration)


def test_local_executor_implements_the_executor_protocol(tiny_model_dir, tmp_path):
    from qvlm_harness.executors import Executor, LocalExecutor

    plan = make_plan(_spec(tiny_model_dir, tmp_path, methods=["rtn"], bits=[QuantSpec.parse("w8a8")],
                           max_new_tokens=2))
    executor: Executor = LocalExecutor(log=lambda m: None, progress=False)
    rows = list(executor.run(plan, plan.jobs(), run_id="r"))
    assert [(r.method, r.bits, r.task, r.n_samples) for r in rows] == [("rtn", "w8a8", "sqa", 4)]
    assert rows[0].cell_id == plan.cell_id(plan.cells[0]) and rows[0].environment["executor"] == "local"


# -- structure checks before any search, and the transforms-alone check after it -----------------------------------
def test_aespa_refuses_qk_norm_attention_before_any_model_load(tmp_path, no_model_load, capsys):
    from qvlm_harness.models.tiny import tiny_gemma_model_path

    gemma = tiny_gemma_model_path(tmp_path / "tg")  # Gemma3 normalises q and k after the projections
    capsys.readouterr()  # (the build's progress output)
    code = main(["run", "--methods", "aespa", "--tasks", "sqa", "--bits", "w4a16", "--model", str(gemma),
                 "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "q/k-norm" in err[0] and "aespa" in err[0]
    # a method without that requirement plans fine on the same model
    plan = make_plan(RunSpec(methods=["gptq"], tasks=["sqa"], bits=[QuantSpec.parse("w4a16")], model=str(gemma),
                             output=tmp_path / "out", limit=2))
    assert [c.method for c in plan.cells] == ["gptq"]


def test_an_architecture_the_seam_does_not_know_is_refused_for_structural_methods_only(tmp_path, no_model_load):
    from transformers import CLIPVisionConfig, LlavaConfig, Phi3Config

    folder = tmp_path / "phi3-llava"
    folder.mkdir()
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=32, patch_size=8),
                         text_config=Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
                                                pad_token_id=0))
    config.save_pretrained(folder)
    # a complete folder (the planner refuses one without weights or processor files before anything else)
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    save_file(LlavaForConditionalGeneration(config).state_dict(), str(folder / "model.safetensors"))
    for name in ("tokenizer.json", "processor_config.json"):
        (folder / name).write_text("{}")
    spec = dict(tasks=["sqa"], bits=[QuantSpec.parse("w4a16")], model=str(folder), output=tmp_path / "out", limit=2)
    with pytest.raises(HarnessError, match="Phi3"):
        make_plan(RunSpec(methods=["gptq"], **spec))
    assert [c.method for c in make_plan(RunSpec(methods=["rtn"], **spec)).cells] == ["rtn"]


def test_a_method_whose_transforms_alone_change_the_fp_model_is_refused(tiny_model_dir, tmp_path):
    from dataclasses import dataclass

    from torch import nn

    from qvlm_harness.checkpoint import load_adapter
    from qvlm_harness.executors import run_group
    from qvlm_harness.method import Method

    @dataclass(frozen=True)
    class BadFold:  # "folds" a scale into a norm without compensating the consumers
        norm: str

        def apply(self, model: nn.Module) -> None:
            model.get_submodule(self.norm).weight.data.mul_(3.0)

    class BadMethod(Method):
        name = "rtn"

        def quantize(self, adapter, calibration, spec, scope=()):
            norm = next(n for n, m in adapter.model.named_modules() if n.endswith("input_layernorm"))
            t = BadFold(norm)
            t.apply(adapter.model)
            adapter.transforms.append(t)
            return self.result(adapter, spec, "simulated")

        def describe(self, spec):
            return "test"

    plan = make_plan(_spec(tiny_model_dir, tmp_path, methods=["rtn"], bits=[QuantSpec.parse("w8a8")],
                           max_new_tokens=2))
    plan.methods["rtn"] = BadMethod()
    adapter = load_adapter(plan.model_path)
    with pytest.raises(HarnessError, match="transform.*alone"):
        list(run_group(plan, plan.jobs()[0], adapter, fingerprint="x", run_id="r", env={}))
    # a real fold (SmoothQuant) passes the same check and records it
    plan = make_plan(_spec(tiny_model_dir, tmp_path, methods=["smoothquant"], bits=[QuantSpec.parse("w8a8")],
                           max_new_tokens=2, calib_samples=4))
    rows = list(run_group(plan, plan.jobs()[0], load_adapter(plan.model_path), fingerprint="x", run_id="r",
                          env={}))
    check = rows[0].measurements["fidelity"]["transforms_alone"]
    assert check["ops"] > 0 and check["kl_mean"] < 1e-3
