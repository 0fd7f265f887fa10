"""Bad input: one line on stderr naming the fix, exit code 2, and nothing already written is lost."""

from __future__ import annotations

import json

import pytest

from qvlm_harness.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--methods", "rnt", "--tasks", "sqa"], "Did you mean 'rtn'"),
        (["--methods", "rtn", "--tasks", "scienceqaa"], "Did you mean"),
        (["--methods", "rtn", "--tasks", "sqa", "--bits", "w4x4"], "cannot parse bit-width"),
        (["--methods", "rtn", "--tasks", "sqa", "--data-dir", "/nonexistent/sqa"], "does not exist"),
        (["--methods", "rtn", "--tasks", "sqa", "--model", "/nonexistent/model"], "does not exist"),
        (["--methods", "rtn", "--tasks", "sqa", "--quantize", "vision,decoder"], "--quantize takes"),
        (["--methods", "rtn", "--tasks", "sqa", "--limit", "0"], "--limit must be"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, args, needle):
    code, _, err = run_cli(capsys, "run", *args, "--output", str(tmp_path))
    assert code == 2
    assert needle in one_line_error(err)
    assert "Traceback" not in err


def test_missing_data_file_names_expected_path_and_format(capsys, tmp_path):
    (tmp_path / "sqa").mkdir()
    code, _, err = run_cli(capsys, "run", "--methods", "fp32", "--tasks", "sqa", "--data-dir", str(tmp_path / "sqa"),
                           "--output", str(tmp_path / "out"))
    line = one_line_error(err)
    assert code == 2 and "problems.json" in line and str(tmp_path / "sqa") in line


def test_model_folder_that_is_not_llava(capsys, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run_cli(capsys, "run", "--methods", "fp32", "--tasks", "sqa", "--model", str(folder),
                           "--limit", "2", "--output", str(tmp_path / "out"))
    assert code == 2 and "not Llava" in one_line_error(err)


def test_corrupt_image_is_reported_and_finished_cells_are_kept(capsys, tmp_path, tiny_model_dir):
    from tests.test_task_sqa import write_official

    data = write_official(tmp_path / "sqa")
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "run", "--methods", "fp32", "--tasks", "sqa", "--model", str(tiny_model_dir),
                         "--data-dir", str(data), "--output", str(out), "--no-progress", "--max-new-tokens", "2")
    assert code == 0
    (data / "images" / "test" / "3" / "image.png").write_bytes(b"\x89PNG not really")
    code, _, err = run_cli(capsys, "run", "--methods", "fp32,rtn", "--tasks", "sqa", "--bits", "w8a8",
                           "--model", str(tiny_model_dir), "--data-dir", str(data), "--output", str(out),
                           "--no-progress", "--max-new-tokens", "2")
    line = one_line_error(err)
    assert code == 2 and "corrupt image" in line and "image.png" in line
    from qvlm_harness.store import Store

    rows = list(Store(out / "harness.db").rows())
    assert [r.method for r in rows] == ["fp32"]  # the finished fp32 cell survived the failing rtn cell


def test_ls_tasks_shows_metrics_and_layout(capsys):
    code, out, _ = run_cli(capsys, "ls", "tasks")
    assert code == 0
    assert "sqa" in out and "problems.json" in out and "NAT" in out and "auroc" in out


def test_run_prints_table_and_writes_csv_latex_markdown(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "run", "--methods", "fp32,rtn", "--tasks", "sqa", "--bits", "w4a4",
                              "--model", str(tiny_model_dir), "--limit", "4", "--output", str(out), "--no-progress",
                              "--max-new-tokens", "2")
    assert code == 0
    assert "| Method" in stdout and "simulated" in stdout and "NAT" in stdout
    folders = [p for p in out.glob("*/*") if p.is_dir() and p.name != "samples"]
    assert len(folders) == 1
    names = {p.name for p in folders[0].iterdir()}
    assert {"main.csv", "main.tex", "main.md", "sqa.csv", "sqa.tex", "sqa.md", "results.json"} <= names
    tex = (folders[0] / "sqa.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex


def test_unknown_method_option_lists_the_valid_ones(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--methods", "rtn", "--tasks", "sqa", "--method-option", "rtn.obsrver=mse",
                           "--output", str(tmp_path))
    line = one_line_error(err)
    assert code == 2 and "obsrver" in line and "observer" in line
