"""The manifest of a quantized checkpoint: its schema, its integrity hash, and whether its labels tell the truth.

A manifest is what a result row is labelled with (method, spec, execution, config), so an edited manifest
would be evaluated silently under a false label (a simulated run called "real", RTN called GPTQ). Three checks
stop that before any tensor is read:

* schema: every field the loader relies on is present with its JSON type (one line, not a traceback);
* integrity: ``manifest_sha256`` is the SHA-256 of the canonical JSON of every other field (sorted keys, no
  whitespace), and the manifest itself records the hashes of the tensor file and of every other file in the
  folder, so no byte of the checkpoint can change unnoticed. This guards against edits and corruption, not
  against someone who recomputes the hash: it is a checksum, not a signature;
* labels: the spec's bits (and activation scheme) and the execution are those of the stored modules, as their
  codecs read them from the per-module metadata; the method is a registered one that declares every stored
  module type (`Method.produces`), and the recorded config is valid for it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.methodconfig import MethodConfig
from qvlm_harness.quant.codec import ModuleCodec, ModuleFacts, codec_of

MANIFEST = "manifest.json"
FORMAT = "qvlm-harness-quantized/2"
HASH_FIELD = "manifest_sha256"
EXECUTIONS = ("float", "simulated", "real")
FIX = "re-run harness quantize"

# field -> JSON type; optional fields may also be null
_REQUIRED: dict[str, type] = {
    "format": str, "method": str, "spec": dict, "execution": str, "dtype": str, "modules": dict, "aliases": dict,
    "config": dict, "quantized_modules": list, "describe": str, "tensors_sha256": str, "files_sha256": dict,
    HASH_FIELD: str,
}
_OPTIONAL: dict[str, type] = {"report": dict, "search_cost": dict, "calibration": dict, "scope": list,
                              "versions": dict, "base_model": str, "base_fingerprint": str,
                              "online_transforms": dict}
_JSON_NAMES = {str: "a string", dict: "an object", list: "a list", int: "a number", bool: "true/false"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return next((n for t, n in _JSON_NAMES.items() if isinstance(value, t)), type(value).__name__)


# -- integrity ---------------------------------------------------------------------------------------------------------
def digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `manifest` without its own hash field."""
    body = {k: v for k, v in manifest.items() if k != HASH_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` as JSON will store it (non-JSON values as strings), with its ``manifest_sha256`` set."""
    plain = json.loads(json.dumps({k: v for k, v in manifest.items() if k != HASH_FIELD}, default=str))
    return plain | {HASH_FIELD: digest(plain)}


# -- schema ------------------------------------------------------------------------------------------------------------
def check_schema(manifest: Any, where: str) -> None:
    """One line for a manifest that is not an object, has another format, or lacks / mistypes a field."""
    if not isinstance(manifest, dict):
        raise HarnessError(f"{where} holds {_kind(manifest)}, not a manifest object; {FIX}")
    if manifest.get("format") != FORMAT:
        raise HarnessError(f"{where} has format {manifest.get('format')!r}, expected {FORMAT!r} (written by another "
                           f"version of the harness, or not by it); {FIX}")
    for key, kind in _REQUIRED.items():
        if key not in manifest:
            raise HarnessError(f"{where} has no field {key!r}; the checkpoint is incomplete or was edited: {FIX}")
        _check_type(manifest[key], kind, key, where)
    for key, kind in _OPTIONAL.items():
        if manifest.get(key) is not None:
            _check_type(manifest[key], kind, key, where)
    if manifest["execution"] not in EXECUTIONS:
        raise HarnessError(f"{where}: execution {manifest['execution']!r} is not one of {', '.join(EXECUTIONS)}; {FIX}")
    for fqn, entry in manifest["modules"].items():
        _check_entry(entry, f"modules.{fqn}", where)
    for key in ("aliases", "files_sha256"):
        bad = [k for k, v in manifest[key].items() if not isinstance(v, str)]
        if bad:
            raise HarnessError(f"{where}: {key}.{bad[0]} is {_kind(manifest[key][bad[0]])}, expected a string; {FIX}")


def _check_type(value: Any, kind: type, key: str, where: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HarnessError(f"{where}: field {key!r} is {_kind(value)}, expected {_JSON_NAMES[kind]}; {FIX}")


def _check_entry(entry: Any, key: str, where: str) -> None:
    _check_type(entry, dict, key, where)
    for sub, kind in (("type", str), ("meta", dict), ("children", dict)):
        if sub not in entry:
            raise HarnessError(f"{where}: {key} has no {sub!r}; {FIX}")
        _check_type(entry[sub], kind, f"{key}.{sub}", where)
    for child, sub_entry in entry["children"].items():
        _check_entry(sub_entry, f"{key}.children.{child}", where)


# -- the method, its module types and its config -----------------------------------------------------------------------
def method_class(name: str, where: str) -> type:
    """The registered method class a checkpoint names (a checkpoint only loads through the method that made it)."""
    from qvlm_harness import plugins

    if name not in plugins.methods:
        raise HarnessError(f"{where} was made by method {name!r}, which this harness does not have (known: "
                           f"{', '.join(plugins.methods.names())}); install its plugin or {FIX}")
    return plugins.methods.get(name)


def codecs_for(method_cls: type) -> dict[str, ModuleCodec]:
    """Codec name -> codec of every module type `method_cls` declares in `Method.produces`."""
    out: dict[str, ModuleCodec] = {}
    for cls in getattr(method_cls, "produces", ()):
        codec = codec_of(cls)
        if codec is None:
            raise HarnessError(f"method {method_cls.name} declares {cls.__name__} in Method.produces, but that type "
                               "has no codec (attach a ModuleCodec with qvlm_harness.quant.codec.attach_codec)")
        out[codec.name] = codec
    return out


def codec_named(codecs: dict[str, ModuleCodec], type_name: str, fqn: str, method: str) -> ModuleCodec:
    if type_name not in codecs:
        raise HarnessError(f"checkpoint module {fqn} has unknown type {type_name!r}: method {method} produces "
                           f"{', '.join(codecs) or 'no quantized modules'}; {FIX}")
    return codecs[type_name]


def stored_config(manifest: dict[str, Any], method_cls: type, where: str) -> MethodConfig:
    """The method's typed config rebuilt from the manifest's ``config`` (refused when it is not valid for the
    method, or was written by another version of the method's config)."""
    cfg = dict(manifest["config"])
    config_cls = method_cls.Config
    if cfg.get("version") != config_cls.VERSION:
        raise HarnessError(f"{where}: the {manifest['method']} config has version {cfg.get('version')!r}, this "
                           f"harness's is {config_cls.VERSION} (the options changed meaning); {FIX}")
    cfg.pop("version")
    try:
        config = config_cls.from_options(cfg, method=manifest["method"])
    except HarnessError as exc:
        raise HarnessError(f"{where}: recorded config is not valid ({exc}); {FIX}") from None
    if config.to_dict() != manifest["config"]:
        raise HarnessError(f"{where}: recorded config does not round-trip through {manifest['method']}'s options; "
                           f"{FIX}")
    return config


# -- labels against modules --------------------------------------------------------------------------------------------
def module_facts(modules: dict[str, dict], codecs: dict[str, ModuleCodec], method: str) -> dict[str, ModuleFacts]:
    """FQN -> facts of every leaf module (a wrapper without facts of its own contributes its children's)."""
    out: dict[str, ModuleFacts] = {}

    def walk(fqn: str, entry: dict) -> None:
        facts = codec_named(codecs, entry["type"], fqn, method).facts(entry["meta"])
        if facts is not None:
            out[fqn] = facts
            return
        for child, sub in entry["children"].items():
            walk(f"{fqn}.{child}", sub)

    for fqn, entry in modules.items():
        walk(fqn, entry)
    return out


def check_labels(spec: QuantSpec, execution: str, modules: dict[str, dict], codecs: dict[str, ModuleCodec],
                 method: str, where: str, fix: str = FIX) -> None:
    """Refuse a spec or execution that the stored modules contradict: every quantized module computes at the
    spec's bits (and activation scheme); "real" only when every module runs on real kernels, and then nothing
    else; "float" only without quantized modules."""
    facts = module_facts(modules, codecs, method)
    want = spec.to_dict()
    for fqn, f in facts.items():
        for key, value in f.spec.items():
            if want.get(key) != value:
                raise HarnessError(f"{where}: module {fqn} has {key}={value!r}, but the spec {spec.tag} says "
                                   f"{want.get(key)!r}; {fix}")
    real = bool(facts) and all(f.execution == "real" for f in facts.values())
    if execution == "real" and not real:
        sim = next((n for n, f in facts.items() if f.execution != "real"), None)
        because = f"module {sim} runs simulated" if sim else "no module is quantized"
        raise HarnessError(f"{where}: execution is 'real' but {because}; {fix}")
    if execution != "real" and real:
        raise HarnessError(f"{where}: execution is {execution!r} but every module runs on real kernels; {fix}")
    if execution == "float" and modules:
        raise HarnessError(f"{where}: execution is 'float' but {len(modules)} module(s) are quantized; {fix}")
