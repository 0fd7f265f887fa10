"""`harness run --execution packed`: quantized cells run on real kernels and say so in the store."""

from __future__ import annotations

from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.runner import Runner


def test_packed_execution_is_real_and_smaller(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QVLM_HARNESS_NO_CPP", "1")  # the plain-torch kernels: no compiler needed here
    base = dict(methods=["rtn"], tasks=["sqa"], bits=QuantSpec.parse_list("w4a4,w4a16"), model=str(tiny_model_dir),
                limit=4, output=tmp_path / "out", batch_size=4, max_new_tokens=3)
    simulated = Runner(RunSpec(**base), log=lambda m: None, progress=False).run()
    logs: list[str] = []
    packed = Runner(RunSpec(**base, execution="packed"), log=logs.append, progress=False).run()
    assert packed.computed == 2  # a different cell id than the simulated cells: nothing reused
    for sim, real in zip(simulated.rows, packed.rows, strict=True):
        assert sim.execution == "simulated" and real.execution == "real"
        assert real.measurements["timing"] == "real" and not real.measurements["packed_is_simulated"]
        assert real.measurements["weight_mb_stored"] < 0.5 * sim.measurements["weight_mb_stored"]
        assert real.settings["report"]["packing"]["converted"] > 0
        assert real.settings["report"]["packing"]["skipped"] == {}
    kinds = [r.settings["report"]["packing"]["kinds"] for r in packed.rows]
    assert kinds[0].keys() == {"IntLinear"} and kinds[1].keys() == {"WeightOnlyLinear"}
    assert any("packed" in m for m in logs)


def test_execution_flag_parses():
    from qvlm_harness.cli import build_parser
    from qvlm_harness.commands.common import run_spec_from_args

    args = build_parser().parse_args(["run", "--methods", "rtn", "--tasks", "sqa", "--execution", "packed"])
    assert run_spec_from_args(args).execution == "packed"
    args = build_parser().parse_args(["run", "--methods", "rtn", "--tasks", "sqa"])
    assert run_spec_from_args(args).execution == "simulated"
