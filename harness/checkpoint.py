"""Quantized checkpoints: a self-contained folder that `harness eval --model DIR` evaluates without re-quantizing.

Layout: ``config.json`` (+ generation config) and the processor files, as `save_pretrained` writes them, so the
model skeleton and the prompts are rebuilt from the folder alone; ``model.safetensors`` with every tensor
(quantized layers store what their codec stores: integer codes and scales, never a dequantized float copy);
``manifest.json``: method, spec, execution, the method's canonical config, scope, base model id and fingerprint,
calibration, search cost, per-module type and metadata, tensor aliases (tied weights), the SHA-256 of the tensor
file and of every other file, package versions, `describe()`, and the hash of the manifest itself (see
`qvlm_harness.manifest`).

Which module types can be saved is decided by their codecs (`qvlm_harness.quant.codec`), declared by the method
that produces them (`Method.produces`): saving refuses, in one line, a module whose type has no codec or that the
method does not declare, and any module that differs from the plain Llava model built from the config without a
codec to say how (it would otherwise load back as the plain module). Loading resolves the codecs through the
method the manifest names.

`load_quantized(folder, packed=True)` (what `harness eval --execution packed` uses) builds every quantized linear
straight as its packed module from the stored codes on a meta-device skeleton (`qvlm_harness.packed_load`), for
methods whose modules pack; the token embedding and LM head, when quantized (`--quantize-embeddings`), are saved
and loaded through the engine's own codecs (`qvlm_harness.kernels.embedding.engine_codecs`), whatever the method.

Loading is strict: an edited manifest or file, a label the modules contradict, an unknown module type, a missing
or extra tensor or a shape mismatch raises `HarnessError`; a checkpoint never loads silently as a float model.
Float model folders are loaded strictly too (`load_float`): transformers would initialise missing weights randomly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.embedding import engine_codecs
from qvlm_harness.manifest import (
    FIX,
    FORMAT,
    HASH_FIELD,
    MANIFEST,
    check_labels,
    check_schema,
    codec_named,
    codecs_for,
    digest,
    method_class,
    seal,
    stored_config,
)
from qvlm_harness.method import Method, QuantizedModel, SearchCost
from qvlm_harness.quant.codec import DTYPES, ModuleCodec, StoredModule, codec_of, spec_from_dict
from qvlm_harness.quant.online import OnlineHadamard, attach_online_transform, online_transforms

TENSORS = "model.safetensors"


# -- encoding modules ------------------------------------------------------------------------------------------------
def _skeleton_types(config) -> dict[str, type]:
    """Module path -> type of the plain Llava model `config` builds (on the meta device: no memory, no init)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)
    return {name: type(m) for name, m in skeleton.named_modules()}


def _encode(fqn: str, module: nn.Module, codecs: dict[str, ModuleCodec], method: str) -> tuple[dict, dict]:
    """(manifest entry, tensors keyed relative to the module) of one quantized module and its children."""
    codec = codec_of(module)
    if codec is None:
        raise HarnessError(f"cannot save module {fqn} ({type(module).__name__}): no codec encodes this type; give it "
                           f"a ModuleCodec and list it in {method}'s Method.produces")
    if codecs.get(codec.name) is not codec:
        raise HarnessError(f"cannot save module {fqn} ({codec.name}): method {method} does not list "
                           f"{codec.cls.__name__} in Method.produces (it lists {', '.join(codecs) or 'nothing'})")
    tensors = dict(codec.stored_tensors(module))
    children = {}
    for child in codec.children:
        sub = getattr(module, child, None)
        if not isinstance(sub, nn.Module):
            raise HarnessError(f"cannot save module {fqn} ({codec.name}): its child {child!r} is missing")
        children[child], sub_tensors = _encode(f"{fqn}.{child}", sub, codecs, method)
        tensors |= {f"{child}.{k}": v for k, v in sub_tensors.items()}
    return {"type": codec.name, "meta": codec.meta(module), "children": children}, tensors


