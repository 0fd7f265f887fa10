"""Typed method configurations: one frozen dataclass per method, coerced from `--method-option` strings.

As torchao's `AOBaseConfig` and llm-compressor's pydantic modifiers do, each method declares its options as a
dataclass (`Config`, a subclass of `MethodConfig`): a type, a default, the allowed values and one help line per
field (`option(...)`). One generic coercion turns what a user typed (`--method-option gptq.act_order=false`,
always a string) or what a file or Python caller passed into those types, and anything else is a one-line error
naming the valid values. A config serialises canonically (`to_dict()`: every field, defaults included, plus the
config's `VERSION`), which is what a cell's identity and a checkpoint manifest record: two runs whose configs
serialise alike computed the same thing.

A config may declare named presets (`PRESETS`, e.g. a paper's budget) selected by its `preset` field: the preset
fills in every option the user did not give (options given explicitly win), and the config holds, and serialises,
the resolved values, so a cell's identity is the budget it actually ran with.

Supported field types: `bool` (true/false/1/0/yes/no/on/off), `int`, `float`, `str`, `Literal[...]` (the
choices), `tuple[str, ...]` (a comma list), and any of them `| None` (`none` / `null` / empty gives None).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from qvlm_harness.errors import HarnessError

C = TypeVar("C", bound="MethodConfig")

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
NONE_WORDS = ("none", "null", "")


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, gt: float | None = None) -> Any:
    """A config field: its default, one help line, and optional bounds (`min`/`max` inclusive, `gt` exclusive)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "gt": gt}
    if isinstance(default, list | dict | set):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    """What `harness ls methods --options` prints for one option."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple | None


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options. Subclasses add fields with `option(...)` and may override `validate()` for
    checks that involve several fields; bump `VERSION` when a field's meaning changes."""

    VERSION: ClassVar[int] = 1
    METHOD: ClassVar[str] = ""  # the owning method's name, for error messages (each Config sets it)
    #: preset name -> option values it fills in when selected through a `preset` field (typed Python values)
    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_bounds(self._label(), f, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks (raise HarnessError with one line naming the fix)."""

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_options(cls: type[C], options: Mapping[str, Any] | None = None, *, method: str = "") -> C:
        """Build from user options (`--method-option` strings, YAML/JSON values or Python values), coercing each to
        its field's type and refusing unknown names with the list of known ones."""
        options = dict(options or {})
        method = method or cls.METHOD or cls.__name__
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise HarnessError(f"method {method} has no option(s) {', '.join(unknown)} (unknown {method} option); "
                               f"known: {known} (see `harness ls methods --options`)")
        hints = _hints(cls)
        values = {name: coerce(f"{method}.{name}", raw, hints[name], fields[name])
                  for name, raw in options.items()}
        preset = cls.PRESETS.get(values.get("preset")) if "preset" in fields else None
        if preset:
            values = {k: v for k, v in preset.items() if k not in values} | values
        return cls(**values)

    # -- serialisation ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field (defaults included) and the config's version: the canonical, JSON-serialisable form."""
        out: dict[str, Any] = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"version": self.VERSION, **out}

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a user set), for short labels; under a preset, the
        preset's name and the options that differ from what it fills in."""
        preset = getattr(self, "preset", None)
        if preset in self.PRESETS:
            base = type(self).from_options({"preset": preset})
            return {"preset": preset} | {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                         if getattr(self, f.name) != getattr(base, f.name)}
        default = type(self)()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe_options(cls) -> list[OptionInfo]:
        hints = _hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices") or _literal_choices(hints[f.name])
            out.append(OptionInfo(f.name, _type_text(hints[f.name]), f.default, f.metadata.get("help", ""), choices))
        return out

    def _label(self) -> str:
        return self.METHOD or type(self).__name__


# -- coercion ---------------------------------------------------------------------------------------------------------
def coerce(label: str, raw: Any, hint: Any, f: dataclasses.Field | None = None) -> Any:
    """`raw` as a value of type `hint`, or a HarnessError naming `label`, the expected type and the valid values."""
    inner, optional = _unwrap_optional(hint)
    if optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in NONE_WORDS)):
        return None
    choices = (f.metadata.get("choices") if f is not None else None) or _literal_choices(inner)
    try:
        value = _coerce_plain(raw, inner)
    except (TypeError, ValueError):
        expect = f"one of {', '.join(map(str, choices))}" if choices else _type_text(hint)
        raise HarnessError(f"option {label} expects {expect}, got {raw!r}") from None
    if choices and value not in choices:
        raise HarnessError(f"option {label} expects one of {', '.join(map(str, choices))}, got {raw!r}")
    return value


def _coerce_plain(raw: Any, kind: Any) -> Any:
    """`raw` (from a flag, a YAML file or Python) as a value of `kind`; ValueError when it is not one."""
    origin = get_origin(kind)
    if origin is Literal:
        return _coerce_plain(raw, type(get_args(kind)[0]))
    if origin is tuple:
        items = [s.strip() for s in raw.split(",")] if isinstance(raw, str) else list(raw)
        return tuple(str(x) for x in items if str(x))
    coerce = _COERCERS.get(kind)
    if coerce is None:
        raise TypeError(f"unsupported option type {kind!r}")
    return coerce(raw)


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return raw.strip().lower() in TRUE_WORDS
    raise ValueError(raw)


def _to_int(raw: Any) -> int:
    """Whole numbers only: 3, "3", 3.0 and "3.0" are 3; True, 2.5 and "2.5" are refused."""
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            raw = float(text)
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(raw)
        return int(raw)
    return int(raw)


def _to_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(raw)
    value = float(raw.strip()) if isinstance(raw, str) else float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _to_str(raw: Any) -> str:
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        raise ValueError(raw)
    return str(raw).strip()


_COERCERS: dict[Any, Any] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _check_bounds(label: str, f: dataclasses.Field, value: Any) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    lo, hi, gt = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("gt")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (gt is not None and value <= gt):
        if lo is not None and hi is not None:
            want = f"in [{lo}, {hi}]"
        else:
            parts = [f">= {lo}" if lo is not None else "", f"> {gt}" if gt is not None else "",
                     f"<= {hi}" if hi is not None else ""]
            want = " and ".join(p for p in parts if p)
        raise HarnessError(f"option {label}.{f.name} must be {want}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(hint))
    return hint, False


def _literal_choices(hint: Any) -> tuple | None:
    inner, _ = _unwrap_optional(hint)
    return tuple(get_args(inner)) if get_origin(inner) is Literal else None


def _type_text(hint: Any) -> str:
    inner, optional = _unwrap_optional(hint)
    origin = get_origin(inner)
    if origin is Literal:
        text = "|".join(map(str, get_args(inner)))
    elif origin is tuple:
        text = "comma list"
    elif inner is bool:
        text = "true or false"
    else:
        text = {int: "an integer", float: "a number", str: "text"}.get(inner, str(inner))
    return f"{text} or none" if optional else text


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# -- the group-size rule ----------------------------------------------------------------------------------------------
def resolve_group_size(method: str, bits_group: int | None, option_group: int | None,
                       default: int | None = None) -> int | None:
    """The one group-size precedence rule every method follows: a `g<N>` in `--bits` and the method's
    `group_size` option both set the group; given together they must agree (else one line naming both); with
    neither, the method's own default (e.g. AWQ's 128; None = per output channel)."""
    if bits_group is not None and option_group is not None and bits_group != option_group:
        raise HarnessError(f"{method}: --bits says groups of {bits_group} but {method}.group_size={option_group}; "
                           "give one of them")
    if bits_group is not None:
        return bits_group
    return option_group if option_group is not None else default

