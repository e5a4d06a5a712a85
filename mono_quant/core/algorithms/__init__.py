"""Accuracy algorithms, as pure building blocks the quantizers call.

* :mod:`.hqq`: data-free half-quadratic refinement of group qparams (float zero points).
* :mod:`.gptq`: Hessian-aware rounding from calibration inputs, per weight and per model.
* :mod:`.smoothing`: SmoothQuant scales folded into norms / value projections, or returned as
  input scales for the activation quantizer.
* :mod:`.rotation`: an orthogonal change of the residual stream's basis folded into a pre-norm
  decoder's weights (QuaRot's offline rotation), in place on a working copy.

Each takes and returns plain tensors / :class:`~mono_quant.core.schemes.QuantizedTensor`;
none modifies a caller's model except :func:`apply_smoothing` and :func:`rotate_residual_stream`,
which are documented to work in place on the copy they are given.
"""

from mono_quant.core.algorithms.gptq import (
    GPTQ_DEFAULT_ACT_ORDER,
    GPTQ_DEFAULT_MIN_TOKENS,
    GPTQ_DEFAULT_SAMPLE_DAMP,
    GPTQ_DEFAULT_TRUE_SEQUENTIAL,
    GPTQFallbackWarning,
    HessianAccumulator,
    gptq_quantize_model,
    gptq_quantize_weight,
)
from mono_quant.core.algorithms.hqq import HQQ_DEFAULT_ITERATIONS, hqq_quantize_weight
from mono_quant.core.algorithms.rotation import (
    ROTATION_SEED,
    random_orthogonal,
    rotate_residual_stream,
    tied_output_head,
)
from mono_quant.core.algorithms.smoothing import (
    AUTO_ALPHA_CANDIDATES,
    DEFAULT_SMOOTHING_ALPHA,
    SmoothingGroup,
    apply_smoothing,
    collect_activation_absmax,
    collect_activation_samples,
    collect_input_mean_squares,
    collect_smoothing_statistics,
    smoothing_plan,
    smoothing_scales,
    synthetic_token_batches,
)
from mono_quant.core.schemes import dequantize_groups, group_bounds, rtn_quantize_weight  # one home: schemes

__all__ = [
    "hqq_quantize_weight",
    "HQQ_DEFAULT_ITERATIONS",
    "HessianAccumulator",
    "gptq_quantize_weight",
    "gptq_quantize_model",
    "GPTQFallbackWarning",
    "GPTQ_DEFAULT_MIN_TOKENS",
    "GPTQ_DEFAULT_ACT_ORDER",
    "GPTQ_DEFAULT_TRUE_SEQUENTIAL",
    "GPTQ_DEFAULT_SAMPLE_DAMP",
    "SmoothingGroup",
    "collect_activation_absmax",
    "collect_input_mean_squares",
    "collect_activation_samples",
    "collect_smoothing_statistics",
    "synthetic_token_batches",
    "AUTO_ALPHA_CANDIDATES",
    "smoothing_scales",
    "smoothing_plan",
    "apply_smoothing",
    "DEFAULT_SMOOTHING_ALPHA",
    "ROTATION_SEED",
    "random_orthogonal",
    "rotate_residual_stream",
    "tied_output_head",
    "rtn_quantize_weight",
    "dequantize_groups",
    "group_bounds",
]