def encode_model(model: nn.Module, codecs: dict[str, ModuleCodec], method: str
                 ) -> tuple[dict[str, dict], dict[str, Tensor], dict[str, str]]:
    """(module entries, tensors, aliases) of `model`: every module the plain Llava skeleton does not have (or has
    with another type) must be encoded by one of `codecs`; the rest is the skeleton's own state. Tensors sharing
    storage (tied weights) are stored once, the others recorded as aliases."""
    skeleton = _skeleton_types(model.config)
    modules: dict[str, dict] = {}
    tensors: dict[str, Tensor] = {}
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in covered):
            continue
        if codec_of(module) is None:
            expected = skeleton.get(name)
            if expected is type(module):
                continue
            where = (f"where the Llava model has a {expected.__name__}" if expected is not None
                     else "which the Llava model does not have")
            raise HarnessError(f"cannot save module {name} ({type(module).__name__}): no codec encodes this type, "
                               f"{where}; give it a ModuleCodec and list it in {method}'s Method.produces")
        modules[name], own = _encode(name, module, codecs, method)
        covered.append(name)
        tensors |= {f"{name}.{k}": v for k, v in own.items()}
    for key, t in model.state_dict().items():
        if not any(key.startswith(p + ".") for p in covered):
            tensors[key] = t
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for key, t in tensors.items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in by_storage:
            aliases[key] = by_storage[ident]
            continue
        if ident is not None:
            by_storage[ident] = key
        stored[key] = t.detach().cpu().contiguous().clone()
    return modules, stored, aliases


