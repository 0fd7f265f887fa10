"""One generic registry for methods, tasks and models.

Entries are registered lazily as ``"module:attr"`` strings so that `harness ls` and argument validation never
import torch-heavy plugin modules. Third-party packages add entries through the entry-point groups
``qvlm_harness.methods``, ``qvlm_harness.tasks`` and ``qvlm_harness.models``. Unknown names fail with a
did-you-mean hint.

Prefix factories cover open-ended families of names that cannot be listed up front: after
``register_prefix("lmeval", "qvlm_harness.tasks.lmeval:LMEvalTask")``, the name ``lmeval:arc_easy`` resolves to
``functools.partial(LMEvalTask, "arc_easy")`` (the factory receives the rest of the name as its first argument).
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from qvlm_harness.errors import UnknownNameError

T = TypeVar("T")


@dataclass
class _Entry:
    target: str | object  # "module:attr" until first use, then the loaded object
    summary: str
    origin: str  # "builtin" or the distribution that declared the entry point


class Registry(Generic[T]):
    """Name -> plugin factory, with lazy loading, entry points and did-you-mean."""

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, _Entry] = {}
        self._aliases: dict[str, str] = {}
        self._prefixes: dict[str, _Entry] = {}
        self._entry_points_loaded = False
        self._frozen = False

    # -- registration -------------------------------------------------------------------------------------
    def register(
        self, name: str, target: str | object, summary: str = "", aliases: tuple[str, ...] = (),
        origin: str = "builtin",
    ) -> None:
        """Register `target` (an object or a lazy "module:attr" string) under `name`."""
        if self._frozen:
            raise RuntimeError(f"the {self.kind} registry is frozen; register before first use")
        key = name.lower()
        if key in self._entries and self._entries[key].target != target:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"lazy target must look like 'module:attr', got {target!r}")
        self._entries[key] = _Entry(target, summary, origin)
        for alias in aliases:
            self._aliases[alias.lower()] = key

    def register_prefix(self, prefix: str, factory: str | object, summary: str = "") -> None:
        """Resolve every name "`prefix`:<rest>" to `factory` called with <rest> first (a lazy "module:attr" or an
        object); e.g. tasks from another evaluation framework, named by that framework."""
        if self._frozen:
            raise RuntimeError(f"the {self.kind} registry is frozen; register before first use")
        key = prefix.lower().rstrip(":")
        if not key or ":" in key:
            raise ValueError(f"a prefix is a non-empty name without ':', got {prefix!r}")
        if key in self._prefixes and self._prefixes[key].target != factory:
            raise ValueError(f"{self.kind} prefix {prefix!r} is already registered")
        if isinstance(factory, str) and ":" not in factory:
            raise ValueError(f"lazy target must look like 'module:attr', got {factory!r}")
        self._prefixes[key] = _Entry(factory, summary, "builtin")

    def prefixes(self) -> dict[str, str]:
        """{prefix: summary} of the registered prefix factories."""
        return {p: e.summary for p, e in sorted(self._prefixes.items())}

    def _split_prefix(self, name: str) -> tuple[str, str] | None:
        """(prefix, rest) when `name` uses a registered prefix; the rest keeps its case (foreign names may care)."""
        head, sep, rest = name.strip().partition(":")
        if sep and head.lower() in self._prefixes:
            return head.lower(), rest.strip()
        return None

    def decorator(self, name: str, summary: str = "", aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            self.register(name, obj, summary, aliases)
            return obj

        return wrap

    def freeze(self) -> None:
        self._frozen = True

    # -- lookup ---------------------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or not self.entry_point_group:
            self._entry_points_loaded = True
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name.lower() in self._entries:
                continue  # built-ins win; a plugin cannot silently replace one
            dist = ep.dist.name if ep.dist is not None else "entry point"
            self._entries[ep.name.lower()] = _Entry(ep.value, f"(plugin from {dist})", dist)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        split = self._split_prefix(name)
        if split is not None:
            return bool(split[1])
        key = name.lower()
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def resolve_name(self, name: str) -> str:
        """Canonical name for `name` (or an alias); raises UnknownNameError with a did-you-mean."""
        self._load_entry_points()
        split = self._split_prefix(name)
        if split is not None:
            prefix, rest = split
            if not rest:
                raise UnknownNameError(f"{self.kind} {name!r} names no {prefix} {self.kind}: write {prefix}:<name>")
            return f"{prefix}:{rest}"
        key = name.strip().lower()
        if key in self._entries:
            return key
        if key in self._aliases:
            return self._aliases[key]
        candidates = list(self._entries) + list(self._aliases) + [f"{p}:" for p in self._prefixes]
        head, sep, _ = key.partition(":")
        if sep:  # an unknown prefix: compare prefixes only
            close = difflib.get_close_matches(head, list(self._prefixes), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c + ':') for c in close)}?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} prefix {head + ':'!r} in {name!r}.{hint} Known prefixes: "
                                   f"{', '.join(p + ':' for p in sorted(self._prefixes)) or 'none'}.")
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(sorted(self._entries))} "
            f"(see `harness ls {self.kind}s`)."
        )

    def get(self, name: str) -> T:
        """The registered object for `name`, importing it on first use (for a prefixed name: the prefix's factory
        with the rest of the name bound as its first argument)."""
        key = self.resolve_name(name)
        split = self._split_prefix(key)
        if split is not None:
            return functools.partial(_materialise(self._prefixes[split[0]]), split[1])  # type: ignore[return-value]
        return _materialise(self._entries[key])

    def _entry(self, name: str) -> _Entry:
        key = self.resolve_name(name)
        split = self._split_prefix(key)
        return self._prefixes[split[0]] if split is not None else self._entries[key]

    def summary(self, name: str) -> str:
        return self._entry(name).summary

    def origin(self, name: str) -> str:
        return self._entry(name).origin

    def aliases_of(self, name: str) -> list[str]:
        key = self.resolve_name(name)
        return sorted(a for a, k in self._aliases.items() if k == key)


def _materialise(entry: _Entry) -> object:
    """Import a lazy "module:attr" target once and keep the object."""
    if isinstance(entry.target, str):
        module_name, attr = entry.target.split(":", 1)
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        entry.target = obj
    return entry.target
