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
AGranularity = Literal["tensor", "token", "channel"]
Scope = Literal["vision", "projector", "lm"]
ALL_SCOPES: tuple[Scope, ...] = ("vision", "projector", "lm")

_BITS_RE = re.compile(r"^w(?P<w>\d+)a(?P<a>\d+)(?:g(?P<g>\d+))?(?P<flags>(?:-[a-z]+)*)$")
# Each suffix flag sets one property; two flags of one property contradict each other (or repeat one).
# flag -> (the property it sets, whether it concerns the weights rather than the activations)
BITS_FLAGS: dict[str, tuple[str, bool]] = {
    "tensor": ("activation granularity", False), "token": ("activation granularity", False),
    "channel": ("activation granularity", False),
    "static": ("activation range", False), "dynamic": ("activation range", False),
    "sym": ("activation symmetry", False), "asym": ("activation symmetry", False),
    "wasym": ("weight symmetry", True),
}
BITS_SYNTAX = "w<bits>a<bits>[g<group>][-token|-tensor|-channel][-static|-dynamic][-sym][-wasym]"
FLOAT_BITS = 16  # 16 means "left in floating point"
# Why per-input-channel activation ranges are simulated only (the planner, the packer and describe() say it).
CHANNEL_ACTIVATIONS_UNPACKABLE = (
    "a per-input-channel activation scale cannot be factored out of an integer GEMM (it lies along the reduction "
    "dim: folding it in would multiply the weight's columns, which then leave the weight grid)")


@dataclass(frozen=True)
class QuantSpec:
    """A WxAy setting.

    Weights: uniform, symmetric by default, per output channel unless `w_group_size` is set (then per group of
    that many input channels). Activations (the inputs of every quantized linear layer): uniform asymmetric,
    per token and dynamic by default, which maps directly onto integer GEMM kernels with per-row scales; static
    per-tensor ranges (calibrated), dynamic per-tensor ranges and static per-input-channel ranges (calibrated; one
    range per column of the ``[..., in]`` input, simulated only: such a scale lies along the GEMM's reduction dim)
    are the alternatives. 16 bits means the tensor stays in floating point.

    `a_granularity_given` records that the granularity was named (always for -tensor/-channel; for per-token
    only when spelled ``-token``). A bare ``w4a4`` means the harness's per-token dynamic quantizer for every method
    but one whose reference code uses another (`Method.default_activations`: qvlm-official's released per-channel
    ranges); ``w4a4-token`` means per-token for that one too. The planner drops the flag where it changes nothing
    (`Method.canonical_spec`), so ``w4a4-token`` is ``w4a4`` for everyone else: same tag, same cell id.
    """

    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS
    w_group_size: int | None = None
    w_symmetric: bool = True
    a_granularity: AGranularity = "token"
    a_symmetric: bool = False
    a_dynamic: bool = True
    a_granularity_given: bool = False

    def __post_init__(self) -> None:
        if not (2 <= self.w_bits <= 8 or self.w_bits == FLOAT_BITS):
            raise HarnessError(f"weight bits must be 2..8 or 16, got {self.w_bits}; e.g. --bits w4a16")
        if not (2 <= self.a_bits <= 8 or self.a_bits == FLOAT_BITS):
            raise HarnessError(f"activation bits must be 2..8 or 16, got {self.a_bits}; e.g. --bits w8a8")
        if self.w_group_size is not None and self.w_group_size <= 0:
            raise HarnessError(f"group size must be positive, got {self.w_group_size}")
        if self.a_granularity == "token" and not self.a_dynamic:
            raise HarnessError("per-token activation quantization is dynamic by nature; use -static with -tensor")
        if self.a_granularity != "token" and not self.a_granularity_given:
            object.__setattr__(self, "a_granularity_given", True)  # a non-default granularity is always named
        if self.a_granularity == "channel" and self.a_dynamic:
            raise HarnessError("per-input-channel activation ranges are static (calibrated once, range per input "
                               "channel); drop -dynamic or use -token / -tensor-dynamic")

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
    def activations(self) -> str:
        """The activation quantizer in one word, as every results table prints it: 'float' (A16), 'token-dyn',
        'tensor-dyn', 'tensor-static' or 'channel-static' (symmetry is in the bits tag)."""
        if not self.quantizes_activations:
            return "float"
        return f"{self.a_granularity}-{'dyn' if self.a_dynamic else 'static'}"

    @property
    def names_token(self) -> bool:
        """True for an explicit ``-token`` (per-token activations asked for by name)."""
        return self.quantizes_activations and self.a_granularity == "token" and self.a_granularity_given

    def with_activations(self, granularity: AGranularity, dynamic: bool) -> QuantSpec:
        """The same spec with another activation quantizer; per-token comes out bare (``w4a4``)."""
        return replace(self, a_granularity=granularity, a_dynamic=dynamic, a_granularity_given=granularity != "token")

    @property
    def tag(self) -> str:
        """Canonical short name, e.g. 'w4a4', 'w4a16g128', 'w8a8-tensor-static', 'w4a4-channel-static'."""
        s = f"w{self.w_bits}a{self.a_bits}"
        if self.w_group_size:
            s += f"g{self.w_group_size}"
        default = QuantSpec()
        if self.w_symmetric != default.w_symmetric:
            s += "-wasym"
        if self.a_granularity != default.a_granularity:
            s += f"-{self.a_granularity}"
        elif self.names_token:
            s += "-token"  # only where a method's own default differs (see the class docstring)
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

        Flags after the bits: `-token` (per-token dynamic activations, the default, spelled out), `-tensor`
        (per-tensor activations, implies static unless `-dynamic`), `-channel` (static per-input-channel ranges),
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
        granularity: AGranularity = "tensor" if "tensor" in flags else "channel" if "channel" in flags else "token"
        return cls(
            w_bits=w_bits,
            a_bits=a_bits,
            w_group_size=int(m.group("g")) if m.group("g") else None,
            w_symmetric="wasym" not in flags,
            a_granularity=granularity,
            a_symmetric="sym" in flags,
            a_dynamic="static" not in flags and (granularity == "token" or "dynamic" in flags),
            a_granularity_given=bool({"token", "tensor", "channel"} & set(flags)),
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
        """The spec's value (cell identities, checkpoint manifests); `a_granularity_given` only for an explicit
        -token (implied by the granularity otherwise), so specs stored before it existed keep their form."""
        d = asdict(self)
        if not self.names_token:
            d.pop("a_granularity_given")
        return d | {"tag": self.tag}


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
    # "none", or a packed format for the token embedding and LM head (qvlm_harness.kernels.embedding)
    embeddings: str = "none"
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
