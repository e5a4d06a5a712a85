"""The export registry's defaults: options_for_formats gives way to what each format stores."""

from __future__ import annotations

import pytest

from mono_quant.core.options import QuantizeOptions
from mono_quant.errors import ConfigurationError
from mono_quant.export import get_format, options_for_formats


def test_defaults_a_format_cannot_store_give_way_and_explicit_options_stay():
    int4, int8 = QuantizeOptions(bits=4), QuantizeOptions(bits=8, dynamic=True)
    # compressed-tensors: integer zero points, no input scales
    assert options_for_formats(int4, ["compressed-tensors"], False).method == "rtn"
    # ... so int8 smooths only where the scale folds into the layer before (its consumers quantize
    # activations per token, as we do)
    for_ct = options_for_formats(int8, ["compressed-tensors"], False)
    assert for_ct.smoothing is None and for_ct.smoothing_folded_only is True
    # GGUF: Q4_1 takes HQQ's float minimum; no input scales, and llama.cpp quantizes activations
    # itself: no smoothing
    assert options_for_formats(int4, ["gguf"], False).method is None
    assert options_for_formats(int8, ["gguf"], False).smoothing == 0
    assert options_for_formats(int8, ["gguf", "onnx"], False).smoothing == 0
    # ONNX stores both; no format, no change
    assert options_for_formats(int4, ["onnx"], False) == int4
    symmetric = QuantizeOptions(bits=4, scheme="symmetric")  # symmetric HQQ keeps integer zero points
    assert options_for_formats(symmetric, ["compressed-tensors"], False) == symmetric
    assert options_for_formats(int8, [], False) == int8
    # what the caller set is the format check's to refuse, not ours to change
    explicit = QuantizeOptions(bits=4, method="hqq")
    assert options_for_formats(explicit, ["compressed-tensors"], False) == explicit
    with pytest.raises(ConfigurationError, match="float zero points") as info:
        get_format("compressed-tensors").check(
            {
                "mode": "weight_only",
                "bits": 4,
                "layer_configs": {"x": {"kind": "QuantizedLinear", "bits": 4, "float_zero_point": True}},
            }
        )
    assert "method='rtn'" in info.value.suggestion
    # calibration data in dynamic int8 is there for smoothing: kept, folded only
    assert options_for_formats(int8, ["compressed-tensors"], True).smoothing_folded_only is True
    assert options_for_formats(int8, ["gguf"], True).smoothing_folded_only is True
    assert options_for_formats(QuantizeOptions(bits=8, dynamic=True, smoothing=0), ["compressed-tensors"], True) == (
        QuantizeOptions(bits=8, dynamic=True, smoothing=0)
    )
    # static int8: smoothed with its calibration data, folded only
    static = QuantizeOptions(bits=8)
    assert options_for_formats(static, ["compressed-tensors"], True).smoothing_folded_only is True
    assert options_for_formats(static, ["onnx"], True) == static
    # calibration data for int4 alone serves HQQ: kept (the check suggests GPTQ); with a target it is kept
    assert options_for_formats(int4, ["compressed-tensors"], True) == int4
    target = QuantizeOptions(bits=4, max_accuracy_loss=0.01)
    assert options_for_formats(target, ["compressed-tensors"], True).method == "rtn"
    with pytest.raises(ConfigurationError, match="unknown export format"):
        options_for_formats(int4, ["tflite"], False)


@pytest.mark.parametrize("name", ["compressed-tensors", "onnx", "gguf"])
def test_every_format_takes_asymmetric_per_token_activations(name):
    """compressed-tensors declares them (``symmetric: false``, vLLM's "azp" kernels), ONNX
    writes them in plain ops around MatMulInteger, llama.cpp quantizes activations itself:
    ``activation_scheme='asymmetric'`` is refused by none, at submission or after a run."""
    layer = {"kind": "QuantizedLinear", "bits": 8, "symmetric": True, "activation": "dynamic"}
    check = get_format(name).check
    check(QuantizeOptions(bits=8, dynamic=True, activation_scheme="asymmetric"))
    check({"mode": "dynamic", "bits": 8, "layer_configs": {"fc": {**layer, "activation_symmetric": False}}})
