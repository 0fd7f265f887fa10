"""Load a quantized checkpoint straight into packed modules: the deployment path of ``--execution packed``.

Loading fake-quant modules and packing them afterwards holds, for a while, the float skeleton the config builds,
every layer's dequantized float weight and the packed copy. Here nothing float of a quantized layer is ever made:

1. the Llava skeleton is built on the meta device (no memory, no initialisation), as `from_pretrained` does; its
   non-persistent buffers (rotary frequencies, position ids) are then computed on the CPU by the model's own
   `initialize_weights`, which is how transformers fills them after a meta-device load;
2. each quantized module's tensors are read from the file (`qvlm_harness.tensorfile`: one module at a time, into
   memory of their own, the file never mapped) and handed to its codec's `build_packed`, which packs the stored
   integer codes directly (a codec without one, or a layer that cannot pack, is built as `load_quantized` builds
   it and stays simulated);
3. the float rest (embeddings, norms, biases of float layers) is read and assigned as it is stored
   (``load_state_dict(assign=True)``: no second copy), tied tensors (the manifest's aliases) becoming one
   parameter again.

The same strictness as `load_quantized`: every tensor the model expects must be stored and nothing else, shapes
must fit, a float tensor of a quantized module must be finite, and no parameter may remain on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.embedding import engine_codecs
from qvlm_harness.manifest import FIX, codecs_for, method_class
from qvlm_harness.quant.codec import DTYPES
from qvlm_harness.tensorfile import TensorFile


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The Llava model of `config` with every parameter (and persistent buffer) on the meta device and its
    non-persistent buffers computed on the CPU, in `dtype` as `load_quantized`'s ``.to(dtype)`` leaves it."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    for key, buf in list(model.named_non_persistent_buffers()):
        owner, _, attr = key.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = torch.empty_like(buf, device="cpu")
    model.initialize_weights()  # parameters are on meta (a no-op for them); fills the buffers above
    return model.to(dtype).eval()


def load_packed_model(folder: Path, manifest: dict, path: Path, backend: str) -> nn.Module:
    """The model of the verified checkpoint `folder` (tensor file `path`) with packed modules; see the module
    docstring. The fused CPU kernel is prepared (`convert_to_packed`) before it returns."""
    from transformers import AutoConfig

    from qvlm_harness.checkpoint import _decode, check_finite
    from qvlm_harness.kernels.convert import convert_to_packed
    from qvlm_harness.quant.apply import set_submodule

    method = manifest["method"]
    codecs = codecs_for(method_class(method, f"checkpoint {folder}")) | engine_codecs()
    model = empty_model(AutoConfig.from_pretrained(folder), DTYPES[manifest["dtype"]])
    file = TensorFile(path)
    aliases: dict[str, str] = manifest["aliases"]
    for alias, target in aliases.items():
        if target not in file:
            raise HarnessError(f"checkpoint alias {alias} -> {target}: target tensor missing; {FIX}")
    keys = file.keys() + [a for a in aliases if a not in file]

    def source(key: str) -> str:  # the stored tensor a key reads (its alias target when it is not stored)
        return key if key in file else aliases[key]

    targets = set(aliases.values())
    by_source: dict[str, Tensor] = {}  # alias targets read once (a tied embedding and head share one tensor)

    def read(key: str) -> Tensor:
        src = source(key)
        if src not in targets:
            return file.read(src)
        if src not in by_source:
            by_source[src] = file.read(src)
        return by_source[src]

    consumed: set[str] = set()
    built: dict[str, list[nn.Module]] = {}
    for fqn, entry in manifest["modules"].items():
        try:
            model.get_submodule(fqn)
        except AttributeError:
            raise HarnessError(f"checkpoint module {fqn} does not exist in the model built from config.json") from None
        mine = [k for k in keys if k.startswith(fqn + ".")]
        full = {k: read(k) for k in mine}
        check_finite(full, {fqn: entry}, folder)
        sub = {k[len(fqn) + 1:]: v for k, v in full.items()}
        del full
        consumed |= set(mine)
        set_submodule(model, fqn, _decode(fqn, entry, sub, codecs, method, built, backend=backend))
        del sub
    quantized = tuple(f"{q}." for q in manifest["modules"])
    expected = {k: t for k, t in model.state_dict(keep_vars=True).items() if not k.startswith(quantized)}
    rest_keys = [k for k in keys if k not in consumed]
    missing, unexpected = expected.keys() - set(rest_keys), set(rest_keys) - expected.keys()
    if missing or unexpected:
        raise HarnessError(f"checkpoint tensors do not match the model: missing {sorted(missing)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}; {FIX}")
    rest: dict[str, Tensor] = {}
    for key in rest_keys:
        t = read(key)
        want = expected[key]
        if tuple(t.shape) != tuple(want.shape):
            raise HarnessError(f"checkpoint tensor {key} has shape {tuple(t.shape)}, the model expects "
                               f"{tuple(want.shape)}; {FIX}")
        rest[key] = t if t.dtype == want.dtype else t.to(want.dtype)
    model.load_state_dict(rest, strict=False, assign=True)
    del rest
    _retie(model, aliases)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise HarnessError(f"checkpoint {folder}: {len(left)} tensor(s) of the model were never loaded (e.g. "
                           f"{left[0]}); {FIX}")
    for codec_name, modules in built.items():
        if codecs[codec_name].on_load is not None:
            codecs[codec_name].on_load(model, modules)
    convert_to_packed(model, backend=backend)  # prepares the kernels; what could not pack stays simulated
    return model


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each aliased parameter (a tied embedding and LM head) the very parameter of its target again, as the
    model built from the config holds it (`assign=True` installed two parameters over one tensor)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in aliases.items():
        if alias in params and target in params and params[alias] is not params[target]:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, params[target])
