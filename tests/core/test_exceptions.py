"""The exception hierarchy the core raises (mono_quant.api.exceptions): messages, suggestions,
pickling (errors cross process boundaries in the service's worker pool)."""

from __future__ import annotations

import pickle

import pytest

from mono_quant.api.exceptions import (
    ConfigurationError,
    InputError,
    InputTooLargeError,
    MonoQuantError,
    QuantizationError,
    UnsupportedFormatError,
    ValidationError,
)

ERRORS = [
    (MonoQuantError, Exception, "something went wrong", "Try again."),
    (ConfigurationError, MonoQuantError, "bits=5 is not supported", "Use bits=4, 8 or 16."),
    (InputError, MonoQuantError, "calibration_data is empty", "Pass at least one batch."),
    (UnsupportedFormatError, InputError, "pickled modules are refused", "Save a state_dict as safetensors."),
    (InputTooLargeError, InputError, "upload is 3 GiB, over the 2 GiB limit", "Raise the limit or upload less."),
    (QuantizationError, MonoQuantError, "no quantized layer for Foo", "Exclude the layer."),
    (ValidationError, MonoQuantError, "SQNR 3.1 dB is below 20 dB", "Use int8 or a smaller group_size."),
]
IDS = [cls.__name__ for cls, *_ in ERRORS]


@pytest.mark.parametrize("cls, parent, message, suggestion", ERRORS, ids=IDS)
def test_message_and_suggestion(cls, parent, message, suggestion):
    error = cls(message, suggestion=suggestion)
    assert isinstance(error, parent) and isinstance(error, MonoQuantError)
    assert error.message == message and error.suggestion == suggestion
    assert str(error) == f"{message}\nSuggestion: {suggestion}"
    assert error.args == (message,)
    assert error.to_dict() == {"type": cls.__name__, "message": message, "suggestion": suggestion}


@pytest.mark.parametrize("cls, parent, message, suggestion", ERRORS, ids=IDS)
def test_without_suggestion_str_is_the_message(cls, parent, message, suggestion):
    error = cls(message)
    assert error.suggestion is None
    assert str(error) == message
    assert "Suggestion" not in str(error)


@pytest.mark.parametrize("cls, parent, message, suggestion", ERRORS, ids=IDS)
def test_pickling_keeps_type_message_and_suggestion(cls, parent, message, suggestion):
    for given in (suggestion, None):
        restored = pickle.loads(pickle.dumps(cls(message, suggestion=given)))
        assert type(restored) is cls
        assert restored.message == message and restored.suggestion == given
        assert str(restored) == str(cls(message, given))


@pytest.mark.parametrize("cls, parent, message, suggestion", ERRORS, ids=IDS)
def test_caught_by_the_base_class(cls, parent, message, suggestion):
    with pytest.raises(MonoQuantError) as info:
        raise cls(message, suggestion)
    assert info.value.suggestion == suggestion


def test_hierarchy_is_as_documented():
    assert issubclass(UnsupportedFormatError, InputError)
    assert issubclass(InputTooLargeError, InputError)
    for cls in (ConfigurationError, InputError, QuantizationError, ValidationError):
        assert cls.__bases__ == (MonoQuantError,)
    assert not issubclass(ConfigurationError, InputError)