# -- files and hashes --------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _other_files(folder: Path) -> list[Path]:
    """The folder's files besides the manifest and the tensors (config, processor...); hidden files are ignored."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in (MANIFEST, TENSORS))


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "safetensors", "bitsandbytes", "qvlm-harness"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> outermost module with a codec (a LoRC wrapper hides its inner QLinear)."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if codec_of(m) is not None and not any(name.startswith(p + ".") for p in found):
            found[name] = m
    return found


# -- save --------------------------------------------------------------------------------------------------------------
def save_quantized(qm: QuantizedModel, folder: Path | str, *, describe: str, base_model: str,
                   fingerprint: str, scope: Sequence[str], calibration: dict | None = None) -> Path:
    """Write `qm` (its adapter's model and processor) as a self-contained quantized checkpoint folder.

    Refused before anything is written: a module nobody can encode, a module type the method does not declare,
    and a result whose spec, execution or config its modules contradict (what saves, loads)."""
    from safetensors.torch import save_file

    where = f"cannot save {qm.method} {qm.spec.tag}"
    method_cls = method_class(qm.method, where)
    codecs = codecs_for(method_cls) | engine_codecs()
    model = qm.adapter.model
    modules, tensors, aliases = encode_model(model, codecs, qm.method)
    fix = "the method's result contradicts its own modules (a bug in the method)"
    check_labels(qm.spec, qm.execution, modules, codecs, qm.method, where, fix)
    stored_config({"method": qm.method, "config": qm.config}, method_cls, where)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TENSORS
    save_file(tensors, str(path))
    model.config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    qm.adapter.processor.save_pretrained(folder)
    manifest = seal({
        "format": FORMAT, "method": qm.method, "spec": qm.spec.to_dict(), "execution": qm.execution,
        "scope": list(scope), "base_model": base_model, "base_fingerprint": fingerprint,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "calibration": calibration, "describe": describe, "report": qm.report,
        "quantized_modules": list(qm.quantized_modules),
        "config": qm.config,
        "search_cost": qm.search_cost.to_dict(),
        "modules": modules, "aliases": aliases,
        "online_transforms": {fqn: t.to_dict() for fqn, t in online_transforms(model).items()},
        "tensors_sha256": _sha256(path), "files_sha256": {p.name: _sha256(p) for p in _other_files(folder)},
        "versions": _versions(),
    })
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return folder


# -- reading the manifest ----------------------------------------------------------------------------------------------
def is_checkpoint(path: str | Path) -> bool:
    """True when `path` is a folder with a manifest (valid or not: `read_manifest` says which)."""
    return (Path(str(path)).expanduser() / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict | None:
    """The verified manifest of a quantized checkpoint folder, or None when `path` is not one.

    Everything that does not need the tensors is checked here, so the planner refuses an edited checkpoint
    before any model loads: schema, the manifest's own hash, the other files' hashes, the method and its module
    types, the recorded config, and the spec / execution against the stored modules."""
    folder = Path(str(path)).expanduser()
    f = folder / MANIFEST
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{f} is not valid JSON ({exc}); {FIX}") from None
    check_schema(manifest, str(f))
    if digest(manifest) != manifest[HASH_FIELD]:
        raise HarnessError(f"{f} was edited after harness quantize wrote it (its content does not match its "
                           f"{HASH_FIELD}); {FIX}")
    _check_files(folder, manifest)
    where = f"checkpoint {folder}"
    method_cls = method_class(manifest["method"], where)
    codecs = codecs_for(method_cls) | engine_codecs()
    spec = spec_from_dict(manifest["spec"], where)
    if spec.to_dict() != manifest["spec"]:
        raise HarnessError(f"{where}: spec {manifest['spec']!r} is not in canonical form; {FIX}")
    if manifest["dtype"] not in DTYPES:
        raise HarnessError(f"{where}: dtype {manifest['dtype']!r} is not one of {', '.join(DTYPES)}; {FIX}")
    check_labels(spec, manifest["execution"], manifest["modules"], codecs, manifest["method"], where)
    stored_config(manifest, method_cls, where)
    return manifest


def _check_files(folder: Path, manifest: dict) -> None:
    recorded = manifest["files_sha256"]
    for name, sha in recorded.items():
        p = folder / name
        if Path(name).name != name or not p.is_file():
            raise HarnessError(f"{folder}: {name} is missing; the checkpoint is incomplete: {FIX}")
        if _sha256(p) != sha:
            raise HarnessError(f"{p} does not match the hash in {MANIFEST} (corrupt or edited); {FIX}")
    extra = [p.name for p in _other_files(folder) if p.name not in recorded]
    if extra:
        raise HarnessError(f"{folder}: {extra[0]} is not part of the checkpoint harness quantize wrote (the folder "
                           f"was edited; it could change how the model loads): remove it or {FIX}")


# -- load --------------------------------------------------------------------------------------------------------------
def _decode(fqn: str, entry: dict, tensors: dict[str, Tensor], codecs: dict[str, ModuleCodec], method: str,
            built: dict[str, list[nn.Module]], *, backend: str | None = None) -> nn.Module:
    """Rebuild one module (children first) from its entry and its tensors (keys relative to the module); with a
    kernel `backend`, as its packed module where its codec can build one (`ModuleCodec.build_packed`)."""
    codec = codec_named(codecs, entry["type"], fqn, method)
    unknown = set(entry["children"]) - set(codec.children)
    if unknown:
        raise HarnessError(f"checkpoint module {fqn} ({codec.name}) has unknown children {sorted(unknown)}; {FIX}")
    children: dict[str, nn.Module] = {}
    for child in codec.children:
        if child not in entry["children"]:
            raise HarnessError(f"checkpoint module {fqn} ({codec.name}) lacks its child {child!r}; {FIX}")
        prefix = child + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        children[child] = _decode(f"{fqn}.{child}", entry["children"][child], sub, codecs, method, built,
                                  backend=backend)
    prefixes = tuple(c + "." for c in codec.children)
    own = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    stored = StoredModule(fqn, entry["meta"], own, children)
    if backend is not None and codec.build_packed is not None:
        packed = codec.build_packed(stored, backend)
        if packed is not None:
            return packed
    module = codec.build(stored)
    if type(module) is not codec.cls:
        raise HarnessError(f"the {codec.name} codec built a {type(module).__name__} for {fqn}")
    built.setdefault(codec.name, []).append(module)
    return module


def check_finite(tensors: dict[str, Tensor], modules: dict[str, dict], folder: Path) -> None:
    """Every floating-point tensor of a quantized module (scales, zero points, biases, float parts) is finite: a
    NaN scale makes its layer's output NaN, which would otherwise surface during evaluation as NaN activations and
    be blamed on the inputs or the calibration, not on the checkpoint that holds it."""
    prefixes = tuple(f"{fqn}." for fqn in modules)
    for key, t in tensors.items():
        if key.startswith(prefixes) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise HarnessError(f"checkpoint {folder}: tensor {key} holds {kind} (a corrupt quantized checkpoint, "
                               f"not an input or calibration problem); {FIX}")


def load_quantized(folder: str | Path, *, device: str = "cpu", name: str | None = None, packed: bool = False,
                   backend: str = "auto"):
    """(LlavaAdapter with the quantized model, manifest). Strict: see the module docstring.

    `packed` (the checkpoint of a method whose modules pack, `Method.packs`): every quantized linear is built
    straight as its packed module from the stored codes, on a meta-device skeleton (`qvlm_harness.packed_load`),
    so no float weight of a quantized layer is ever made; other checkpoints load fake-quant as without it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from qvlm_harness.models.folder import load_processor
    from qvlm_harness.models.llava import LlavaAdapter
    from qvlm_harness.quant.apply import _set_submodule

    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    if manifest is None:
        raise HarnessError(f"{folder} is not a quantized checkpoint (no {MANIFEST}); create one with "
                           "`harness quantize ... --output DIR`")
    path = folder / TENSORS
    if not path.is_file():
        raise HarnessError(f"{path} is missing; the checkpoint is incomplete: {FIX}")
    if _sha256(path) != manifest["tensors_sha256"]:
        raise HarnessError(f"{path} does not match the hash in {MANIFEST} (corrupt or edited); {FIX}")
    processor = load_processor(folder)
    if packed and method_class(manifest["method"], f"checkpoint {folder}").packs:
        from qvlm_harness.packed_load import load_packed_model

        model = load_packed_model(folder, manifest, path, backend).to(device)
        return LlavaAdapter(model, processor, name or folder.name, path=str(folder)), manifest
    tensors = load_file(str(path))
    check_finite(tensors, manifest["modules"], folder)
    for alias, target in manifest["aliases"].items():
        if target not in tensors:
            raise HarnessError(f"checkpoint alias {alias} -> {target}: target tensor missing; {FIX}")
        tensors[alias] = tensors[target]
    method = manifest["method"]
    codecs = codecs_for(method_class(method, f"checkpoint {folder}")) | engine_codecs()
    config = AutoConfig.from_pretrained(folder)
    model = LlavaForConditionalGeneration(config).to(DTYPES[manifest["dtype"]]).eval()
    consumed: set[str] = set()
    built: dict[str, list[nn.Module]] = {}
    for fqn, entry in manifest["modules"].items():
        try:
            model.get_submodule(fqn)
        except AttributeError:
            raise HarnessError(f"checkpoint module {fqn} does not exist in the model built from config.json") from None
        sub = {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".")}
        consumed |= {f"{fqn}.{k}" for k in sub}
        _set_submodule(model, fqn, _decode(fqn, entry, sub, codecs, method, built))
    rest = {k: v for k, v in tensors.items() if k not in consumed}
    quantized = tuple(f"{q}." for q in manifest["modules"])
    expected = {k for k in model.state_dict() if not k.startswith(quantized)}
    missing, unexpected = expected - rest.keys(), rest.keys() - expected
    if missing or unexpected:
        raise HarnessError(f"checkpoint tensors do not match the model: missing {sorted(missing)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}; {FIX}")
    try:
        model.load_state_dict(rest, strict=False)
    except RuntimeError as exc:
        raise HarnessError(f"checkpoint tensors do not fit the model ({str(exc).splitlines()[0]}); {FIX}") from None
    for codec_name, modules in built.items():
        if codecs[codec_name].on_load is not None:
            codecs[codec_name].on_load(model, modules)
    attach_stored_transforms(model, manifest.get("online_transforms") or {}, folder)
    model.to(device)
    return LlavaAdapter(model, processor, name or folder.name, path=str(folder)), manifest


