"""Typed method configs: every registered method declares one; one coercion for every option type; the group-size
rule; canonical serialisation (what a cell's identity records); bad values exit 2 in one line before any model."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, get_args, get_origin

import pytest

from qvlm_harness import plugins
from qvlm_harness.cli import main
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.methodconfig import MethodConfig, coerce, option, resolve_group_size
from qvlm_harness.plan import make_plan

METHODS = plugins.methods.names()


def _fields(cls):
    hints = typing.get_type_hints(cls.Config)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls.Config)]


def _inner(hint):
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if get_origin(hint) in (typing.Union, __import__("types").UnionType) and len(args) == 1 else hint


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_a_typed_config_with_help_and_a_version(name):
    cls = plugins.methods.get(name)
    assert issubclass(cls.Config, MethodConfig) and dataclasses.is_dataclass(cls.Config)
    method = cls()
    d = method.config.to_dict()
    assert d["version"] == cls.Config.VERSION >= 1
    assert set(d) == {"version"} | {f.name for f, _ in _fields(cls)}
    for f, _ in _fields(cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help line"
    # the canonical form rebuilds the same config
    rebuilt = cls.Config.from_options({k: v for k, v in d.items() if k != "version"}, method=name)
    assert rebuilt == method.config and rebuilt.canonical() == method.config.canonical()


@pytest.mark.parametrize("name", METHODS)
def test_boolean_options_take_every_spelling(name):
    cls = plugins.methods.get(name)
    for f, hint in _fields(cls):
        if _inner(hint) is not bool:
            continue
        for word, value in (("false", False), ("False", False), ("0", False), ("no", False), ("off", False),
                            ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True)):
            assert getattr(cls(**{f.name: word}).config, f.name) is value, (name, f.name, word)


def _bad_values(hint, f) -> list[str]:
    inner = _inner(hint)
    if f.metadata.get("choices") or get_origin(inner) is Literal:
        return ["bogus-choice"]
    if inner is bool:
        return ["maybe", "2"]
    if inner is int:
        return ["abc", "1.5"]
    if inner is float:
        return ["abc", "nan", "inf"]
    return []


def _cases():
    for name in METHODS:
        cls = plugins.methods.get(name)
        for f, hint in _fields(cls):
            for bad in _bad_values(hint, f):
                yield pytest.param(name, f.name, bad, id=f"{name}.{f.name}={bad}")


@pytest.mark.parametrize(("name", "opt", "bad"), list(_cases()))
def test_bad_values_of_every_option_type_exit_2_in_one_line(name, opt, bad, tiny_model_dir, tmp_path, capsys,
                                                              monkeypatch):
    from qvlm_harness.models.llava import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    code = main(["run", "--methods", name, "--tasks", "sqa", "--bits", "w4a16", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path), "--method-option", f"{name}.{opt}={bad}", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and opt in err[0], err


def test_act_order_false_is_stored_false(tiny_model_dir, tmp_path):
    spec = RunSpec(methods=["gptq"], tasks=["sqa"], bits=[QuantSpec.parse("w4a16")], model=str(tiny_model_dir),
                   output=tmp_path, method_options={"gptq": {"act_order": "False", "percdamp": "0.05"}})
    plan = make_plan(spec)
    config = plan.methods["gptq"].config
    assert config.act_order is False and config.percdamp == 0.05
    assert config.to_dict()["act_order"] is False


def test_identity_is_the_canonical_config_not_the_spelling(tiny_model_dir, tmp_path):
    def cell_id(options):
        spec = RunSpec(methods=["gptq"], tasks=["sqa"], bits=[QuantSpec.parse("w4a16")], model=str(tiny_model_dir),
                       output=tmp_path, method_options={"gptq": options})
        plan = make_plan(spec)
        return plan.cell_id(plan.cells[0])

    default = cell_id({})
    assert cell_id({"percdamp": "0.01"}) == default == cell_id({"act_order": "no"})  # defaults spelled out
    assert cell_id({"percdamp": "0.02"}) != default
    assert cell_id({"act_order": "1"}) == cell_id({"act_order": True}) != default


def test_group_size_rule_is_one_for_every_method():
    assert resolve_group_size("m", None, None) is None
    assert resolve_group_size("m", None, None, 128) == 128
    assert resolve_group_size("m", 64, None, 128) == 64
    assert resolve_group_size("m", None, 32, 128) == 32
    assert resolve_group_size("m", 64, 64) == 64
    with pytest.raises(HarnessError, match="give one of them"):
        resolve_group_size("m", 64, 128)
    for name in ("gptq", "awq", "zeroquant-v2", "aespa"):
        with pytest.raises(HarnessError, match="group_size must be >= 1"):
            plugins.methods.get(name)(group_size="0")
        method = plugins.methods.get(name)(group_size="64")
        with pytest.raises(HarnessError, match="give one of them"):
            method.describe(QuantSpec.parse("w4a16g128"))
        assert "64" in method.describe(QuantSpec.parse("w4a16g64"))


def test_coercion_of_each_type():
    @dataclasses.dataclass(frozen=True)
    class Demo(MethodConfig):
        METHOD = "demo"
        n: int = option(1, "an int", min=0)
        x: float = option(0.5, "a float", min=0.0, max=1.0)
        flag: bool = option(False, "a bool")
        kind: Literal["a", "b"] = option("a", "a choice")
        parts: tuple[str, ...] = option(("lm",), "a list")
        maybe: int | None = option(None, "optional", min=1)

    c = Demo.from_options({"n": "3", "x": "0.25", "flag": "yes", "kind": "b", "parts": "vision, lm", "maybe": "none"})
    assert (c.n, c.x, c.flag, c.kind, c.parts, c.maybe) == (3, 0.25, True, "b", ("vision", "lm"), None)
    assert Demo.from_options({"n": 2.0, "maybe": "7"}).maybe == 7
    for key, bad, pattern in (("n", "-1", "must be >= 0"), ("x", "2", r"must be in \[0.0, 1.0\]"),
                              ("kind", "c", "expects one of a, b"), ("n", True, "expects an integer"),
                              ("typo", "1", "unknown demo option")):
        with pytest.raises(HarnessError, match=pattern):
            Demo.from_options({key: bad})
    assert coerce("d.x", "1e-3", float) == 1e-3


def test_ls_methods_options_lists_every_option(capsys):
    assert main(["ls", "methods", "--options"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        for f, _ in _fields(plugins.methods.get(name)):
            assert f"{name}.{f.name}=" in out
    assert "gptq.act_order=False  (true or false)" in out
