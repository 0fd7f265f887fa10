from __future__ import annotations

import pytest

from qvlm_harness import plugins
from qvlm_harness.errors import UnknownNameError
from qvlm_harness.registry import Registry


def test_lazy_entry_is_imported_on_first_get_only():
    reg: Registry = Registry("thing")
    reg.register("od", "collections:OrderedDict", "an ordered dict")
    assert isinstance(reg._entries["od"].target, str)  # nothing imported yet
    from collections import OrderedDict

    assert reg.get("od") is OrderedDict
    assert reg._entries["od"].target is OrderedDict


def test_unknown_name_suggests_close_matches_in_one_line():
    with pytest.raises(UnknownNameError) as exc:
        plugins.methods.get("rnt")
    msg = str(exc.value)
    assert "'rtn'" in msg and "Did you mean" in msg and "\n" not in msg


def test_unknown_name_without_close_match_lists_known_names():
    with pytest.raises(UnknownNameError) as exc:
        plugins.tasks.resolve_name("zzzzzz")
    assert "Did you mean" not in str(exc.value)
    assert "sqa" in str(exc.value)


def test_aliases_and_case_resolve_to_canonical_name():
    assert plugins.tasks.resolve_name("ScienceQA") == "sqa"
    assert plugins.tasks.resolve_name("SQA") == "sqa"


def test_duplicate_registration_is_refused_and_freeze_blocks_new_entries():
    reg: Registry = Registry("thing")
    reg.register("a", "collections:OrderedDict")
    with pytest.raises(ValueError):
        reg.register("a", "collections:Counter")
    reg.freeze()
    with pytest.raises(RuntimeError):
        reg.register("b", "collections:Counter")


def test_malformed_lazy_target_is_refused():
    with pytest.raises(ValueError):
        Registry("thing").register("x", "no_colon_here")


def test_entry_points_are_loaded(monkeypatch):
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="myplugin", value="collections:Counter", group="qvlm_harness.methods")
    monkeypatch.setattr("qvlm_harness.registry.entry_points",
                        lambda group: [ep] if group == "qvlm_harness.methods" else [])
    reg: Registry = Registry("method", "qvlm_harness.methods")
    reg.register("rtn", "collections:OrderedDict")
    from collections import Counter

    assert "myplugin" in reg.names()
    assert reg.get("myplugin") is Counter


def test_builtin_registries_cover_the_design_card():
    assert {"fp32", "fp16", "bf16", "rtn"} <= set(plugins.methods.names())
    assert {"sqa", "vqav2", "vizwiz", "hm"} <= set(plugins.tasks.names())
    assert {"default", "tiny"} <= set(plugins.models.names())


def test_prefix_factory_binds_the_rest_of_the_name_and_keeps_its_case():
    reg: Registry = Registry("thing")
    reg.register_prefix("ext", "collections:namedtuple", "external things")
    assert "ext:Point" in reg and "ext:" not in reg and "other:Point" not in reg
    assert reg.resolve_name("EXT: Point") == "ext:Point"
    factory = reg.get("ext:Point")
    point = factory(["x", "y"])
    assert point.__name__ == "Point" and point(1, 2).y == 2
    assert reg.summary("ext:anything") == "external things"
    assert reg.names() == []  # prefixes are not concrete entries
    assert reg.prefixes() == {"ext": "external things"}


def test_prefix_errors_are_one_line_and_suggest_the_prefix():
    reg: Registry = Registry("thing")
    reg.register_prefix("lmeval", "collections:namedtuple")
    with pytest.raises(UnknownNameError) as exc:
        reg.resolve_name("lmevl:arc_easy")
    assert "Did you mean 'lmeval:'" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UnknownNameError, match="lmeval:<name>"):
        reg.resolve_name("lmeval:")
    with pytest.raises(ValueError):
        reg.register_prefix("lmeval", "collections:Counter")
    with pytest.raises(ValueError):
        reg.register_prefix("a:b", "collections:Counter")


def test_builtin_task_registry_has_the_lmeval_prefix():
    assert plugins.tasks.resolve_name("LMEval:arc_easy") == "lmeval:arc_easy"
    assert "lmeval:" + "x" in plugins.tasks and "lmeval" in plugins.tasks.prefixes()
