"""The HTTP client of the service; it lives in :mod:`mono_quant.client` (the CLI uses it), this
path stays for callers that import it from the service package."""

from mono_quant.client import *  # noqa: F403
from mono_quant.client import __all__  # noqa: F401
