"""One generic registry for methods, tasks and models.

Entries are registered lazily as ``"module:attr"`` strings so that `harness ls` and argument validation never
import torch-heavy plugin modules. Third-party packages add entries through the entry-point groups
``qvlm_harness.methods``, ``qvlm_harness.tasks`` and ``qvlm_harness.models``. Unknown names fail with a
did-you-mean hint.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from harness.errors import UnknownNameError

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
        key = name.lower()
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def resolve_name(self, name: str) -> str:
        """Canonical name for `name` (or an alias); raises UnknownNameError with a did-you-mean."""
        self._load_entry_points()
        key = name.strip().lower()
        if key in self._entries:
            return key
        if key in self._aliases:
            return self._aliases[key]
        candidates = list(self._entries) + list(self._aliases)
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(sorted(self._entries))} "
            f"(see `harness ls {self.kind}s`)."
        )

    def get(self, name: str) -> T:
        """The registered object for `name`, importing it on first use."""
        key = self.resolve_name(name)
        entry = self._entries[key]
        if isinstance(entry.target, str):
            module_name, attr = entry.target.split(":", 1)
            module = importlib.import_module(module_name)
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
            entry.target = obj
        return entry.target  # type: ignore[return-value]

    def summary(self, name: str) -> str:
        return self._entries[self.resolve_name(name)].summary

    def origin(self, name: str) -> str:
        return self._entries[self.resolve_name(name)].origin

    def aliases_of(self, name: str) -> list[str]:
        key = self.resolve_name(name)
        return sorted(a for a, k in self._aliases.items() if k == key)
