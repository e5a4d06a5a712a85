"""QuantizeOptions: every option of :func:`mono_quant.quantize`, its default and its rule, once.

``quantize(**kwargs)``, the CLI flags (``mono_quant/cli``), the HTTP form schema
(``app/schemas.py``) and the Python client all derive from or validate through this class, so
a rule the library enforces answers 422 at submission instead of failing a job later, and no
default is written twice. Modelled on torchao's config dataclasses: frozen, validated in
``__post_init__``, valid values in every error's suggestion.

Options left at ``None`` mean "the default for this mode" (:attr:`QuantizeOptions.symmetric`,
:attr:`group_size_or_default`...); an option given explicitly that the chosen mode does not
use is refused, never ignored.

Example:
    >>> opts = QuantizeOptions.from_kwargs(bits=4, group_size=64)
    >>> opts.symmetric, opts.effective_group_size
    (False, 64)
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mono_quant.errors import ConfigurationError

__all__ = [
    "QuantizeOptions",
    "OptionSpec",
    "option_specs",
    "VALID_BITS",
    "VALID_SCHEMES",
    "VALID_GROUP_SIZES",
    "VALID_OBSERVERS",
    "VALID_METHODS",
    "DEFAULT_SMOOTHING_ALPHA",
    "LAYER_KINDS",
    "FLOAT_DTYPES",
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_CLIP_SEARCH_STEPS",
    "compile_pattern",
    "Precision",
    "parse_precision",
    "option_type",
    "DEFAULT_MAX_TRIALS",
]

VALID_BITS = (4, 8, 16)
VALID_SCHEMES = ("symmetric", "asymmetric")
# Group sizes along the input axis: powers of two the int4 kernels (CPU, tinygemm), GGUF's
# 32-blocks and ONNX's MatMulNBits all take. A layer whose in_features is not a multiple gets
# a partial last group.
VALID_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_GROUP_SIZE = 128
# Candidates of the int4 MSE clipping search (coarse to fine); 0 = plain min/max, the default.
# Minimising each group's weight error does not minimise the model's: measured at int4 g128,
# MiniLM mean embedding cosine 0.9619 (min/max) -> 0.9648 (8 steps), but SmolLM2 perplexity
# 18.34 (min/max) -> 19.83 (8 steps; 19.64 clipping at most to 0.9), fp32 14.52. LLMs are what
# this default serves, and min/max is 5x faster; clip_search_steps=8 remains an option.
DEFAULT_CLIP_SEARCH_STEPS = 0
VALID_OBSERVERS = ("minmax", "moving_average", "histogram")
VALID_METHODS = ("rtn", "hqq", "gptq")
# SmoothQuant's alpha when calibration data comes with a dynamic int8 run (bench/accuracy_algorithms.py):
# SmolLM2 perplexity vs fp32 +2.05% without, +0.78% at 0.5, +3.5% at 0.8; MiniLM mean embedding cosine
# 0.99728 without, 0.99899 at 0.5, 0.99906 at 0.65 (the best there), 0.99871 at 0.8.
DEFAULT_SMOOTHING_ALPHA = 0.5
# GPTQ chooses each group's qparams on the updated weights with the clip search: better than
# min/max there on both MiniLM and SmolLM2 (unlike round-to-nearest), so it has its own default.
GPTQ_CLIP_SEARCH_STEPS = 8
# Trials of the max_accuracy_loss search when max_trials is not given: enough for a doubling
# search over the ranked moves of a 200-layer LLM followed by a few bisection steps.
DEFAULT_MAX_TRIALS = 12
# where each surface takes calibration data (the data rules' suggestions name all three)
_DATA_WHERE = "calibration_data= in Python, --calibration FILE in the CLI, a calibration file or dataset_id over HTTP"
# defaults of the counting options left at None
_COUNT_DEFAULTS = {
    "num_calibration_samples": 128,
    "calibration_batch_size": 32,
    "clip_search_steps": DEFAULT_CLIP_SEARCH_STEPS,
    "max_trials": DEFAULT_MAX_TRIALS,
}
LAYER_KINDS = ("linear", "conv1d", "conv2d", "embedding", "lstm", "gru")
# bits=16 casts: name -> dtype (the names the CLI and the HTTP API take)
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class OptionSpec:
    """How an option is offered outside Python: its help text, the values it takes, and
    whether the CLI / the HTTP form expose it."""

    help: str
    choices: tuple[Any, ...] | None = None
    cli: bool = True
    http: bool = True
    # the modes an explicitly given value is used in: a predicate on the options
    applies: Callable[[QuantizeOptions], bool] | None = None
    applies_text: str = ""
    # the type of one value outside Python (CLI flag, form field): None = from the default
    # (bool, a tuple -> list of strings, a string choice -> str, else int)
    value_type: type | None = None


def _opt(default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": OptionSpec(help=help, **spec)})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _static(o: QuantizeOptions) -> bool:
    return o.is_static


def default_activation_symmetric(activation: str) -> bool:
    """The activation grid a mode gets unless told: asymmetric, for static int8's calibrated
    qparams and for dynamic int8's tokens alike (each token's own zero point: MiniLM's cosine
    0.99878 -> 0.99932 data-free, SmolLM2 with calibration +1.19% -> +0.62% perplexity, for one
    more pass over each output; bench/RESULTS.md). Unused (False) for weight-only layers."""
    return False


def _int8_activations(o: QuantizeOptions) -> bool:
    return o.activation in ("static", "dynamic")


def _int4(o: QuantizeOptions) -> bool:
    return o.bits == 4


def _integer(o: QuantizeOptions) -> bool:
    return o.bits in (4, 8)


def compile_pattern(pattern: str) -> re.Pattern:
    """A layer-name pattern: a shell glob (``*.query``) or ``re:<regex>`` (fullmatch)."""
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigurationError(
                f"invalid regular expression {pattern!r}: {exc}",
                suggestion="Fix the expression after 're:', or use a glob pattern like '*.query'.",
            ) from None
    return re.compile(fnmatch.translate(pattern))


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigurationError(
            f"{what} must be a string or a list of strings, got {type(value).__name__}",
            suggestion=f"Pass {what}=['*.query', 're:.*attention.*'].",
        ) from None
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(
                f"{what} entries must be strings, got {item!r}",
                suggestion=f"Pass {what} as a list of glob or 're:' patterns.",
            )
        compile_pattern(item)  # an invalid regex is refused here, at the boundary
    return items


# -- per-layer precisions (layer_overrides, the accuracy-target search) ----------------------------
_PRECISION_HELP = (
    "'int4-g<N>' (int4 weights in groups of N), 'int8' (int8 weights; activations as the run treats them), "
    "'int8-weight-only', 'fp16', 'bf16' or 'float' (left as it is)"
)


@dataclass(frozen=True)
class Precision:
    """What one layer becomes when ``layer_overrides`` names it.

    ``bits`` 4 / 8 for integer weights (``group_size`` for int4), ``weight_only`` keeps the
    activations float in an int8 run, ``cast`` is fp16 / bf16, and ``bits=None`` with no cast
    leaves the layer float.

    Example:
        >>> parse_precision("int4-g32")
        Precision(bits=4, group_size=32, weight_only=False, cast=None)
    """

    bits: int | None = None
    group_size: int | None = None
    weight_only: bool = False
    cast: torch.dtype | None = None

    @property
    def name(self) -> str:
        if self.cast is not None:
            return "fp16" if self.cast == torch.float16 else "bf16"
        if self.bits is None:
            return "float"
        if self.bits == 4:
            return f"int4-g{self.group_size}"
        return "int8-weight-only" if self.weight_only else "int8"


def parse_precision(text: Any) -> Precision:
    """A precision name (see :class:`Precision`) as its typed form; an unknown name is refused."""
    value = str(text).strip().lower() if isinstance(text, str) else None
    if value in ("float", "fp32", "none"):
        return Precision()
    if value in ("fp16", "float16", "bf16", "bfloat16"):
        return Precision(cast=FLOAT_DTYPES[value])
    if value in ("int8", "int8-weight-only"):
        return Precision(bits=8, weight_only=value.endswith("weight-only"))
    match = re.fullmatch(r"int4-g(\d+)", value or "")
    if match and int(match.group(1)) in VALID_GROUP_SIZES:
        return Precision(bits=4, group_size=int(match.group(1)))
    raise ConfigurationError(
        f"unknown precision {text!r} in layer_overrides",
        suggestion=f"Use {_PRECISION_HELP}; int4 group sizes: {', '.join(map(str, VALID_GROUP_SIZES))}.",
    )


def _overrides(value: Any) -> tuple[tuple[str, str], ...] | None:
    """``layer_overrides`` as ``((pattern, precision name), ...)`` in the order given: a dict,
    ``"pattern=precision"`` strings, or pairs. Patterns and precisions are checked here."""
    if value is None:
        return None
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            items = [value]
    pairs = []
    for item in items:
        if isinstance(item, str):
            pattern, sep, precision = item.rpartition("=")
            if not sep or not pattern.strip():
                raise ConfigurationError(
                    f"layer_overrides entry {item!r} is not 'pattern=precision'",
                    suggestion="Write entries like '*.down_proj=int8' or 'lm_head=float'.",
                )
            item = (pattern.strip(), precision.strip())
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigurationError(
                f"layer_overrides entry {item!r} is not a (pattern, precision) pair",
                suggestion="Pass a dict like {'*.down_proj': 'int8', 'lm_head': 'float'}.",
            )
        compile_pattern(item[0])
        pairs.append((item[0], parse_precision(item[1]).name))
    return tuple(pairs) or None


@dataclass(frozen=True)
class QuantizeOptions:
    """Every option of a quantization run. Frozen and self-checking.

    Build it with :meth:`from_kwargs` (what ``quantize()`` does): unknown names are refused
    with the close matches.
    """

    bits: int = _opt(
        8, "4 (int4 group-wise weights), 8 (int8) or 16 (fp16; bf16 with dtype='bf16')", choices=VALID_BITS
    )
    dynamic: bool = _opt(
        False,
        "int8: quantize activations per token at run time (no data needed); "
        "False with calibration data: static int8 (calibrated activation ranges)",
    )
    scheme: str | None = _opt(
        None, "weight grid (default: symmetric for int8, asymmetric for int4)", choices=VALID_SCHEMES
    )
    weight_only: bool = _opt(False, "int8: quantize weights only, activations stay float (most accurate)")
    dtype: str | None = _opt(
        None,
        "bits=16: 'float16' (default) or 'bfloat16'",
        choices=tuple(FLOAT_DTYPES),
        applies=lambda o: o.bits == 16,
        applies_text="bits=16",
    )
    group_size: int | None = _opt(
        None,
        f"int4 group size along the input axis (default {DEFAULT_GROUP_SIZE}; a layer it does not divide "
        "gets a partial last group)",
        choices=VALID_GROUP_SIZES,
        applies=lambda o: o.bits == 4 or (o.embedding_bits == 4 and o.bits != 16),
        applies_text="bits=4 (or embedding_bits=4)",
    )
    per_channel: bool | None = _opt(
        None,
        "int8 weights per output channel (default True) or one scale per tensor (False)",
        value_type=bool,
        applies=lambda o: o.bits == 8,
        applies_text="bits=8",
    )
    observer_type: str | None = _opt(
        None,
        "static int8: activation observer (default 'minmax')",
        choices=VALID_OBSERVERS,
        applies=_static,
        applies_text="static int8 (bits=8, dynamic=False, weight_only=False)",
    )
    num_calibration_samples: int | None = _opt(
        None,
        "calibration samples to use (default 128)",
        applies=_static,
        applies_text="static int8",
    )
    calibration_batch_size: int | None = _opt(
        None,
        "rows per calibration batch when calibration_data is one tensor or a dict of tensors (default 32)",
        http=False,
        applies=_static,
        applies_text="static int8",
    )
    activation_scheme: str | None = _opt(
        None,
        "int8 activation grid, static qparams or dynamic per token: 'asymmetric' (default: a zero point "
        "per tensor or per token, more accurate on one-sided rows) or 'symmetric' (dynamic: max|x| / 127, "
        "one pass less over each output)",
        choices=VALID_SCHEMES,
        applies=_int8_activations,
        applies_text="int8 with activations (static or dynamic)",
    )
    layer_types: tuple[str, ...] | None = _opt(
        None,
        f"layer kinds to quantize (default all): {', '.join(LAYER_KINDS)}",
        choices=LAYER_KINDS,
        value_type=list,
    )
    include: tuple[str, ...] = _opt((), "only layers whose name matches one of these globs (or 're:' regexes)")
    exclude: tuple[str, ...] = _opt((), "keep layers whose name matches one of these globs (or 're:' regexes) float")
    min_params: int = _opt(0, "skip layers with fewer parameters")
    embedding_bits: int | None = _opt(
        None,
        "bits of embedding tables: 8 (default) or 4 (group-wise)",
        choices=(4, 8),
        applies=_integer,
        applies_text="bits=4 or bits=8",
    )
    lm_head_bits: int | None = _opt(
        None,
        "bits of the output head (lm_head): default 8 in int4 runs (int4 costs LLMs much accuracy there), "
        "the run's bits otherwise; 16 keeps it float",
        choices=(4, 8, 16),
        applies=_integer,
        applies_text="bits=4 or bits=8",
    )
    clip_search_steps: int | None = _opt(
        None,
        f"int4 MSE clipping search candidates per group (default {DEFAULT_CLIP_SEARCH_STEPS}; 0 = plain min/max)",
        applies=lambda o: o.bits == 4 or o.embedding_bits == 4 or o.method == "gptq",
        applies_text="bits=4 (and GPTQ's group qparams)",
    )
    method: str | None = _opt(
        None,
        "how integer weights are rounded: 'rtn' (round to nearest), 'hqq' (half-quadratic, float zero points, "
        "each input feature weighted by its mean square on the calibration data, else on random tokens) or "
        "'gptq' (Hessian-aware, needs calibration_data). Default: int4 with calibration_data 'gptq' (outside a "
        "max_accuracy_loss search); without, 'hqq' when the model has a token embedding; 'rtn' otherwise",
        choices=VALID_METHODS,
        applies=_integer,
        applies_text="bits=4 or bits=8",
    )
    smoothing: float | None = _opt(
        None,
        "int8 with activations: SmoothQuant alpha moving activation outliers into the weights, measured on "
        "calibration_data, else on random tokens (models with a token embedding). Default: "
        f"{DEFAULT_SMOOTHING_ALPHA} from random tokens (dynamic int8), or with calibration data an alpha per "
        "layer group (or none, static) chosen by int8's output error on it; 0 turns it off",
        value_type=float,
        applies=lambda o: o.bits == 8 and not o.weight_only,
        applies_text="int8 dynamic or static (not weight_only)",
    )
    smoothing_folded_only: bool | None = _opt(
        None,
        "smooth only the layers whose scale folds into the layer before them (a norm, the value or up "
        "projection), so no layer divides its input at run time: what formats without input scales store "
        "(compressed-tensors; `--format` and the service's export_formats set it). Default False",
        value_type=bool,
        applies=lambda o: o.bits == 8 and not o.weight_only and o.smoothing != 0,
        applies_text="int8 dynamic or static with smoothing (not weight_only, not smoothing=0)",
    )
    rotation: bool | None = _opt(
        None,
        "rotate the residual stream of a pre-norm decoder (Llama, Mistral, Qwen2...) by a random orthogonal "
        "matrix folded into its weights (QuaRot's offline rotation): outlier channels spread out, per-token "
        "int8 activations lose less (SmolLM2 int8 dynamic +1.19% -> +0.81% perplexity, mean of five "
        "rotations). Nothing runs at inference time; a tied output head is untied (more bytes). Default False",
        value_type=bool,
        applies=lambda o: o.bits == 8 and not o.weight_only,
        applies_text="int8 dynamic or static (not weight_only)",
    )
    layer_overrides: tuple[tuple[str, str], ...] | None = _opt(
        None,
        "per-layer precision, first matching pattern wins: {pattern: precision} or 'pattern=precision' "
        f"entries, precisions {_PRECISION_HELP} (what result.info.layer_overrides records)",
        value_type=list,
        applies=_integer,
        applies_text="bits=4 or bits=8",
    )
    max_accuracy_loss: float | None = _opt(
        None,
        "accuracy target: the largest relative loss accepted on eval_data (perplexity increase for causal "
        "LMs, 1 - output cosine otherwise; 0.01 = 1%); the most sensitive layers move up one precision at "
        "a time until it holds",
        value_type=float,
        applies=_integer,
        applies_text="bits=4 or bits=8",
    )
    max_trials: int | None = _opt(
        None,
        f"max_accuracy_loss: trials (quantize + evaluate) at most (default {DEFAULT_MAX_TRIALS})",
        applies=lambda o: o.max_accuracy_loss is not None,
        applies_text="max_accuracy_loss",
    )
    max_tuning_seconds: float | None = _opt(
        None,
        "max_accuracy_loss: no new trial starts after this many seconds (default: no limit)",
        value_type=float,
        applies=lambda o: o.max_accuracy_loss is not None,
        applies_text="max_accuracy_loss",
    )
    device: str | None = _opt(
        None,
        "state_dict / file inputs: quantize on this device ('cpu', 'cuda'); a module is quantized where it is",
        http=False,
        value_type=str,
    )
    trusted: bool = _opt(
        False, "allow pickled modules / TorchScript files as input (they can run code: trusted files only)", http=False
    )
    progress_callback: Callable[[str, float], None] | None = _opt(
        None, "callable(stage, fraction) for progress reports", cli=False, http=False
    )

    # -- validation ----------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in VALID_BITS:
            raise ConfigurationError(
                f"bits={self.bits!r} is not supported",
                suggestion="Use bits=8 (int8), bits=4 (int4 group-wise weights) or bits=16 "
                "(fp16; bf16 with dtype='bf16').",
            )
        for name in ("dynamic", "weight_only", "trusted"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"{name} must be True or False, got {getattr(self, name)!r}",
                    suggestion=f"Pass {name}=True or {name}=False.",
                )
        if self.per_channel is not None and not isinstance(self.per_channel, bool):
            raise ConfigurationError(
                f"per_channel must be True or False, got {self.per_channel!r}", suggestion="Pass per_channel=False."
            )
        self._check_choice("scheme")
        self._check_choice("activation_scheme")
        self._check_choice("observer_type")
        self._check_choice("embedding_bits")
        self._check_choice("lm_head_bits")
        self._check_choice("method")
        if self.smoothing is not None and (
            isinstance(self.smoothing, bool)
            or not isinstance(self.smoothing, (int, float))
            or not 0 <= self.smoothing < 1
        ):
            raise ConfigurationError(
                f"smoothing must be a number in [0, 1), got {self.smoothing!r}",
                suggestion=f"Pass smoothing={DEFAULT_SMOOTHING_ALPHA} (SmoothQuant's alpha; 0.8 suits Llama-family "
                "models in the paper), or 0 to turn smoothing off.",
            )
        if self.rotation is not None and not isinstance(self.rotation, bool):
            raise ConfigurationError(
                f"rotation must be True or False, got {self.rotation!r}", suggestion="Pass rotation=True."
            )
        if self.dtype is not None:
            if isinstance(self.dtype, torch.dtype):
                names = [k for k, v in FLOAT_DTYPES.items() if v == self.dtype]
                object.__setattr__(self, "dtype", names[0] if names else str(self.dtype))
            elif isinstance(self.dtype, str):
                object.__setattr__(self, "dtype", self.dtype.lower())
            self._check_choice("dtype")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size not in VALID_GROUP_SIZES):
            raise ConfigurationError(
                f"group_size must be a power of two from {VALID_GROUP_SIZES[0]} to {VALID_GROUP_SIZES[-1]}, "
                f"got {self.group_size!r}",
                suggestion=f"Use group_size=32, 64 or 128 ({DEFAULT_GROUP_SIZE} is the default); layers it does "
                "not divide get a partial last group.",
            )
        object.__setattr__(self, "layer_overrides", _overrides(self.layer_overrides))
        for name in ("max_accuracy_loss", "max_tuning_seconds"):
            value = getattr(self, name)
            if value is None:
                continue
            upper = 1 if name == "max_accuracy_loss" else float("inf")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < upper:
                example = "0.01 (1%)" if name == "max_accuracy_loss" else "600"
                raise ConfigurationError(
                    f"{name} must be a number {'in (0, 1)' if upper == 1 else '> 0'}, got {value!r}",
                    suggestion=f"Pass {name}={example}.",
                )
            object.__setattr__(self, name, float(value))
        for name, low in (
            ("num_calibration_samples", 1),
            ("calibration_batch_size", 1),
            ("clip_search_steps", 0),
            ("max_trials", 1),
        ):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < low):
                raise ConfigurationError(
                    f"{name} must be an integer >= {low}, got {value!r}",
                    suggestion=f"Pass {name}={_COUNT_DEFAULTS[name]} (the default) or another integer >= {low}.",
                )
        if not _is_int(self.min_params) or self.min_params < 0:
            raise ConfigurationError(
                f"min_params must be a non-negative integer, got {self.min_params!r}",
                suggestion="Pass min_params=0 to quantize layers of any size.",
            )
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if self.layer_types is not None:
            kinds = tuple(k.lower() for k in _patterns(self.layer_types, "layer_types"))
            unknown = [k for k in kinds if k not in LAYER_KINDS]
            if unknown:
                raise ConfigurationError(
                    f"unknown layer type(s) {unknown}", suggestion=f"Use any of: {', '.join(LAYER_KINDS)}."
                )
            object.__setattr__(self, "layer_types", kinds or None)
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise ConfigurationError(
                f"device={self.device!r} is not a device", suggestion="Use device='cpu' or device='cuda'."
            )
        if self.progress_callback is not None and not callable(self.progress_callback):
            raise ConfigurationError(
                "progress_callback must be callable(stage, fraction)", suggestion="Pass a function or None."
            )
        self._check_modes()

    def _check_choice(self, name: str) -> None:
        value = getattr(self, name)
        choices = _SPECS[name].choices
        if value is not None and (value not in choices or isinstance(value, bool)):
            raise ConfigurationError(
                f"{name}={value!r} is not supported",
                suggestion=f"Use {name}=" + " or ".join(repr(c) for c in choices) + ".",
            )

    def _check_modes(self) -> None:
        if self.bits != 8 and (self.dynamic or self.weight_only):
            flag = "dynamic" if self.dynamic else "weight_only"
            raise ConfigurationError(
                f"{flag}=True is an int8 mode, got bits={self.bits}",
                suggestion=f"int4 is always weight-only and bits=16 is a cast: drop {flag}=True, or use bits=8.",
            )
        if self.dynamic and self.weight_only:
            raise ConfigurationError(
                "dynamic=True and weight_only=True contradict each other",
                suggestion="dynamic=True quantizes activations at run time; weight_only=True keeps them float. "
                "Pick one.",
            )
        for name, spec in _SPECS.items():
            value = getattr(self, name)
            if spec.applies is None or value is None:
                continue
            if not spec.applies(self):
                raise ConfigurationError(
                    f"{name}={value!r} is not used with {self.mode_name}",
                    suggestion=f"{name} applies to {spec.applies_text}; drop it or change the mode.",
                )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> QuantizeOptions:
        """Options from keyword arguments; an unknown name is refused with its close matches."""
        unknown = [key for key in kwargs if key not in _SPECS]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(_SPECS), n=3)
                hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ConfigurationError(
                f"unknown option(s): {', '.join(hints)}",
                suggestion="Valid options: " + ", ".join(sorted(_SPECS)) + ".",
            )
        return cls(**kwargs)

    @classmethod
    def for_request(cls, has_calibration: bool, **kwargs: Any) -> QuantizeOptions:
        """Options for a CLI call or an HTTP job, where ``dynamic`` may be left out: int8 is then
        static when calibration data comes with the request and dynamic when none does (the
        library's own default, ``dynamic=False``, needs data)."""
        if kwargs.get("dynamic") is None:
            kwargs.pop("dynamic", None)
            if kwargs.get("bits", 8) == 8 and not kwargs.get("weight_only"):
                kwargs["dynamic"] = not has_calibration
        return cls.from_kwargs(**kwargs)

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a caller asked for)."""
        return {name: getattr(self, name) for name in _SPECS if getattr(self, name) != getattr(_DEFAULTS, name)}

    # -- what the options mean -----------------------------------------------------------------
    @property
    def is_static(self) -> bool:
        """Static int8: activation ranges calibrated on data."""
        return self.bits == 8 and not self.dynamic and not self.weight_only

    @property
    def mode_name(self) -> str:
        if self.bits == 16:
            return f"a bits=16 cast ({self.float_dtype_name})"
        if self.bits == 4:
            return "int4 (weight-only)"
        if self.weight_only:
            return "int8 weight-only"
        return "int8 dynamic" if self.dynamic else "static int8"

    @property
    def activation(self) -> str:
        """How Linear inputs are treated: "dynamic", "static" or "none" (weight-only / cast)."""
        if self.bits != 8 or self.weight_only:
            return "none"
        return "dynamic" if self.dynamic else "static"

    @property
    def symmetric(self) -> bool:
        """The weight grid: symmetric for int8, asymmetric for int4, unless ``scheme`` says."""
        if self.scheme is None:
            return self.bits != 4
        return self.scheme == "symmetric"

    @property
    def activation_symmetric(self) -> bool:
        """The activation grid: ``activation_scheme``, or the mode's default."""
        if self.activation_scheme is None:
            return default_activation_symmetric(self.activation)
        return self.activation_scheme == "symmetric"

    @property
    def effective_group_size(self) -> int:
        return self.group_size or DEFAULT_GROUP_SIZE

    @property
    def effective_per_channel(self) -> bool:
        return True if self.per_channel is None else self.per_channel

    @property
    def effective_observer(self) -> str:
        return self.observer_type or "minmax"

    @property
    def effective_calibration_samples(self) -> int:
        return self.num_calibration_samples or _COUNT_DEFAULTS["num_calibration_samples"]

    @property
    def effective_calibration_batch_size(self) -> int:
        return self.calibration_batch_size or _COUNT_DEFAULTS["calibration_batch_size"]

    @property
    def effective_embedding_bits(self) -> int:
        return self.embedding_bits or 8

    @property
    def effective_lm_head_bits(self) -> int:
        if self.lm_head_bits is not None:
            return self.lm_head_bits
        return 8 if self.bits == 4 else self.bits

    def clip_search_steps_for(self, method: str) -> int:
        """The clip search's candidates for a layer rounded by ``method`` (GPTQ has its own default)."""
        if self.clip_search_steps is not None:
            return self.clip_search_steps
        return GPTQ_CLIP_SEARCH_STEPS if method == "gptq" else DEFAULT_CLIP_SEARCH_STEPS

    @property
    def effective_max_trials(self) -> int:
        return self.max_trials or _COUNT_DEFAULTS["max_trials"]

    @property
    def effective_method(self) -> str:
        """The method asked for, or "rtn" (each layer's default is :meth:`layer_method`'s)."""
        return self.method or "rtn"

    def uses_calibration(self) -> bool:
        """Whether calibration data has a use in this run: static int8 (activation ranges),
        GPTQ (Hessians) or SmoothQuant (int8 with activations)."""
        return (
            self.is_static
            or self.effective_method == "gptq"
            or self.uses_importance()
            or (self.bits == 8 and not self.weight_only and self.smoothing != 0)
            or self.max_accuracy_loss is not None
        )

    def uses_importance(self) -> bool:
        """Whether HQQ may weigh its rounding by input statistics: ``method='hqq'``, or int4 with
        no method given (its default, see :meth:`layer_method`)."""
        return self.method == "hqq" or (self.method is None and self.bits == 4)

    def layer_method(self, bits: int, statistics: str | None, output_head: bool = False) -> str:
        """How the weight of a Linear quantized to ``bits`` is rounded: the ``method`` given, else
        by what the run has to measure on (``statistics``: "calibration data", "random tokens"
        through the model's token embedding, or None):

        * calibration data: GPTQ for int4 layers (not the output head, nor inside a
          ``max_accuracy_loss`` search, whose every trial would re-run it);
        * otherwise, for int4 with statistics: HQQ weighted by each input's mean square;
        * else round-to-nearest (static and weight-only int8 included).

        Measured (bench/accuracy_algorithms.py, tests/api): MiniLM int4 g128 embedding cosine
        0.9619 round-to-nearest, 0.9777 HQQ from random tokens, 0.984 GPTQ (32 sentences);
        SmolLM2 int4: HQQ closes ~50% of round-to-nearest's perplexity gap to fp32, GPTQ 64-83%.
        int8 keeps round-to-nearest: MiniLM dynamic with calibration + SmoothQuant 0.99896
        (``method="gptq"``: 0.99918, for several times the time; SmolLM2 not measured quiet),
        static 0.99336 (GPTQ 0.99381 for 7x the time).
        Without statistics HQQ is no better than round-to-nearest (0.9610), which is faster."""
        if self.method is not None:
            return self.method
        if statistics == "calibration data" and bits == 4 and not output_head and self.max_accuracy_loss is None:
            return "gptq"
        return "hqq" if bits == 4 and statistics is not None else "rtn"

    def check_data(self, has_calibration: bool, has_eval: bool = False) -> None:
        """The rules on data, for ``quantize()``, the CLI and the service alike: calibration
        data that this run would not use is refused, and modes that need data say so.
        ``has_eval``: eval data comes with the run (what ``max_accuracy_loss`` is measured on)."""
        from mono_quant.errors import InputError

        if has_calibration and not self.uses_calibration():
            raise ConfigurationError(
                f"calibration data was given, but {self.mode_name} with method={self.effective_method!r} "
                "does not use it",
                suggestion="Calibration data is used by static int8, by method=gptq / hqq, by int4's default "
                "rounding (GPTQ), by SmoothQuant and by max_accuracy_loss: add method=gptq for weight-only "
                "int8, or drop the "
                "calibration data (over HTTP, text sent as the eval file is measured, not calibrated on).",
            )
        if self.effective_method == "gptq" and not has_calibration:
            raise ConfigurationError(
                "method='gptq' needs calibration data: it rounds each weight using its inputs' statistics",
                suggestion="Give calibration data (e.g. 16 sequences of 512 tokens of text like your use case; "
                f"{_DATA_WHERE}), or use method='rtn' / method='hqq', which need no data.",
            )
        if self.is_static and not has_calibration:
            raise InputError(
                "static int8 quantization (dynamic=False) needs calibration data",
                suggestion=f"Give calibration data ({_DATA_WHERE}), or use dynamic=True / weight_only=True, "
                "which need no data.",
            )
        if self.max_accuracy_loss is not None and not (has_calibration or has_eval):
            raise ConfigurationError(
                "max_accuracy_loss needs data to measure the loss on",
                suggestion="Give eval data (inputs like those the model will see: eval_data= in Python, --eval "
                "FILE in the CLI, an eval file or eval_id over HTTP), or calibration data, a part of which is then "
                "held out for evaluation.",
            )

    def effective_smoothing(self, has_statistics: bool) -> float | None:
        """SmoothQuant's alpha for this run, or None. ``has_statistics``: the run has inputs to
        measure activations on (calibration data, or random tokens through a token embedding).
        int8 with activations (dynamic or static) is smoothed unless ``smoothing=0``: MiniLM
        dynamic 0.9972 -> 0.9990 from calibration sentences, 0.9988 from random tokens; static
        (calibration data only) see :meth:`smoothing_per_group`."""
        if not has_statistics or self.bits != 8 or self.weight_only or self.smoothing == 0:
            return None
        return DEFAULT_SMOOTHING_ALPHA if self.smoothing is None else float(self.smoothing)

    def smoothing_per_group(self, has_calibration: bool) -> bool:
        """Whether each smoothed group takes the alpha with the lowest int8 output error on its
        calibration activations (real data and no ``smoothing`` given): per-token int8's error for
        dynamic runs (MiniLM 0.99899 at a fixed 0.5 -> 0.99907), static int8's for static ones,
        where leaving a group unsmoothed is a candidate too (MiniLM static 0.99336 unsmoothed,
        0.9929 at a fixed 0.5, 0.99748 at 0.8, per group 0.99828; a fixed 0.8 costs 2 dB on inputs
        without outlier channels, a random MLP). Random tokens keep the fixed alpha: chosen on
        them it measured lower."""
        return has_calibration and self.smoothing is None

    @property
    def float_dtype_name(self) -> str:
        return "bfloat16" if FLOAT_DTYPES.get(self.dtype or "float16") == torch.bfloat16 else "float16"

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The cast dtype of a bits=16 run, else None."""
        return FLOAT_DTYPES[self.float_dtype_name] if self.bits == 16 else None

    @property
    def quantized_dtype(self) -> torch.dtype:
        """The dtype recorded in QuantizationInfo: qint8, quint4x2, or the cast dtype."""
        if self.bits == 16:
            return self.float_dtype
        return torch.qint8 if self.bits == 8 else torch.quint4x2


_SPECS: dict[str, OptionSpec] = {f.name: f.metadata["spec"] for f in fields(QuantizeOptions)}
_DEFAULTS = QuantizeOptions()


def option_specs(*, cli: bool | None = None, http: bool | None = None) -> dict[str, tuple[Any, OptionSpec]]:
    """``{name: (default, OptionSpec)}`` of the options, optionally only those the CLI / the
    HTTP form expose: what ``app/schemas.py`` and ``mono_quant/cli`` build their fields from."""
    out = {}
    for name, spec in _SPECS.items():
        if cli is not None and spec.cli != cli:
            continue
        if http is not None and spec.http != http:
            continue
        out[name] = (getattr(_DEFAULTS, name), spec)
    return out


def option_type(name: str) -> type:
    """The type of one value of option ``name`` outside Python: bool, int, float, str, or list
    (of strings: repeated CLI flags / form fields, or comma-separated)."""
    spec = _SPECS[name]
    if spec.value_type is not None:
        return spec.value_type
    default = getattr(_DEFAULTS, name)
    if isinstance(default, bool):
        return bool
    if isinstance(default, tuple):
        return list
    if spec.choices is not None and isinstance(spec.choices[0], str):
        return str
    return int


def split_list(values: Iterable[str] | str | None) -> list[str] | None:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: list options given as repeated or comma-joined
    values (CLI flags, form fields)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    items = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
    return items or None
