"""The quantization flags of ``monoquant quantize`` and ``monoquant submit``, derived from
:class:`mono_quant.core.options.QuantizeOptions` (names, help, valid values), so the CLI
never restates an option, a default or a rule.

A flag left out passes nothing: the library's default applies. ``--dynamic/--static`` left
out means static int8 with ``--calibration`` and dynamic without, as in the HTTP API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mono_quant.core.options import QuantizeOptions, option_specs, option_type, split_list

__all__ = ["quantize_options", "collect_options", "CLI_OPTIONS"]

CLI_OPTIONS = option_specs(cli=True)
# Flag spellings that differ from --name-with-dashes (older spellings stay accepted).
_FLAGS: dict[str, tuple[str, ...]] = {
    "dynamic": ("--dynamic/--static",),
    "per_channel": ("--per-channel/--per-tensor",),
    "observer_type": ("--observer-type", "--observer"),
    "layer_overrides": ("--layer-override", "--layer-overrides"),
}
# list options: repeated flags or comma-separated values
_MULTIPLE = tuple(name for name in CLI_OPTIONS if option_type(name) is list)


def _click_option(name: str, default: Any, spec) -> Callable:
    flags = _FLAGS.get(name, ("--" + name.replace("_", "-"),))
    help_text = spec.help + "."
    if name in _MULTIPLE:
        example = " (PATTERN=PRECISION)" if name == "layer_overrides" else ""
        return click.option(*flags, name, multiple=True, help=help_text + f"{example}. Repeat or comma-separate.")
    if isinstance(default, bool) or "/" in flags[0]:
        if "/" in flags[0]:
            return click.option(*flags, name, default=None, help=help_text)
        return click.option(*flags, name, is_flag=True, default=None, help=help_text)
    if spec.choices is not None:
        choice = click.Choice([str(c) for c in spec.choices])
        return click.option(*flags, name, type=choice, default=None, help=help_text)
    return click.option(*flags, name, type=option_type(name), default=None, help=help_text)


def quantize_options(command: Callable) -> Callable:
    """Decorate a click command with one flag per CLI option of QuantizeOptions."""
    for name, (default, spec) in reversed(list(CLI_OPTIONS.items())):
        command = _click_option(name, default, spec)(command)
    return command


def collect_options(params: dict[str, Any]) -> dict[str, Any]:
    """Pop the quantization flags out of a command's ``params``: the options given, typed as
    the library takes them (choices of numbers back to ints, repeated lists joined)."""
    given: dict[str, Any] = {}
    for name, (_default, spec) in CLI_OPTIONS.items():
        value = params.pop(name, None)
        if name in _MULTIPLE:
            value = split_list(list(value or ())) or None
        elif spec.choices is not None and value is not None and isinstance(spec.choices[0], int):
            value = int(value)
        if value is None:
            continue
        given[name] = value
    return given


def options_for(given: dict[str, Any], has_calibration: bool) -> QuantizeOptions:
    """Validate the flags with the library's rules (ConfigurationError names the bad value)."""
    return QuantizeOptions.for_request(has_calibration, **given)
