"""Quantized checkpoints: a self-contained folder that `harness eval --model DIR` evaluates without re-quantizing.

Layout: ``config.json`` (+ generation config) and the processor files, as `save_pretrained` writes them, so the
model skeleton and the prompts are rebuilt from the folder alone; ``model.safetensors`` with every tensor
(quantized layers store their integer codes and scales, never a dequantized float copy); ``manifest.json``:
method, spec, execution, scope, base model id and fingerprint, calibration, search cost, per-module type and
metadata, tensor aliases (tied weights), the SHA-256 of the tensor file, package versions and `describe()`.

Loading is strict: an unknown module type, a missing or extra tensor, a shape mismatch or a tensor file that
does not match its recorded hash raises `HarnessError`; a checkpoint never loads silently as a float model.

Quantized module types are registered in `MODULE_TYPES` (name -> `ModuleCodec`); another method adds its own
module with `register_module_type`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import Method, QuantizedModel, SearchCost

MANIFEST = "manifest.json"
TENSORS = "model.safetensors"
FORMAT = "qvlm-harness-quantized/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModuleCodec:
    """How one quantized module type is saved and rebuilt.

    `meta(module)` -> JSON-able dict; `exclude(module)` -> state-dict keys not to store (recomputed on load);
    `build(meta, tensors)` -> the module, from the stored tensors (keys relative to the module).
    """

    cls: type
    meta: Callable[[nn.Module], dict]
    build: Callable[[dict, dict[str, Tensor]], nn.Module]
    exclude: Callable[[nn.Module], set[str]] = lambda m: set()


MODULE_TYPES: dict[str, ModuleCodec] = {}


def register_module_type(name: str, codec: ModuleCodec) -> None:
    MODULE_TYPES[name] = codec


def _type_name(module: nn.Module) -> str | None:
    for name, codec in MODULE_TYPES.items():
        if type(module) is codec.cls:
            return name
    return None


def _need(tensors: dict[str, Tensor], keys: set[str], optional: set[str], what: str) -> None:
    missing = keys - tensors.keys()
    extra = tensors.keys() - keys - optional
    if missing or extra:
        raise HarnessError(f"checkpoint module {what}: missing tensors {sorted(missing)}, unexpected "
                           f"{sorted(extra)}; the checkpoint is incomplete or was edited: re-run harness quantize")


# -- QLinear ------------------------------------------------------------------------------------------------------
def _qlinear_meta(m) -> dict:
    return {"in": m.in_features, "out": m.out_features, "spec": m.spec.to_dict(), "group": m.w_qgroup,
            "name": m.name, "dtype": str(m.weight.dtype).replace("torch.", "")}


def _spec(d: dict) -> QuantSpec:
    return QuantSpec(**{k: v for k, v in d.items() if k != "tag"})


def _qlinear_build(meta: dict, t: dict[str, Tensor]) -> nn.Module:
    from qvlm_harness.quant.qlinear import QLinear
    from qvlm_harness.quant.quantizer import QParams

    spec = _spec(meta["spec"])
    dtype = _DTYPES[meta["dtype"]]
    opt = {"bias", "a_scale", "a_zero"}
    what = meta.get("name", "QLinear")
    if spec.quantizes_weights:
        _need(t, {"codes", "w_scale", "w_zero"}, opt, what)
        qp = QParams(t["w_scale"].float(), t["w_zero"].to(torch.int32), spec.w_bits, spec.w_symmetric, meta["group"])
        try:
            m = QLinear.from_codes(t["codes"], qp, t.get("bias"), spec, in_features=meta["in"],
                                   out_features=meta["out"], dtype=dtype, name=meta.get("name", ""))
        except (ValueError, RuntimeError) as exc:
            raise HarnessError(f"checkpoint module {what}: {exc}; re-run harness quantize") from None
    else:
        _need(t, {"weight"}, opt, what)
        m = QLinear(meta["in"], meta["out"], spec, weight=t["weight"].to(dtype), bias=t.get("bias"),
                    name=meta.get("name", ""))
    if "a_scale" in t:
        m.a_scale, m.a_zero = t["a_scale"].float(), t["a_zero"].to(torch.int32)
    return m


def _qlinear_exclude(m) -> set[str]:
    return {"weight"} if m.codes is not None else set()


# -- NFLinear -----------------------------------------------------------------------------------------------------
def _nf_meta(m) -> dict:
    return {"in": m.in_features, "out": m.out_features, "bits": m.bits, "blocksize": m.blocksize,
            "blocksize2": m.blocksize2, "double_quant": m.double_quant, "backend": m.backend,
            "spec": m.spec.to_dict(), "name": m.name,
            "dtype": str(m.weight.dtype if m.weight is not None else torch.float32).replace("torch.", "")}


def _nf_build(meta: dict, t: dict[str, Tensor]) -> nn.Module:
    from qvlm_harness.quant.nf4 import NFState, bnb_available, unpack_4bit
    from qvlm_harness.quant.nflinear import NFLinear

    what = meta.get("name", "NFLinear")
    stats = {"absmax_q", "absmax2", "code2", "offset"} if meta["double_quant"] else {"absmax"}
    _need(t, {"qweight"} | stats, {"bias", "a_scale", "a_zero"}, what)
    numel = meta["in"] * meta["out"]
    q = t["qweight"]
    expect = (numel + 1) // 2 if meta["bits"] == 4 else numel
    if q.numel() != expect:
        raise HarnessError(f"checkpoint module {what}: qweight has {q.numel()} bytes, expected {expect}")
    codes = unpack_4bit(q, numel) if meta["bits"] == 4 else q
    st = NFState((meta["out"], meta["in"]), meta["bits"], meta["blocksize"], codes, blocksize2=meta["blocksize2"])
    if meta["double_quant"]:
        st.absmax_q, st.absmax2, st.code2, st.offset = t["absmax_q"], t["absmax2"], t["code2"], t["offset"]
    else:
        st.absmax = t["absmax"]
    if meta["backend"] == "bnb" and not bnb_available():
        raise HarnessError("this checkpoint runs NF4 layers through bitsandbytes, which is not installed: "
                           "pip install 'qvlm-harness[bnb]'")
    m = NFLinear(st, t.get("bias"), _spec(meta["spec"]), name=meta.get("name", ""), backend=meta["backend"],
                 dtype=_DTYPES[meta["dtype"]])
    if "a_scale" in t:
        m.a_scale, m.a_zero = t["a_scale"].float(), t["a_zero"].to(torch.int32)
    return m


# -- LoRCLinear ---------------------------------------------------------------------------------------------------
def _lorc_meta(m) -> dict:
    inner = _type_name(m.qlinear)
    if inner is None:
        raise HarnessError(f"cannot save a LoRC layer wrapping an unregistered {type(m.qlinear).__name__}")
    return {"rank": m.rank, "bits": m.bits, "in": m.in_features, "out": m.out_features, "name": m.name,
            "inner": {"type": inner, "meta": MODULE_TYPES[inner].meta(m.qlinear)}}


def _lorc_build(meta: dict, t: dict[str, Tensor]) -> nn.Module:
    from qvlm_harness.quant.lorc import LoRCLinear

    inner_t = {k[len("qlinear."):]: v for k, v in t.items() if k.startswith("qlinear.")}
    own = {k: v for k, v in t.items() if not k.startswith("qlinear.")}
    inner_type = meta["inner"]["type"]
    if inner_type not in MODULE_TYPES:
        raise HarnessError(f"checkpoint uses an unknown quantized module type {inner_type!r}")
    inner = MODULE_TYPES[inner_type].build(meta["inner"]["meta"], inner_t)
    r, o, i = meta["rank"], meta["out"], meta["in"]
    what = meta.get("name", "LoRCLinear")
    if meta["bits"] < 16:
        _need(own, {"u_codes", "u_scale", "v_codes", "v_scale"}, set(), what)
        m = LoRCLinear(inner, torch.zeros(o, r), torch.zeros(r, i), meta["bits"], name=meta.get("name", ""))
        for k in ("u_codes", "u_scale", "v_codes", "v_scale"):
            if tuple(own[k].shape) != tuple(getattr(m, k).shape):
                raise HarnessError(f"checkpoint module {what}: {k} has shape {tuple(own[k].shape)}")
            setattr(m, k, own[k].to(getattr(m, k).dtype))
        m.refresh()
    else:
        _need(own, {"u", "v"}, set(), what)
        m = LoRCLinear(inner, own["u"], own["v"], 16, name=meta.get("name", ""))
    return m


def _lorc_exclude(m) -> set[str]:
    return {f"qlinear.{k}" for k in MODULE_TYPES[_type_name(m.qlinear)].exclude(m.qlinear)}


def _register_builtins() -> None:
    from qvlm_harness.quant.lorc import LoRCLinear
    from qvlm_harness.quant.nflinear import NFLinear
    from qvlm_harness.quant.qlinear import QLinear

    register_module_type("QLinear", ModuleCodec(QLinear, _qlinear_meta, _qlinear_build, _qlinear_exclude))
    register_module_type("NFLinear", ModuleCodec(NFLinear, _nf_meta, _nf_build))
    register_module_type("LoRCLinear", ModuleCodec(LoRCLinear, _lorc_meta, _lorc_build, _lorc_exclude))


_register_builtins()


# -- save / load ---------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "safetensors", "bitsandbytes", "qvlm-harness"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> outermost registered quantized module (a LoRC wrapper hides its inner QLinear)."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if _type_name(m) is not None and not any(name.startswith(p + ".") for p in found):
            found[name] = m
    return found


def save_quantized(qm: QuantizedModel, folder: Path | str, *, describe: str, base_model: str,
                   fingerprint: str, scope, calibration: dict | None = None) -> Path:
    """Write `qm` (its adapter's model and processor) as a self-contained quantized checkpoint folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = qm.adapter.model
    mods = quantized_modules(model)
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple, str] = {}
    skip: set[str] = set()
    for fqn, m in mods.items():
        skip |= {f"{fqn}.{k}" for k in MODULE_TYPES[_type_name(m)].exclude(m)}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in by_ptr:
            aliases[key] = by_ptr[ident]
            continue
        if ident is not None:
            by_ptr[ident] = key
        tensors[key] = t.detach().cpu().contiguous().clone()
    path = folder / TENSORS
    save_file(tensors, str(path))
    model.config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    qm.adapter.processor.save_pretrained(folder)
    manifest = {
        "format": FORMAT, "method": qm.method, "spec": qm.spec.to_dict(), "execution": qm.execution,
        "scope": list(scope), "base_model": base_model, "base_fingerprint": fingerprint,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "calibration": calibration, "describe": describe, "report": qm.report,
        "quantized_modules": list(qm.quantized_modules),
        "config": qm.config,
        "search_cost": qm.search_cost.to_dict(),
        "modules": {fqn: {"type": _type_name(m), "meta": MODULE_TYPES[_type_name(m)].meta(m)}
                    for fqn, m in mods.items()},
        "aliases": aliases, "tensors_sha256": _sha256(path), "versions": _versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return folder


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a quantized checkpoint folder, or None when `path` is not one."""
    p = Path(str(path)).expanduser()
    f = p / MANIFEST
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{f} is not valid JSON ({exc}); re-run harness quantize") from None
    if manifest.get("format") != FORMAT:
        raise HarnessError(f"{f} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_quantized(folder: str | Path, *, device: str = "cpu", name: str | None = None):
    """(LlavaAdapter with the quantized model, manifest). Strict: see the module docstring."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from qvlm_harness.models.llava import LlavaAdapter
    from qvlm_harness.quant.apply import _set_submodule

    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    if manifest is None:
        raise HarnessError(f"{folder} is not a quantized checkpoint (no {MANIFEST}); create one with "
                           "`harness quantize ... --output DIR`")
    path = folder / TENSORS
    if not path.is_file():
        raise HarnessError(f"{path} is missing; the checkpoint is incomplete: re-run harness quantize")
    if _sha256(path) != manifest["tensors_sha256"]:
        raise HarnessError(f"{path} does not match the hash in {MANIFEST} (corrupt or edited); re-run harness "
                           "quantize")
    tensors = load_file(str(path))
    config = AutoConfig.from_pretrained(folder)
    model = LlavaForConditionalGeneration(config).to(_DTYPES.get(manifest["dtype"], torch.float32)).eval()
    consumed: set[str] = set()
    for fqn, entry in manifest["modules"].items():
        if entry["type"] not in MODULE_TYPES:
            raise HarnessError(f"checkpoint module {fqn} has unknown type {entry['type']!r}; this harness knows "
                               f"{', '.join(MODULE_TYPES)}")
        try:
            model.get_submodule(fqn)
        except AttributeError:
            raise HarnessError(f"checkpoint module {fqn} does not exist in the model built from config.json") from None
        sub = {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".")}
        consumed |= {f"{fqn}.{k}" for k in sub}
        _set_submodule(model, fqn, MODULE_TYPES[entry["type"]].build(entry["meta"], sub))
    rest = {k: v for k, v in tensors.items() if k not in consumed}
    for alias, target in manifest.get("aliases", {}).items():
        if target not in tensors:
            raise HarnessError(f"checkpoint alias {alias} -> {target}: target tensor missing; re-run harness quantize")
        rest[alias] = tensors[target]
    quantized = list(manifest["modules"])
    expected = {k for k in model.state_dict() if not any(k.startswith(q + ".") for q in quantized)}
    missing, unexpected = expected - rest.keys(), rest.keys() - expected
    if missing or unexpected:
        raise HarnessError(f"checkpoint tensors do not match the model: missing {sorted(missing)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}; re-run harness quantize")
    try:
        model.load_state_dict(rest, strict=False)
    except RuntimeError as exc:
        raise HarnessError(f"checkpoint tensors do not fit the model ({str(exc).splitlines()[0]}); re-run "
                           "harness quantize") from None
    model.to(device)
    processor = AutoProcessor.from_pretrained(folder)
    return LlavaAdapter(model, processor, name or folder.name, path=str(folder)), manifest


