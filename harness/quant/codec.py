"""Module codecs: how one quantized module type is written into a checkpoint and rebuilt from it.

A codec lives next to the module class it encodes (the shared types in this package, a method's own types in
the method's package) and is attached to that class as ``CODEC``; the checkpoint code keeps no table of module
types. A method says which types it produces (`Method.produces`), so a checkpoint's module types are resolved
through the method named in its manifest, and a module nobody can encode is refused when saving rather than
found missing when loading.

What a codec provides (see `ModuleCodec`): the module's JSON metadata, the tensors to store (integer codes and
scales, never a dequantized float copy), the rebuild from both, the facts the manifest's labels are checked
against (bits, simulated or real execution) and, for a type whose inference needs model-level wiring (a hook
on another module, state shared between layers), what to redo once every module of that type is loaded.
A wrapper type names its child modules (`children`); the checkpoint code encodes and rebuilds those with their
own codecs and hands them to the wrapper's `build`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import torch
from torch import Tensor, nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError

ModuleExecution = Literal["simulated", "real"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModuleFacts:
    """What a stored module fixes about the computation, checked against the manifest's `spec` and `execution`:
    `spec` holds the `QuantSpec` fields the module vouches for (e.g. ``{"w_bits": 4, "a_bits": 8}``), and
    `execution` is "real" only for a module that runs on real low-bit kernels (bitsandbytes, packed GEMMs)."""

    spec: dict[str, Any]
    execution: ModuleExecution = "simulated"


@dataclass
class StoredModule:
    """One module as read back from a checkpoint, for its codec's `build`: the codec's metadata, the module's own
    tensors (keys relative to the module; its children's tensors excluded) and its already rebuilt children."""

    name: str
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    children: dict[str, nn.Module] = field(default_factory=dict)

    def fail(self, problem: str) -> NoReturn:
        raise HarnessError(f"checkpoint module {self.name}: {problem}; the checkpoint is incomplete or was edited: "
                           "re-run harness quantize")

    def need(self, required: Iterable[str], optional: Iterable[str] = ()) -> None:
        """Refuse missing required tensors and tensors that are neither required nor optional."""
        required, optional = set(required), set(optional)
        missing = required - self.tensors.keys()
        extra = self.tensors.keys() - required - optional
        if missing or extra:
            self.fail(f"missing tensors {sorted(missing)}, unexpected {sorted(extra)}")

    def meta_field(self, key: str) -> Any:
        """A metadata field, or one line naming it when the manifest lacks it."""
        if key not in self.meta:
            self.fail(f"metadata has no {key!r}")
        return self.meta[key]

    def ints(self, *keys: str) -> tuple[int, ...]:
        """Integer metadata fields (one line for a missing or non-integer one)."""
        values = tuple(self.meta_field(k) for k in keys)
        for k, v in zip(keys, values, strict=True):
            if not isinstance(v, int) or isinstance(v, bool):
                self.fail(f"metadata {k!r} is {v!r}, expected an integer")
        return values

    def dtype(self, key: str = "dtype") -> torch.dtype:
        name = self.meta_field(key)
        if name not in DTYPES:
            self.fail(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
        return DTYPES[name]

    def shaped(self, key: str, shape: tuple[int, ...]) -> Tensor:
        t = self.tensors[key]
        if tuple(t.shape) != tuple(shape):
            self.fail(f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t


def own_state(module: nn.Module, children: Iterable[str] = ()) -> dict[str, Tensor]:
    """The module's state dict without its children's entries (the default tensors a codec stores)."""
    prefixes = tuple(f"{c}." for c in children)
    return {k: v for k, v in module.state_dict().items() if not k.startswith(prefixes)}


@dataclass(frozen=True)
class ModuleCodec:
    """How one module type (`cls`, matched exactly: a subclass needs its own codec) is saved and rebuilt.

    `name`: recorded per module in the manifest. `meta(module)`: JSON-able metadata. `tensors(module)`: what to
    store (keys relative to the module, children excluded); default: its own state dict. `build(stored)`: the
    module from a `StoredModule` (raise through `stored.fail` / `stored.need` on anything inconsistent).
    `facts(meta)`: the `ModuleFacts` of a stored module, or None for a wrapper whose facts are its children's.
    `children`: attribute names of child modules encoded with their own codecs. `on_load(model, modules)`: run
    once after loading, with every rebuilt module of this type (e.g. to re-install a hook they rely on).
    `build_packed(stored, backend)`: for a type that converts to packed kernels, the packed module built straight
    from the stored integer codes (no dequantized float weight is ever made), or None where this stored module
    cannot pack (it is then built by `build`); the loader of ``--execution packed`` uses it.
    """

    name: str
    cls: type[nn.Module]
    meta: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[StoredModule], nn.Module]
    facts: Callable[[dict[str, Any]], ModuleFacts | None]
    tensors: Callable[[nn.Module], dict[str, Tensor]] | None = None
    children: tuple[str, ...] = ()
    on_load: Callable[[nn.Module, list[nn.Module]], None] | None = None
    build_packed: Callable[[StoredModule, str], nn.Module | None] | None = None

    def stored_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        if self.tensors is not None:
            return self.tensors(module)
        return own_state(module, self.children)


def attach_codec(codec: ModuleCodec) -> ModuleCodec:
    """Make `codec` the one of `codec.cls` (as its ``CODEC`` class attribute) and return it."""
    codec.cls.CODEC = codec  # type: ignore[attr-defined]
    return codec


def codec_of(obj: nn.Module | type) -> ModuleCodec | None:
    """The codec of a module (or module class), or None: only the class's own ``CODEC`` counts, so a subclass
    with different arithmetic is never saved as its parent."""
    cls = obj if isinstance(obj, type) else type(obj)
    codec = vars(cls).get("CODEC")
    return codec if isinstance(codec, ModuleCodec) and codec.cls is cls else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def spec_facts(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """The `ModuleFacts.spec` of a module quantized with the spec `spec_dict` (`QuantSpec.to_dict()`): its weight
    and activation bits and, when activations are quantized, their scheme. Not the weight group size or symmetry:
    methods legitimately adapt those per layer (widths that are not a multiple of the group, AWQ's asymmetric
    format)."""
    keys = ["w_bits", "a_bits"]
    if spec_dict.get("a_bits", 16) < 16:
        keys += ["a_symmetric", "a_granularity", "a_dynamic"]
    return {k: spec_dict[k] for k in keys if k in spec_dict}


def spec_from_dict(d: Any, what: str) -> QuantSpec:
    """A `QuantSpec` from its stored `to_dict()` form (the derived ``tag`` ignored), or one line naming `what`."""
    if not isinstance(d, dict):
        raise HarnessError(f"{what}: spec is a {type(d).__name__}, expected an object; re-run harness quantize")
    try:
        return QuantSpec(**{k: v for k, v in d.items() if k != "tag"})
    except (TypeError, ValueError, HarnessError) as exc:
        raise HarnessError(f"{what}: invalid spec {d!r} ({str(exc).splitlines()[0]}); re-run harness quantize"
                           ) from None
