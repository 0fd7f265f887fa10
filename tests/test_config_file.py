"""`--config FILE.yaml`: run settings from a file, the command line winning."""

from __future__ import annotations

import pytest

from qvlm_harness.cli import build_parser, main
from qvlm_harness.commands.common import run_spec_from_args
from qvlm_harness.commands.config_file import expand_config
from qvlm_harness.config import QuantSpec


def _spec(argv):
    parser = build_parser()
    return run_spec_from_args(parser.parse_args(expand_config(argv, parser)))


def test_yaml_settings_and_command_line_precedence(tmp_path):
    f = tmp_path / "suite.yaml"
    f.write_text("methods: [fp32, gptq]\ntasks: sqa\nbits: [w4a16, w4a4]\nlimit: 3\nno_progress: true\n"
                 "method_options: {gptq: {act_order: true, percdamp: 0.05}}\nquantize: [lm]\n")
    spec = _spec(["run", "--config", str(f)])
    assert spec.methods == ["fp32", "gptq"] and spec.tasks == ["sqa"] and spec.limit == 3
    assert spec.bits == QuantSpec.parse_list("w4a16,w4a4") and spec.scope == ("lm",)
    assert spec.method_options == {"gptq": {"act_order": "true", "percdamp": "0.05"}}
    over = _spec(["run", "--limit", "2", "--config", str(f), "--method-option", "gptq.act_order=false"])
    assert over.limit == 2 and over.method_options["gptq"] == {"act_order": "false", "percdamp": "0.05"}


@pytest.mark.parametrize(("text", "pattern"), [("bogus: 1\n", "unknown setting 'bogus'"), ("- a\n- b\n", "mapping"),
                                               ("limit: [\n", "not valid YAML"),
                                               ("no_progress: 3\n", "true or false")])
def test_bad_config_files_exit_2_in_one_line(tmp_path, capsys, text, pattern):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert main(["run", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0]
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