def attach_stored_transforms(model: nn.Module, stored: dict, folder: Path) -> None:
    """Re-attach the online input transforms (a rotation's Hadamards) a checkpoint records by module name: its
    weights have their matrices folded in, so without them it would load as a different function."""
    for fqn, entry in stored.items():
        where = f"checkpoint {folder}: online transform of {fqn}"
        t = OnlineHadamard.from_dict(entry, where)
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            raise HarnessError(f"{where}: the model has no such module; {FIX}") from None
        width = getattr(module, "in_features", None)
        if width is not None and int(width) != t.width:
            raise HarnessError(f"{where}: width {t.width} does not fit the module's input width {width}; {FIX}")
        attach_online_transform(module, t)


def load_float(path: str | Path, *, dtype: str = "fp32", device: str = "cpu", name: str | None = None):
    """A float Llava model. A local folder is checked from its files first (config, weights, tokenizer; see
    `qvlm_harness.models.folder`), its processor built before the weights, and the weights load strictly: a
    tensor the model expects and the folder lacks (transformers would initialise it randomly), a tensor the model
    has no place for, or a shape mismatch is refused in one line. A hub id loads as `LlavaAdapter.load` does."""
    from safetensors import SafetensorError
    from transformers import LlavaForConditionalGeneration

    from qvlm_harness.models.folder import RECREATE, check_model_folder, load_processor, short
    from qvlm_harness.models.llava import LlavaAdapter, _dtype

    folder = Path(str(path)).expanduser()
    if not (folder / "config.json").is_file():
        return LlavaAdapter.load(path, dtype=dtype, device=device, name=name)  # hub id, or its one-line error
    check_model_folder(folder)
    processor = load_processor(folder)
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=_dtype(dtype),
                                                                    output_loading_info=True)
    except RuntimeError as exc:  # transformers raises on shape mismatches
        raise HarnessError(f"{folder}: the weights do not fit the model in config.json "
                           f"({str(exc).splitlines()[-1].strip()}); re-create the model folder") from None
    except (OSError, ValueError, SafetensorError) as exc:
        raise HarnessError(f"the weights of {folder} cannot be loaded ({short(exc)}); {RECREATE}") from None
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected or info["mismatched_keys"]:
        problems = ([f"{len(missing)} missing tensor(s) (e.g. {missing[0]}; they would be initialised randomly)"]
                    if missing else []) + ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected
                                           else []) + (["shape mismatches"] if info["mismatched_keys"] else [])
        raise HarnessError(f"{folder}: the weights do not match the model in config.json: {', '.join(problems)}; "
                           "the folder is incomplete or was edited: re-create it")
    model.to(device)
    return LlavaAdapter(model, processor, name or folder.name, path=str(folder))


