"""Dataclass configurations: what to quantize (QuantSpec) and what to run (RunSpec).

`QuantSpec.parse("w4a4")` is the single place where a bit-width string becomes a specification, so the CLI,
the store keys and the report columns all agree on names.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from qvlm_harness.errors import HarnessError

WGranularity = Literal["tensor", "channel", "group"]
AGranularity = Literal["tensor", "token"]
Scope = Literal["vision", "projector", "lm"]
ALL_SCOPES: tuple[Scope, ...] = ("vision", "projector", "lm")

_BITS_RE = re.compile(r"^w(?P<w>\d+)a(?P<a>\d+)(?:g(?P<g>\d+))?(?P<flags>(?:-[a-z]+)*)$")
# Each suffix flag sets one property; two flags of one property contradict each other (or repeat one).
# flag -> (the property it sets, whether it concerns the weights rather than the activations)
BITS_FLAGS: dict[str, tuple[str, bool]] = {
    "tensor": ("activation granularity", False), "token": ("activation granularity", False),
    "static": ("activation range", False), "dynamic": ("activation range", False),
    "sym": ("activation symmetry", False), "asym": ("activation symmetry", False),
    "wasym": ("weight symmetry", True),
}
BITS_SYNTAX = "w<bits>a<bits>[g<group>][-tensor][-static|-dynamic][-sym][-wasym]"
FLOAT_BITS = 16  # 16 means "left in floating point"


@dataclass(frozen=True)
class QuantSpec:
    """A WxAy setting.

    Weights: uniform, symmetric by default, per output channel unless `w_group_size` is set (then per group of
    that many input channels). Activations (the inputs of every quantized linear layer): uniform asymmetric,
    per token and dynamic by default, which maps directly onto integer GEMM kernels with per-row scales; static
    per-tensor ranges (calibrated) are the alternative. 16 bits means the tensor stays in floating point.
    """

    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS
    w_group_size: int | None = None
    w_symmetric: bool = True
    a_granularity: AGranularity = "token"
    a_symmetric: bool = False
    a_dynamic: bool = True

    def __post_init__(self) -> None:
        if not (2 <= self.w_bits <= 8 or self.w_bits == FLOAT_BITS):
            raise HarnessError(f"weight bits must be 2..8 or 16, got {self.w_bits}; e.g. --bits w4a16")
        if not (2 <= self.a_bits <= 8 or self.a_bits == FLOAT_BITS):
            raise HarnessError(f"activation bits must be 2..8 or 16, got {self.a_bits}; e.g. --bits w8a8")
        if self.w_group_size is not None and self.w_group_size <= 0:
            raise HarnessError(f"group size must be positive, got {self.w_group_size}")
        if self.a_granularity == "token" and not self.a_dynamic:
            raise HarnessError("per-token activation quantization is dynamic by nature; use -static with -tensor")

    @property
    def w_granularity(self) -> WGranularity:
        return "group" if self.w_group_size else "channel"

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < FLOAT_BITS

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < FLOAT_BITS

    @property
    def is_float(self) -> bool:
        return not (self.quantizes_weights or self.quantizes_activations)

    @property
    def tag(self) -> str:
        """Canonical short name, e.g. 'w4a4', 'w4a16g128', 'w8a8-tensor-static'."""
        s = f"w{self.w_bits}a{self.a_bits}"
        if self.w_group_size:
            s += f"g{self.w_group_size}"
        default = QuantSpec()
        if self.w_symmetric != default.w_symmetric:
            s += "-wasym"
        if self.a_granularity != default.a_granularity:
            s += f"-{self.a_granularity}"
        if self.a_granularity == "tensor" and self.a_dynamic:
            s += "-dynamic"  # a bare -tensor means static
        elif self.a_dynamic != default.a_dynamic:
            s += "-static"
        if self.a_symmetric != default.a_symmetric:
            s += "-sym"
        return s

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """Parse 'w4a4', 'w6a6', 'w8a8', 'w4a16', 'w4a16g128', 'w8a8-tensor-static', 'w4a4-sym', 'fp'/'w16a16'.

        Flags after the bits: `-tensor` (per-tensor activations, implies static unless `-dynamic`),
        `-static`, `-dynamic`, `-sym` (symmetric activations), `-wasym` (asymmetric weights). Each flag at most
        once; two flags setting the same property (`-static-dynamic`), activation flags on float activations
        (a16) and weight flags (g, -wasym) on float weights (w16) are refused: they would silently mean nothing.
        """
        raw = text.strip().lower()
        if raw in ("fp", "float", "none", "w16a16"):
            return cls()
        m = _BITS_RE.match(raw)
        if not m:
            raise HarnessError(f"cannot parse bit-width {text!r}: expected {BITS_SYNTAX}, e.g. w4a4, w6a6, w8a8, "
                               "w4a16g128")
        flags = _check_flags(text, m.group("flags").split("-")[1:])
        w_bits, a_bits = int(m.group("w")), int(m.group("a"))
        if m.group("g") and w_bits == FLOAT_BITS:
            raise HarnessError(f"bit-width {text!r}: a group size needs quantized weights (w16 keeps them in "
                               "float); drop g" + m.group("g"))
        for flag in flags:
            on_weights = BITS_FLAGS[flag][1]
            if (w_bits if on_weights else a_bits) == FLOAT_BITS:
                what = "weights (w16" if on_weights else "activations (a16"
                raise HarnessError(f"bit-width {text!r}: -{flag} applies to quantized {what} keeps them in "
                                   f"float); drop -{flag}")
        granularity: AGranularity = "tensor" if "tensor" in flags else "token"
        return cls(
            w_bits=w_bits,
            a_bits=a_bits,
            w_group_size=int(m.group("g")) if m.group("g") else None,
            w_symmetric="wasym" not in flags,
            a_granularity=granularity,
            a_symmetric="sym" in flags,
            a_dynamic="static" not in flags and (granularity == "token" or "dynamic" in flags),
        )

    @classmethod
    def parse_list(cls, text: str) -> list[QuantSpec]:
        specs = [cls.parse(part) for part in text.split(",") if part.strip()]
        if not specs:
            raise HarnessError("--bits is empty; give e.g. --bits w8a8,w4a4")
        return specs

    def with_(self, **changes) -> QuantSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self) | {"tag": self.tag}


@dataclass
class RunSpec:
    """Everything one `harness run` needs; the runner expands it into cells (method x bits x task)."""

    methods: list[str]
    tasks: list[str]
    bits: list[QuantSpec] = field(default_factory=lambda: [QuantSpec.parse("w8a8"), QuantSpec.parse("w4a4")])
    model: str = "default"
    limit: int | None = None
    seed: int = 0
    batch_size: int = 8
    output: Path = Path("results")
    store: Path | None = None  # default: <output>/harness.db
    data_dir: Path | None = None
    split: str = "test"
    calib_samples: int = 64
    calib_task: str | None = None  # None: each task calibrates on its own train split
    scope: tuple[Scope, ...] = ALL_SCOPES
    scoring: Literal["generate", "loglik"] = "generate"
    max_new_tokens: int = 16
    shots: tuple[int, ...] = (0,)
    trials: int = 1
    device: str = "cpu"
    dtype: str = "fp32"  # dtype the base model is loaded in (methods quantize from it; fp16/bf16 methods cast)
    threads: int | None = None
    log_samples: bool = True
    image_control: Literal["shuffle", "blank"] | None = None  # a control run: does the model use the image?
    method_options: dict[str, dict] = field(default_factory=dict)
    task_options: dict[str, dict] = field(default_factory=dict)  # canonical task name -> constructor kwargs
    # "packed": convert quantized layers to real low-bit kernels (harness.kernels) after quantization
    execution: Literal["simulated", "packed"] = "simulated"
    # QuaRot rotation of the float model before every method (`qvlm_harness.models.rotation`); "none" leaves the
    # cell identities of unrotated runs as they were
    rotate: Literal["none", "hadamard", "random"] = "none"

    @property
    def store_path(self) -> Path:
        return self.store if self.store is not None else self.output / "harness.db"


def _check_flags(text: str, flags: list[str]) -> list[str]:
    """The suffix flags of a bit-width, each known and given once, no two setting the same property."""
    seen: dict[str, str] = {}  # property -> flag
    for flag in flags:
        if flag not in BITS_FLAGS:
            raise HarnessError(f"bit-width {text!r}: unknown flag -{flag}; the flags are "
                               f"{', '.join('-' + f for f in BITS_FLAGS)} ({BITS_SYNTAX})")
        prop = BITS_FLAGS[flag][0]
        if prop in seen:
            if seen[prop] == flag:
                raise HarnessError(f"bit-width {text!r}: -{flag} is given twice; give each flag once")
            raise HarnessError(f"bit-width {text!r}: -{seen[prop]} and -{flag} contradict each other ({prop}); "
                               "keep one")
        seen[prop] = flag
    return flags
