"""Swap `nn.Linear` modules for quantized ones, torchao ``quantize_(model, config, filter_fn)`` style.

Layers are selected by fully qualified name (FQN, as in ``model.named_modules()``), either with name prefixes
(``"model.vision_tower"`` matches itself and everything below it, ``""`` matches everything) or with a
predicate ``include(fqn, linear) -> bool``. Linear layers owned by `nn.MultiheadAttention` are never swapped:
that module reads ``out_proj.weight`` directly instead of calling the submodule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.actquant import ActQuantMixin
from qvlm_harness.quant.calibration import input_hooks
from qvlm_harness.quant.observers import MinMaxObserver, make_observer
from qvlm_harness.quant.online import carry_online_transform
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quant.quantizer import QParams

Include = Callable[[str, nn.Linear], bool] | Sequence[str] | str | None


def _matches_prefix(name: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _predicate(include: Include) -> Callable[[str, nn.Linear], bool]:
    if include is None:
        return lambda _name, _mod: True
    if isinstance(include, str):
        prefixes: tuple[str, ...] = (include,)
        return lambda name, _mod: _matches_prefix(name, prefixes)
    if callable(include):
        return include
    prefixes = tuple(include)
    return lambda name, _mod: _matches_prefix(name, prefixes)


def _swappable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            skip.update(id(m) for m in module.children())
    # remove_duplicate=False: a linear shared under two names must be replaced at both places.
    return [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, nn.Linear) and id(m) not in skip and name != ""
    ]


def linear_names(model: nn.Module, prefixes: Include = None) -> list[str]:
    """FQNs of the swappable `nn.Linear` modules selected by `prefixes` (prefixes, predicate or all)."""
    pred = _predicate(prefixes)
    return [name for name, m in _swappable_linears(model) if pred(name, m)]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Install `new` at `name` (an FQN relative to `model`), replacing what was there: the one module swap every
    method, checkpoint loader and transform uses. `new` is moved to the device of the module it replaces when it
    lives elsewhere (codes some searches compute on the CPU must not stay there on a CUDA model); on the CPU, or
    when the old module is on the meta device, nothing moves. An online input transform of the replaced module (a
    rotation's Hadamard, `qvlm_harness.quant.online`) moves to `new`."""
    from qvlm_harness.device import place_like

    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    carry_online_transform(old, new)
    setattr(parent, child, place_like(new, old))


_set_submodule = set_submodule  # the former private name, still imported by aespa and the checkpoint loader


def quantize_linears(
    model: nn.Module,
    spec: QuantSpec,
    include: Include = None,
    make: Callable[[str, nn.Linear], nn.Module] | None = None,
) -> list[str]:
    """Replace every selected `nn.Linear` with ``make(fqn, linear)`` (default: round-to-nearest `QLinear`).

    Modifies `model` in place and returns the swapped FQNs in module order. The same linear object reachable
    under two names (shared/tied modules) is built once and installed at both places. A bare `nn.Linear`
    model (no submodules) cannot be swapped in place; wrap it in a container.
    """
    if isinstance(model, nn.Linear):
        raise HarnessError("quantize_linears needs a container module, not a bare nn.Linear")
    if make is None:
        make = lambda name, linear: QLinear.from_linear(linear, spec, name=name)
    selected = linear_names(model, include)
    modules = dict(model.named_modules(remove_duplicate=False))
    built: dict[int, nn.Module] = {}
    for name in selected:
        linear = modules[name]
        key = id(linear)
        if key not in built:
            built[key] = make(name, linear)  # type: ignore[arg-type]
        set_submodule(model, name, built[key])
    return selected


def qlinear_modules(model: nn.Module) -> dict[str, QLinear]:
    """FQN -> `QLinear` for every quantized linear in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def act_quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> every module with an activation quantizer: `QLinear` and `ActQuantMixin` layers (NormalFloat...)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear | ActQuantMixin)}


def calibrate_static_activations(
    model: nn.Module,
    names: Sequence[str] | None,
    run: Callable[[], None],
    spec: QuantSpec | None = None,
    observer: str = "mse",
) -> dict[str, QParams]:
    """Calibrate and set `act_qparams` of the static (per-tensor or per-input-channel) layers among `names`.

    `names` None means every `QLinear` in the model; layers whose activations are not static are skipped.
    During ``run()`` activation quantization of the calibrated layers is switched off (weights stay
    quantized), so each layer's range is observed on the inputs of the weight-quantized model; an observer
    per layer ('mse': MSE-optimal clipping on a bounded sample, 'minmax': full range) turns them into
    QParams (per-input-channel layers always take per-channel min/max, `ChannelMinMaxObserver`). `spec`, if
    given, must agree with the layers' activation bits/symmetry (a consistency check).
    Returns FQN -> QParams.
    """
    qlinears = act_quant_modules(model)
    if names is None:
        names = list(qlinears)
    targets: dict[str, QLinear | ActQuantMixin] = {}
    for name in names:
        if name not in qlinears:
            raise HarnessError(f"{name!r} is not a quantized linear layer; call quantize_linears first")
        m = qlinears[name]
        if not m.needs_calibration:
            continue
        if spec is not None and (spec.a_bits, spec.a_symmetric) != (m.a_bits, m.a_symmetric):
            raise HarnessError(
                f"layer {name} quantizes activations as {m.spec.tag}, not as the requested {spec.tag}"
            )
        targets[name] = m
    if not targets:
        return {}
    observers: dict[str, MinMaxObserver] = {name: make_observer(observer, name, m.a_granularity)
                                            for name, m in targets.items()}

    def record(name: str, x: torch.Tensor) -> None:
        observers[name].update(x)

    previous = {name: m.calibrating for name, m in targets.items()}
    try:
        for m in targets.values():
            m.calibrating = True
        with torch.no_grad(), input_hooks(model, list(targets), record):
            run()
    finally:
        for name, m in targets.items():
            m.calibrating = previous[name]
    result: dict[str, QParams] = {}
    for name, m in targets.items():
        qp = observers[name].qparams(m.a_bits, m.a_symmetric)
        m.act_qparams = qp
        result[name] = qp
    return result