def load_adapter(path: str, *, dtype: str = "fp32", device: str = "cpu", name: str | None = None):
    """A model for the runner: a quantized checkpoint folder as stored, anything else through LlavaAdapter."""
    from qvlm_harness.models.llava import LlavaAdapter

    if read_manifest(path) is not None:
        return load_quantized(path, device=device, name=name)[0]
    return LlavaAdapter.load(path, dtype=dtype, device=device, name=name)


class StoredQuantization(Method):
    """Pass-through method for a quantized checkpoint: the model is already quantized, `quantize` only labels it
    with the manifest's method, spec, execution and (original) search cost."""

    fixed_precision = False

    def __init__(self, manifest: dict, path: str, **options: Any):
        super().__init__(**options)
        self.manifest = manifest
        self.path = path
        self.name = manifest["method"]
        self.spec = _spec(manifest["spec"])

    def identity(self) -> dict[str, Any]:
        """The stored method's config (the checkpoint's contents are the model's content fingerprint)."""
        return {"method": self.name, "config": dict(self.manifest.get("config") or {})}

    def supports(self, spec: QuantSpec) -> str | None:
        return None if spec == self.spec else f"the checkpoint holds {self.spec.tag}, not {spec.tag}"

    def quantize(self, adapter, calibration, spec, scope=()) -> QuantizedModel:
        cost = SearchCost.from_dict(self.manifest.get("search_cost"))
        report = dict(self.manifest.get("report") or {}) | {"checkpoint": self.path,
                                                             "base_model": self.manifest.get("base_model")}
        return QuantizedModel(adapter, self.name, self.spec, self.manifest["execution"],
                              list(self.manifest.get("quantized_modules", [])), cost, report,
                              dict(self.manifest.get("config") or {}))

    def describe(self, spec: QuantSpec) -> str:
        return f"{self.manifest['describe']} [loaded from the quantized checkpoint {self.path}]"