def load_adapter(path: str, *, dtype: str = "fp32", device: str = "cpu", name: str | None = None,
                 packed: bool = False):
    """A model for the runner: a quantized checkpoint folder as stored (straight into packed modules with
    `packed`, see `load_quantized`), anything else through `load_float`."""
    if read_manifest(path) is not None:
        return load_quantized(path, device=device, name=name, packed=packed)[0]
    return load_float(path, dtype=dtype, device=device, name=name)


class StoredQuantization(Method):
    """Pass-through method for a quantized checkpoint: the model is already quantized, `quantize` only labels it
    with the manifest's method, spec, execution, config and (original) search cost. `config` is the typed config
    of the method that made the checkpoint, rebuilt from the manifest."""

    fixed_precision = False

    def __init__(self, manifest: dict, path: str, **options: Any):
        super().__init__(**options)
        self.manifest = manifest
        self.path = path
        self.name = manifest["method"]
        where = f"checkpoint {path}"
        self.spec: QuantSpec = spec_from_dict(manifest["spec"], where)
        self.method_cls = method_class(self.name, where)
        self.config = stored_config(manifest, self.method_cls, where)

    def computed_spec(self, spec: QuantSpec) -> QuantSpec:  # type: ignore[override]
        """The activations the stored method ran for its spec (its own default for a bare bit-width)."""
        return self.method_cls.computed_spec(spec)

    def identity(self) -> dict[str, Any]:
        """The stored method's config (the checkpoint's contents are the model's content fingerprint)."""
        return {"method": self.name, "config": self.config.to_dict()}

    def supports(self, spec: QuantSpec) -> str | None:
        return None if spec == self.spec else f"the checkpoint holds {self.spec.tag}, not {spec.tag}"

    def quantize(self, adapter, calibration, spec, scope=()) -> QuantizedModel:
        cost = SearchCost.from_dict(self.manifest.get("search_cost"))
        report = dict(self.manifest.get("report") or {}) | {"checkpoint": self.path,
                                                             "base_model": self.manifest.get("base_model")}
        return QuantizedModel(adapter, self.name, self.spec, self.manifest["execution"],
                              list(self.manifest.get("quantized_modules", [])), cost, report, self.config.to_dict())

    def describe(self, spec: QuantSpec) -> str:
        return f"{self.manifest['describe']} [loaded from the quantized checkpoint {self.path}]"
